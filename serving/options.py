"""Everything a server process needs to start, as plain JSON: serve.py resolves it once, and each worker
process (`--workers N`) reads it back from the environment. It holds the database and tracking URLs with their
credentials, which the processes need to connect: it is never logged (Config.to_dict() is what gets logged)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from core.config import Config
from serving.model import ServedSpec

ENV_VAR = "BRAIN_MRI_SERVE_OPTIONS"


@dataclass
class ServeOptions:
    config: dict                 # the resolved Config as it is used (Config.to_values(): credentials kept)
    model: str                   # registered model name, e.g. brain-cancer-resnet18
    alias: str | None = "production"
    version: str | None = None
    flavor: str = "auto"
    # which extensions the processes build ("review", "dicom"): serve.py's build_extensions wires them in code
    extensions: list[str] = field(default_factory=list)
    extras: dict = field(default_factory=dict)  # options the extensions read

    @property
    def cfg(self) -> Config:
        return Config.model_validate(self.config)

    @property
    def spec(self) -> ServedSpec:
        return ServedSpec(self.model, None if self.version else self.alias, self.version, self.flavor)

    def to_env(self) -> None:
        os.environ[ENV_VAR] = json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeOptions:
        return cls(**json.loads(os.environ[ENV_VAR]))

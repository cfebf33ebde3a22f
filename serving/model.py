"""The served model: one registry version loaded with its evidence, warmed up before it takes traffic.

A version is loaded through deploy.registry (ONNX flavor in ONNX Runtime by default), its evaluation
evidence and model card are read from its registration run, and a few batches run through it before it
answers anyone. The PyTorch flavor is loaded only when a Grad-CAM is asked for.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.redaction import redact_text
from deploy.model_card import with_aliases
from deploy.registry import load_predictor

log = logging.getLogger("serving.model")
# Keys of the registry's evidence whose values are file paths on some machine: answered by file name only.
PATH_KEYS = ("checkpoint", "split_manifest", "stats_path", "path")


@dataclass(frozen=True)
class ServedSpec:
    """Which registered model to serve: an alias (default production) or a pinned version, and the flavor."""
    name: str
    alias: str | None = "production"
    version: str | None = None
    flavor: str = "auto"


@dataclass
class ServedModel:
    spec: ServedSpec
    mv: object  # the registry's ModelVersion
    predictor: object  # deploy.predictors.Predictor
    flavor: str
    evidence: dict
    workdir: Path
    users: int = 0      # requests holding this version
    retired: bool = False  # a newer version is current: released when users drops to 0
    batcher: object = None  # serving.batcher.MicroBatcher, attached by the service
    rule: object = None     # deploy.refer.ReferRule of this version, attached by the service
    _torch: object = field(default=None, repr=False)
    _torch_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def version(self) -> str:
        return str(self.mv.version)

    @property
    def tags(self) -> dict:
        return dict(self.mv.tags or {})

    def validation(self) -> dict:
        """The registry's verdict on this version, said in every answer; a warning unless it passed unforced."""
        status = self.tags.get("medical_validation", "unknown")
        forced = self.tags.get("forced", "false").lower() == "true"
        warning = None
        if forced or status != "passed":
            warning = (f"{self.mv.name} v{self.version} is not validated for clinical use "
                       f"(medical validation: {status}{', registered with --force' if forced else ''})")
        return {"medical_validation": status, "forced": forced, "warning": warning}

    def identity(self) -> dict:
        """What every answer names: the model, its version, the alias it was reached by, the flavor."""
        return {"model": self.mv.name, "version": self.version, "alias": self.spec.alias, "flavor": self.flavor,
                "semver": self.tags.get("semver"), **self.validation()}

    def contract(self) -> dict:
        return scrub_paths(self.predictor.contract.to_dict())

    def torch_predictor(self, client):
        """The PyTorch flavor of the same version (for Grad-CAM), loaded on first use."""
        with self._torch_lock:
            if self._torch is None:
                self._torch, _, _ = load_predictor(client, self.mv, self.workdir, "pytorch")
            return self._torch

    def discard(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def scrub_paths(obj):
    """The same structure with every path-valued key cut to its file name (answers carry no paths)."""
    if isinstance(obj, dict):
        return {k: (Path(v).name if k in PATH_KEYS and isinstance(v, str) else scrub_paths(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_paths(v) for v in obj]
    return obj


def _download_json(run_id: str, artifact: str, dst: Path) -> dict | None:
    import mlflow

    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst))
        return json.loads(Path(local).read_text())
    except Exception:  # never evaluated (a forced registration): the card says so
        return None


def read_evidence(mv, workdir: Path, tracking_uri: str) -> dict:
    """The model card, the evaluation's figures (with their intervals) and the gates, from the registration run;
    paths in them (the training machine's checkpoint and manifest) cut to file names."""
    import mlflow

    if not getattr(mv, "run_id", None):
        return {"model_card": None, "evaluation": None, "gates": None}
    dst = workdir / "evidence"
    dst.mkdir(parents=True, exist_ok=True)
    evaluation = _download_json(mv.run_id, "evaluation/evaluation_metrics.json", dst)
    gates = _download_json(mv.run_id, "evaluation/medical_validation.json", dst)
    try:
        card = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="model_card.md",
                                                        dst_path=str(dst))).read_text()
    except Exception:
        card = None
    if card:
        for path in sorted(_paths_in(evaluation) | _paths_in(gates) | _paths_in(mv.tags), key=len, reverse=True):
            card = card.replace(path, Path(path).name)
        card = card.replace(redact_text(tracking_uri), "the MLflow store")  # the card holds it redacted
        card = with_aliases(card.replace(tracking_uri, "the MLflow store"), getattr(mv, "aliases", None) or [])
    return {"model_card": card, "evaluation": scrub_paths(evaluation), "gates": scrub_paths(gates)}


def _paths_in(obj) -> set[str]:
    if not isinstance(obj, dict):
        return set()
    return {v for k, v in obj.items() if k in PATH_KEYS and isinstance(v, str) and "/" in v}


def warm_up(predictor, max_batch: int) -> None:
    """A few calls at the sizes traffic will use, so that the first patient's answer is not the slow one."""
    c = predictor.contract
    for n in sorted({1, max(1, max_batch // 2), max_batch}):
        predictor.predict_array(np.zeros((n, 3, c.img_size, c.img_size), dtype=np.float32))


def load_served_model(client, spec: ServedSpec, mv, root: Path, tracking_uri: str, max_batch: int) -> ServedModel:
    """Download, load, read the evidence and warm up one resolved version (blocking: run it off the loop)."""
    root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"v{mv.version}-", dir=root))
    try:
        # ONNX Runtime's threads spin after each call by default, taking the cores the decoding threads need
        predictor, _, flavor = load_predictor(client, mv, workdir, spec.flavor,
                                              {"session.intra_op.allow_spinning": "0"})
        evidence = read_evidence(mv, workdir, tracking_uri)
        warm_up(predictor, max_batch)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    model = ServedModel(spec, mv, predictor, flavor, evidence, workdir)
    warning = model.validation()["warning"]
    where = f"@{spec.alias}" if spec.version is None else "pinned"
    log.info("model %s v%s (%s, %s flavor) loaded and warmed up", mv.name, mv.version, where, flavor)
    if warning:
        log.warning("⚠️  %s", warning)
    return model

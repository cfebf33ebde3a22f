"""Typed, validated configuration: YAML base, overlays, --set overrides, explicit flags.

Order of precedence (lowest first): config/config.yaml, --config FILE (deep-merged on top),
config/demo.yaml when --demo, each --set key.path=value, explicit flags.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from core.errors import UserError
from core.fileio import write_text_atomic
from core.model_names import MODEL_NAMES

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "config.yaml"
DEMO_CONFIG = PROJECT_ROOT / "config" / "demo.yaml"


Fraction = Annotated[float, Field(ge=0, le=1)]
Percent = Annotated[float, Field(ge=0, le=100)]


class Section(BaseModel):
    # Unknown keys are errors: a typo in a config must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelRecipe(Section):
    lr: PositiveFloat = 1e-3
    batch_size: PositiveInt = 32
    optimizer: Literal["adamw", "adam", "adamax", "sgd"] = "adamw"
    weight_decay: NonNegativeFloat = 0.05
    img_size: Optional[PositiveInt] = None  # None: dataset.img_size
    pretrained: bool = True
    weights: Optional[str] = None  # local file with ImageNet weights


class DemoSection(Section):
    root: str = "./data/demo"
    n_per_class: PositiveInt = 300
    size: PositiveInt = 128
    seed: int = 0


class DatasetSection(Section):
    path: str = "./data/brain-cancer/Brain_Cancer raw MRI data/Brain_Cancer"
    test_path: Optional[str] = None
    img_size: PositiveInt = 224
    num_workers: NonNegativeInt = 2
    pin_memory: bool = True
    train_split: Fraction = 0.70
    val_split: Fraction = 0.15
    test_split: Fraction = 0.15
    seed: int = 42
    group_pattern: Optional[str] = None
    class_names: dict[str, str] = {}
    normalization: Literal["dataset", "imagenet"] = "dataset"
    stats_path: str = "./normalization_stats.json"
    manifest_dir: str = "./checkpoints/splits"
    cache: bool = True
    cache_dir: str = "./.cache"
    demo: bool = False

    @model_validator(mode="after")
    def _splits_sum_to_one(self):
        total = self.train_split + self.val_split + self.test_split
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train_split + val_split + test_split must be 1.0, got {total:g}")
        return self


class TransformSection(Section):
    augmentation: bool = True
    hflip: Fraction = 0.5
    rotation: NonNegativeFloat = 10.0
    brightness: NonNegativeFloat = 0.2
    contrast: NonNegativeFloat = 0.2


class TrainSection(Section):
    epochs: PositiveInt = 50
    patience: PositiveInt = 10
    min_delta: NonNegativeFloat = 0.001
    save_every: NonNegativeInt = 5
    output_dir: str = "./checkpoints"
    monitor: Literal["val_acc", "val_loss", "val_balanced_acc"] = "val_acc"
    scheduler: Literal["cosine", "onecycle", "none"] = "cosine"
    warmup_epochs: NonNegativeInt = 1
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    class_balance: Literal["none", "weights", "sampler"] = "none"
    seed: int = 42
    deterministic: bool = False
    max_nonfinite_steps: PositiveInt = 20


class MlflowSection(Section):
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "./mlartifacts"
    parent_run_id: Optional[str] = None  # set by run_experiments.py to nest training runs under its run


class WandbSection(Section):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "brain-cancer-mri"
    entity: Optional[str] = None
    tags: list[str] = ["brain-tumor", "classification", "pytorch"]
    dir: str = "."


class GpuThresholds(Section):
    temperature_c: PositiveFloat = 80.0
    memory_pct: Percent = 95.0
    high_memory_pct: Percent = 80.0
    low_utilization_pct: Percent = 30.0


class MonitoringSection(Section):
    tensorboard: bool = True
    tensorboard_log_dir: str = "./runs"
    mlflow: MlflowSection = MlflowSection()
    wandb: WandbSection = WandbSection()
    gpu: GpuThresholds = GpuThresholds()


class PerformanceSection(Section):
    mixed_precision: bool = True  # CUDA
    cpu_precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where the CPU has native bf16
    compile_model: bool = False
    channels_last: bool = True
    benchmark_cudnn: bool = True
    gradient_accumulation: PositiveInt = 1
    max_grad_norm: Optional[PositiveFloat] = 1.0
    fused_optimizer: bool | Literal["auto"] = "auto"
    prefetch_factor: PositiveInt = 4
    persistent_workers: bool = True


class GatesSection(Section):
    accuracy: Fraction = 0.85
    sensitivity: Fraction = 0.80
    latency_ms: PositiveFloat = 500.0
    max_imbalance: Annotated[float, Field(ge=1)] = 5.0


class EvaluationSection(Section):
    bootstrap_samples: PositiveInt = 1000
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    bootstrap_seed: int = 0
    ece_bins: PositiveInt = 15
    gradcam_correct_samples: NonNegativeInt = 8
    timing_warmup: NonNegativeInt = 3
    timing_runs: PositiveInt = 20
    gates: GatesSection = GatesSection()


class ExperimentsSection(Section):
    models: list[str] = ["resnet18", "efficientnet_b0", "swin_t", "vit_b_16"]


class Config(Section):
    model: str = "resnet18"
    models: dict[str, ModelRecipe] = {}
    dataset: DatasetSection = DatasetSection()
    transform: TransformSection = TransformSection()
    train: TrainSection = TrainSection()
    monitoring: MonitoringSection = MonitoringSection()
    performance: PerformanceSection = PerformanceSection()
    evaluation: EvaluationSection = EvaluationSection()
    experiments: ExperimentsSection = ExperimentsSection()
    demo: DemoSection = DemoSection()

    @field_validator("models")
    @classmethod
    def _known_models(cls, value):
        unknown = sorted(set(value) - set(MODEL_NAMES))
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; choose from: {', '.join(MODEL_NAMES)}")
        return value

    @model_validator(mode="after")
    def _selected_model_known(self):
        if self.model not in self.models:
            raise ValueError(f"unknown model {self.model!r}; choose from: {', '.join(self.models)}")
        return self

    # Derived settings every stage reads the same way.
    @property
    def recipe(self) -> ModelRecipe:
        return self.models[self.model]

    @property
    def img_size(self) -> int:
        return self.recipe.img_size or self.dataset.img_size

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir) / f"{self.model}_outputs"

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


def deep_merge(base: dict, overlay: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_set(data: dict, assignment: str) -> dict:
    """Apply one `key.path=value`; the value is parsed as YAML (numbers, booleans, lists), never eval'd."""
    if "=" not in assignment:
        raise UserError(f"--set expects key.path=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set expects key.path=value, got {assignment!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return set_path(data, parts, value)


def set_path(data: dict, parts: list[str], value: Any) -> dict:
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"config key {'.'.join(parts)}: {part!r} is not a section")
    node[parts[-1]] = value
    return data


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        section = _section_for(err["loc"][:-1])
        choices = ", ".join(section.model_fields) if section else ""
        return f"unknown config key '{key}'; valid keys here: {choices}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"invalid config value for '{key}': {msg}"


def _section_for(loc) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None if part not in ("models",) else ModelRecipe
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif str(part) == "models":
            model = ModelRecipe
        else:
            return model
    return model


def load_config(
    path: str | Path | None = None,
    sets: list[str] | None = None,
    demo: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Build the resolved Config; `overrides` holds explicit flags as dotted keys (None = not given)."""
    data = read_yaml(DEFAULT_CONFIG)
    if path is not None and Path(path).resolve() != DEFAULT_CONFIG.resolve():
        data = deep_merge(data, read_yaml(path))
    if demo:
        data = deep_merge(data, read_yaml(DEMO_CONFIG))
    for assignment in sets or []:
        apply_set(data, assignment)
    for key, value in (overrides or {}).items():
        if value is not None:  # "{model}" in a key means the model selected so far (flags win over --set)
            set_path(data, key.format(model=data.get("model")).split("."), value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise UserError(_one_line(exc)) from None


def save_resolved(cfg: Config, out_dir: str | Path, name: str = "resolved_config.yaml") -> Path:
    return write_text_atomic(Path(out_dir) / name, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

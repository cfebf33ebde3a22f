"""Typed, validated configuration: YAML base, overlays, --set overrides, explicit flags.

Order of precedence (lowest first): config/config.yaml, --config FILE (deep-merged on top),
config/demo.yaml when --demo (and config/demo_dicom.yaml after it when --demo dicom), each --set key.path=value,
explicit flags.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Optional

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
from core.original_config import translate_original
from core.redaction import redact

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "config.yaml"
DEMO_CONFIG = PROJECT_ROOT / "config" / "demo.yaml"
DEMO_OVERLAYS = {"jpeg": [DEMO_CONFIG], "dicom": [DEMO_CONFIG, PROJECT_ROOT / "config" / "demo_dicom.yaml"]}


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
    weights: Optional[str] = None  # a local file with ImageNet weights, or a name: ResNet50_Weights.IMAGENET1K_V2


class DemoSection(Section):
    root: str = "./data/demo"
    n_per_class: PositiveInt = 400      # images per class; with format dicom: series per class
    size: PositiveInt = 128
    seed: int = 0
    format: Literal["jpeg", "dicom"] = "jpeg"  # dicom (--demo dicom): MR series of 16-32 slices, a lesion in a run


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
    group_dicom_series: bool = True  # the files of one DICOM series (SeriesInstanceUID) stay in one split
    num_classes: Optional[PositiveInt] = None  # None: the class folders decide; a number: checked against them
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
    experiment_prefix: str = "brain-cancer-mri"  # experiments {prefix}-v2-{model}, {prefix}-evaluation-{model}, ...
    parent_run_id: Optional[str] = None  # set by run_experiments.py to nest training runs under its run
    telemetry: bool = False  # MLflow's usage telemetry to its vendor: off unless turned on here


class WandbSection(Section):
    # offline unless `online` is written here; `auto` (older configs) means offline too
    mode: Literal["auto", "online", "offline", "disabled"] = "offline"
    log_patient_data: bool = False  # per-file predictions (paths), images and Grad-CAM overlays to W&B
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
    level: Literal["slice", "series"] = "slice"  # series: accuracy and sensitivity judged on the series figures
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


class DicomPeer(NamedTuple):
    """A DICOM application entity on the network: AE title, host, and (for a destination) port."""
    ae_title: str
    host: str
    port: Optional[int] = None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}" + (f":{self.port}" if self.port else "")


def parse_ae_title(text: str) -> str:
    """A DICOM AE title: 1-16 printable ASCII characters, no backslash, not only spaces."""
    title = str(text).strip()
    if not 1 <= len(title) <= 16 or not all(" " <= ch <= "~" and ch != "\\" for ch in title):
        raise ValueError(f"{text!r} is not an AE title (1-16 printable ASCII characters, no backslash)")
    return title


def parse_peer(text: str, with_port: bool = False) -> DicomPeer:
    """'AE@HOST' (a calling peer) or 'AE@HOST:PORT' (a destination)."""
    title, at, rest = str(text).rpartition("@")
    host, colon, port = rest.rpartition(":") if with_port else (rest, "", "")
    if not at or not host or (with_port and not (colon and port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"{text!r} is not {'AE@HOST:PORT' if with_port else 'AE@HOST'}")
    return DicomPeer(parse_ae_title(title), host.strip("[]"), int(port) if with_port else None)


class PacsRetrySection(Section):
    initial_s: PositiveFloat = 5.0      # first wait after a failed send; doubles each time
    max_s: PositiveFloat = 300.0        # longest wait between two tries
    max_attempts: NonNegativeInt = 20   # tries of one object the destination refuses; 0: never give up


class PacsSelectSection(Section):
    """Which received series are read (pacs/selection.py); a series left out gets an audit row saying why."""
    modalities: list[str] = ["MR"]                       # Modality of the series
    skip_image_types: list[str] = ["LOCALIZER", "SCOUT"]  # any of these in ImageType: a localizer, left out
    skip_derived: bool = True                             # ImageType DERIVED/SECONDARY and secondary captures
    descriptions: list[str] = []                          # SeriesDescription must match one (regex, any case)
    skip_descriptions: list[str] = []                     # ... and none of these
    min_slices: PositiveInt = 5                           # fewer slices when complete: left out

    @field_validator("descriptions", "skip_descriptions")
    @classmethod
    def _patterns(cls, value):
        import re

        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return value


class PacsSection(Section):
    enabled: bool = False               # serve.py runs the receiver (also when --dicom-port is given)
    ae_title: str = "MRI_AI"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112  # 0: any free port
    allow: list[str] = []               # AE@HOST peers that may send images; the destination is always allowed
    destination: Optional[str] = None   # AE@HOST:PORT that receives the SR and secondary capture results
    spool_dir: str = "./pacs_spool"
    max_instance_mb: PositiveFloat = 256.0
    max_decoded_mb: PositiveFloat = 512.0  # pixels of one instance once decoded (a 1.5 MB RLE can hold 294 MB)
    max_associations: PositiveInt = 4
    timeout_s: PositiveFloat = 30.0
    request_timeout_s: PositiveFloat = 5.0  # a connection must send its A-ASSOCIATE-RQ within this, or is closed
    keep_patient_identity: bool = False  # store and return patient name and birth date
    refer_below: Fraction = 0.6          # refer flag when the top probability is below this (no other rule given)
    retry: PacsRetrySection = PacsRetrySection()
    results: Literal["series", "slice"] = "series"  # one SR + KOS + SC per series; slice: an SR and SCs per instance
    series_complete: Literal["quiet", "association"] = "quiet"  # association: also when the sender releases it
    series_stable_seconds: PositiveFloat = 60.0  # a series with no new instance for this long is complete
    series_keep_hours: PositiveFloat = 24.0  # a series' instances are kept this long after the last (late ones amend)
    select: PacsSelectSection = PacsSelectSection()

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value):
        return parse_ae_title(value)

    @field_validator("allow")
    @classmethod
    def _allow(cls, value):
        return [str(parse_peer(v)) for v in value]

    @field_validator("destination")
    @classmethod
    def _destination(cls, value):
        return None if value in (None, "") else str(parse_peer(value, with_port=True))

    @property
    def destination_peer(self) -> Optional[DicomPeer]:
        return parse_peer(self.destination, with_port=True) if self.destination else None

    @property
    def allowed_peers(self) -> list[DicomPeer]:
        """The configured calling peers, plus the destination (a PACS that receives results may send images)."""
        peers = [parse_peer(v) for v in self.allow]
        dest = self.destination_peer
        return peers + ([DicomPeer(dest.ae_title, dest.host)] if dest else [])

class SeriesSection(Section):
    """How slice predictions become one series result (series/rule.py, docs/series.md)."""
    top_k: PositiveInt = 3                # a class's series score: the mean of its k highest slice probabilities
    min_slices: PositiveInt = 8           # a series with fewer slices is referred
    disagree_above: Fraction = 0.8        # another class's score at or above this: the slices disagree, referred
    unlike_share: Fraction = 0.5          # more than this share of slices unlike the training data: referred


class OodSection(Section):
    """The feature-space out-of-distribution check fitted after training (evaluation/answer_checks.py, docs/ood.md)."""
    percentile: Annotated[float, Field(gt=50, le=100)] = 95.0  # limit: this percentile of the validation distances


class ConformalSection(Section):
    """Split-conformal prediction sets calibrated on the validation split (core/conformal.py, docs/ood.md)."""
    alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.05  # sets miss the true class on at most this share


class ImagesSection(Section):
    """Bounds on every decoded file (data.images.set_limits): a file over one is refused, by path, and skipped."""
    max_pixels: PositiveInt = 50_000_000  # per image or frame; an MRI slice is well under 1 Mpx
    max_frames: PositiveInt = 2000  # per multi-frame DICOM
    max_bytes: PositiveInt = 2 * 1024 ** 3  # per file


class RegistrySection(Section):
    auto_register: bool = True  # after train.py: evaluate the best checkpoint; register it @staging when the gates pass
    auto_promote: bool = True  # ... and move @production to it when the gates pass
    promote_on: Literal["point", "ci_lower"] = "point"  # judge promotion on the point estimate or the CI's lower bound


class ServingSection(Section):
    """serve.py: where it listens, how it batches, what it refuses, where it keeps the audit trail."""
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    workers: PositiveInt = 1
    token_file: Optional[str] = None       # required for any address other than loopback
    database_url: str = "sqlite:///audit.db"
    audit_fsync: bool = True               # sqlite: fsync each commit (survives a power cut; else a kill -9 only)
    max_batch: PositiveInt = 16            # images per ONNX Runtime call
    max_wait_ms: NonNegativeFloat = 5.0    # how long a batch waits for more requests
    queue_size: PositiveInt = 64           # requests in the server at once; more get 503 + Retry-After
    max_upload_mb: PositiveFloat = 32.0    # the whole request body
    max_files: PositiveInt = 16            # files per request
    max_images: PositiveInt = 64           # images per request (a multi-frame DICOM counts its frames)
    request_timeout_s: PositiveFloat = 30.0  # the whole body must arrive within this
    header_timeout_s: PositiveFloat = 10.0   # the request line and headers must arrive within this
    poll_seconds: NonNegativeFloat = 30.0  # how often the alias is checked for a new version (0: never)
    decode_threads: Optional[PositiveInt] = None  # None: usable cores
    cors_origins: list[str] = []           # none: CORS off
    api_docs: bool = False                 # /docs and /redoc, their scripts served by this server
    allowed_hosts: list[str] = []          # Host names (name or name:port) served besides loopback ones
    trusted_proxies: list[str] = []        # addresses whose X-Forwarded-For is believed (none: the peer's own)


class MonitorLimits(Section):
    """The review station's monitoring panel: recent predictions against the test split's (warn past a limit)."""
    window: PositiveInt = 200             # the most recent worklist predictions (and verdicts) compared
    min_samples: PositiveInt = 20         # fewer recent ones: shown, not judged
    class_share: Fraction = 0.15          # a predicted class's share differs from the test split's by more
    confidence_drop: Fraction = 0.10      # mean top probability below the test split's by more
    refer_rate_rise: Fraction = 0.10      # refer rate above the test split's by more
    agreement_drop: Fraction = 0.10       # reviewers agree less often than the test accuracy by more


class ReviewSection(Section):
    """serve.py --review: the radiologists' review page (docs/review.md)."""
    store_dir: str = "./review_store"     # uploaded files kept for review and export (owner-only)
    refer_below: Fraction = 0.6           # refer when the top probability is below this
    drift_limit: Optional[Annotated[float, Field(ge=0, le=1)]] = None  # None: the model's own (p99 of validation)
    session_hours: PositiveFloat = 12.0   # a login lasts this long
    secure_cookie: Optional[bool] = None  # None: Secure when the page is served over https
    undo_seconds: PositiveFloat = 10.0    # a reviewer may undo a verdict this long after giving it
    patient_id: Literal["show", "hash"] = "show"  # the study worklist's patient column: the ID, or a short hash of it
    monitor: MonitorLimits = MonitorLimits()


class ExperimentsSection(Section):
    models: list[str] = ["resnet18", "efficientnet_b0", "swin_t", "vit_b_16"]
    # A short comparison by default, as the original's (5 epochs for CNNs, 3 for transformers); null: train.epochs
    epochs: Optional[dict[str, PositiveInt]] = {"default": 5, "swin_t": 3, "swin_s": 3, "vit_b_16": 3}

    @field_validator("epochs")
    @classmethod
    def _epoch_keys(cls, value):
        unknown = sorted(set(value or {}) - set(MODEL_NAMES) - {"default"})
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; keys are model names or 'default'")
        return value

    def epochs_for(self, model: str) -> int | None:
        """The short comparison's epochs for one model (None: its full train.epochs)."""
        return None if self.epochs is None else self.epochs.get(model, self.epochs.get("default"))


class Config(Section):
    model: str = "resnet18"
    models: dict[str, ModelRecipe] = {}
    dataset: DatasetSection = DatasetSection()
    transform: TransformSection = TransformSection()
    train: TrainSection = TrainSection()
    monitoring: MonitoringSection = MonitoringSection()
    performance: PerformanceSection = PerformanceSection()
    evaluation: EvaluationSection = EvaluationSection()
    registry: RegistrySection = RegistrySection()
    experiments: ExperimentsSection = ExperimentsSection()
    serving: ServingSection = ServingSection()
    demo: DemoSection = DemoSection()
    pacs: PacsSection = PacsSection()
    review: ReviewSection = ReviewSection()
    images: ImagesSection = ImagesSection()
    series: SeriesSection = SeriesSection()
    ood: OodSection = OodSection()
    conformal: ConformalSection = ConformalSection()

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
        """Plain values, credentials stripped from any URI: what is logged, checkpointed and saved."""
        return redact(self.model_dump(mode="json"))

    def to_values(self) -> dict:
        """Plain values as they are used, credentials kept: what a process of this run is handed to work with
        (a server's worker), never what is logged or stored (that is `to_dict`)."""
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


_noticed: set[str] = set()


def notice(message: str) -> None:
    """One line on stderr per translated key, once per process (scripts load the config more than once)."""
    if message not in _noticed:
        _noticed.add(message)
        print(f"note: {message}", file=sys.stderr, flush=True)


def read_layer(data: dict, source: str, unusable: dict[str, str]) -> dict:
    """One config layer (a file, a --set) with keys in the original project's format translated; the models
    entries that cannot be translated go into `unusable` (model -> why)."""
    translated, notices, refused = translate_original(data, source)
    for message in notices:
        notice(message)
    unusable.update(refused)
    return translated


def load_config(
    path: str | Path | None = None,
    sets: list[str] | None = None,
    demo: bool | str = False,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Build the resolved Config; `overrides` holds explicit flags as dotted keys (None = not given); `demo`: True
    or "jpeg" for the demo data set, "dicom" for its DICOM series variant."""
    data, unusable = read_yaml(DEFAULT_CONFIG), {}
    if path is not None and Path(path).resolve() != DEFAULT_CONFIG.resolve():
        data = deep_merge(data, read_layer(read_yaml(path), str(path), unusable))
    for overlay in DEMO_OVERLAYS["jpeg" if demo is True else demo] if demo else []:
        data = deep_merge(data, read_yaml(overlay))
    for assignment in sets or []:
        data = deep_merge(data, read_layer(apply_set({}, assignment), f"--set {assignment}", unusable))
    for key, value in (overrides or {}).items():
        if value is not None:  # "{model}" in a key means the model selected so far (flags win over --set)
            set_path(data, key.format(model=data.get("model")).split("."), value)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise UserError(_one_line(exc)) from None
    if cfg.model in unusable:
        raise UserError(unusable[cfg.model])
    for why in unusable.values():  # an entry the run does not select never refuses the file
        notice(f"{why}; the entry is ignored (this run trains {cfg.model})")
    return cfg


def save_resolved(cfg: Config, out_dir: str | Path, name: str = "resolved_config.yaml") -> Path:
    return write_text_atomic(Path(out_dir) / name, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

"""TensorBoard, MLflow and W&B behind one object; a tracker that fails costs one warning, never the run.

    with RunTracker(cfg, run_name="resnet18", mlflow_experiment="brain-cancer-mri-v2-resnet18",
                    wandb_project="brain-cancer-mri", tensorboard_dir="runs/resnet18_logs") as tracker:
        tracker.log_params({"lr": 1e-3})
        tracker.log_metrics({"train/loss": 0.4}, step=1)
        tracker.log_artifact("checkpoints/resnet18_outputs/best_model.pth", "checkpoints")
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from core.redaction import redact, redact_text

if TYPE_CHECKING:
    from core.config import Config

EXPERIMENT_PREFIX = "brain-cancer-mri"
MLFLOW_MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (MLflow 3)
MLFLOW_BATCH = 100  # params/tags per log_batch call
WANDB_TAG_LENGTH = 64


def experiment_name(stage: str, model: str | None = None, prefix: str = EXPERIMENT_PREFIX) -> str:
    """The MLflow experiment of a stage: brain-cancer-mri-v2-{model} for training (the original's name),
    brain-cancer-mri-{stage}-{model} for test/evaluation/registry, brain-cancer-mri-{stage} without a model.
    prefix: monitoring.mlflow.experiment_prefix (the original config's mlflow_experiment_name)."""
    if stage == "train":
        return f"{prefix}-v2-{model}"
    return f"{prefix}-{stage}" + (f"-{model}" if model else "")


def wandb_project(cfg: Config, stage: str = "train") -> str:
    """monitoring.wandb.project for training, with -{stage} appended for the other stages."""
    project = cfg.monitoring.wandb.project
    return project if stage == "train" else f"{project}-{stage}"


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _reason(exc: BaseException) -> str:
    text = redact_text(str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def wandb_mode(configured: str) -> str:
    """online only when the config says `online`; disabled when it (or WANDB_MODE) says so; else offline.

    An API key in the environment or ~/.netrc, or WANDB_MODE=online, never sends a run off the machine."""
    if configured in ("online", "disabled"):
        return configured
    return "disabled" if os.environ.get("WANDB_MODE") == "disabled" else "offline"


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """sys.argv with its credentials redacted while a library reads it (W&B writes the command line into its run
    file, which `wandb sync` uploads); the process's own arguments are back afterwards."""
    saved = sys.argv[:]
    sys.argv[:] = [redact_text(arg) for arg in saved]
    try:
        yield
    finally:
        sys.argv[:] = saved


def prepare_mlflow(section) -> None:
    """What MLflow must know before it starts: its usage telemetry stays off (core sets
    MLFLOW_DISABLE_TELEMETRY=true at import) unless monitoring.mlflow.telemetry is true or the user set
    MLFLOW_DISABLE_TELEMETRY=false; and a tracking URI with credentials is never echoed in its run links."""
    if redact_text(section.tracking_uri) != section.tracking_uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if not section.telemetry or os.environ.get("MLFLOW_DISABLE_TELEMETRY") == "false":
        return
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "false"
    if "mlflow" in sys.modules:  # MLflow decides when it is imported: ask it again
        from mlflow.telemetry.client import set_telemetry_client

        set_telemetry_client()


def _probe_http(uri: str, timeout: float = 3.0) -> None:
    """Fail fast (one TCP connect) instead of MLflow's minutes of retries against a server that is down."""
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(f"cannot reach {redact_text(uri)}: {exc.strerror or exc}") from None


class RunTracker:
    """TensorBoard + MLflow + W&B behind one object; every backend failure = one warning, then that backend is off."""

    def __init__(self, cfg: Config, *, run_name: str, mlflow_experiment: str | None, wandb_project: str | None,
                 tensorboard_dir: str | Path | None = None, tags: dict | None = None, job_type: str = "train"):
        self.run_name = run_name
        self._tb = None
        self._mlflow = None  # MlflowClient
        self._run_id: str | None = None
        self._wandb = None  # wandb Run
        self._lines: dict[str, str] = {}
        self._logged_params: set[str] = set()
        self._closed = False
        mon = cfg.monitoring
        self._patient_data_to_wandb = mon.wandb.log_patient_data
        tags = redact(tags or {})
        if tensorboard_dir is not None and mon.tensorboard:
            self._guard("TensorBoard", lambda: self._start_tensorboard(Path(tensorboard_dir)))
        if mlflow_experiment and mon.mlflow.enabled:
            self._guard("MLflow", lambda: self._start_mlflow(mon.mlflow, mlflow_experiment, tags))
        mode = wandb_mode(mon.wandb.mode)
        if wandb_project and mode != "disabled":
            self._guard("W&B", lambda: self._start_wandb(mon.wandb, wandb_project, mode, tags, job_type))

    # ---- backends -------------------------------------------------------------------------
    def _guard(self, backend: str, fn: Callable[[], Any]) -> Any:
        """Run one backend call; on failure: one warning, the backend is switched off for the rest of the run."""
        try:
            return fn()
        except Exception as exc:  # any tracker error (server down, quota, bad URI) must not stop training
            _warn(f"{backend} tracking is off for this run ({_reason(exc)}); training goes on")
            self._lines[backend] = f"{backend}: off ({_reason(exc)})"
            if backend == "TensorBoard":
                self._tb = None
            elif backend == "MLflow":
                self._mlflow = None
            else:
                self._wandb = None
            return None

    def _start_tensorboard(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self._tb = SummaryWriter(log_dir=str(log_dir))
        self._lines["TensorBoard"] = f"TensorBoard: {log_dir} (tensorboard --logdir {log_dir.parent})"

    def _start_mlflow(self, section, experiment: str, tags: dict) -> None:
        uri = section.tracking_uri
        remote = uri.startswith(("http://", "https://"))
        if remote:
            # Few retries and a short timeout: a server that dies mid-run costs seconds, not minutes.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            _probe_http(uri)
        prepare_mlflow(section)
        for name in ("alembic", "mlflow.store.db.utils"):  # schema-migration chatter of a new sqlite store
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            # A server decides its own artifact store; a local store keeps artifacts in artifact_location.
            location = None if remote else Path(section.artifact_location).resolve().as_uri()
            exp_id = client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp_id)
        run_tags = {str(k): str(v) for k, v in tags.items()}
        if section.parent_run_id:
            run_tags["mlflow.parentRunId"] = section.parent_run_id
        run = client.create_run(exp_id, tags=run_tags, run_name=self.run_name)
        self._mlflow, self._run_id = client, run.info.run_id
        self._lines["MLflow"] = f"MLflow: {redact_text(uri)} (experiment {experiment}, run {self._run_id})"

    def _start_wandb(self, section, project: str, mode: str, tags: dict, job_type: str) -> None:
        import wandb

        root = Path(section.dir)
        root.mkdir(parents=True, exist_ok=True)
        # Silent, no console capture, bounded start-up: W&B must never block or prompt.
        settings = wandb.Settings(silent=True, console="off", init_timeout=60, show_warnings=False)
        run_tags = list(section.tags) + [f"{k}:{v}"[:WANDB_TAG_LENGTH] for k, v in tags.items()]
        with redacted_argv():
            self._wandb = wandb.init(project=project, entity=section.entity, name=self.run_name, dir=str(root),
                                     mode=mode, job_type=job_type, tags=run_tags, settings=settings,
                                     reinit="create_new")
        where = f"offline in {root / 'wandb'} (sync later: wandb sync)" if mode == "offline" else "online"
        self._lines["W&B"] = f"W&B: {where} (project {project})"

    # ---- the API --------------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        flat = {k: v for k, v in flatten(redact(params)).items() if k not in self._logged_params}
        self._logged_params.update(flat)  # MLflow params are immutable: log each key once
        if not flat:
            return
        if self._tb is not None:
            text = "\n".join(f"| {k} | {v} |" for k, v in flat.items())
            self._guard("TensorBoard", lambda: self._tb.add_text("params", "| key | value |\n|---|---|\n" + text))
        if self._mlflow is not None:
            self._guard("MLflow", lambda: self._mlflow_params(flat))
        if self._wandb is not None:
            self._guard("W&B", lambda: self._wandb.config.update(flat, allow_val_change=True))

    def _mlflow_params(self, flat: dict) -> None:
        from mlflow.entities import Param

        items = [Param(re.sub(r"[^\w\-. /]", "_", k), str(v)[:MLFLOW_MAX_PARAM_LENGTH]) for k, v in flat.items()]
        for i in range(0, len(items), MLFLOW_BATCH):
            self._mlflow.log_batch(self._run_id, params=items[i:i + MLFLOW_BATCH], synchronous=True)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        values = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and v is not None}
        if not values:
            return
        if self._tb is not None:
            self._guard("TensorBoard", lambda: [self._tb.add_scalar(k, v, step) for k, v in values.items()])
        if self._mlflow is not None:
            self._guard("MLflow", lambda: self._mlflow_metrics(values, step))
        if self._wandb is not None:
            self._guard("W&B", lambda: self._wandb.log(values, step=step))

    def _mlflow_metrics(self, values: dict, step: int | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(re.sub(r"[^\w\-. /]", "_", k), v, now, step or 0) for k, v in values.items()]
        self._mlflow.log_batch(self._run_id, metrics=items, synchronous=True)

    def log_artifact(self, path, artifact_path: str | None = None, patient_data: bool = False) -> None:
        """Into the MLflow store, and to W&B; a file with per-patient content (`patient_data`: file paths,
        images, overlays) goes to W&B only when monitoring.wandb.log_patient_data says so."""
        path = Path(path)
        if self._mlflow is not None:
            log = self._mlflow.log_artifacts if path.is_dir() else self._mlflow.log_artifact
            self._guard("MLflow", lambda: log(self._run_id, str(path), artifact_path))
        if self._wandb is not None and patient_data and not self._patient_data_to_wandb:
            print(f"note: {path.name} stays local, not in W&B (per-patient content; "
                  "monitoring.wandb.log_patient_data is false)", file=sys.stderr, flush=True)
        elif self._wandb is not None:
            self._guard("W&B", lambda: self._wandb_artifact(path))

    def _wandb_artifact(self, path: Path) -> None:
        import wandb

        name = re.sub(r"[^\w\-.]", "_", f"{self.run_name}-{path.stem}")
        art = wandb.Artifact(name, type="model" if path.suffix in (".pth", ".pt", ".onnx") else "file")
        art.add_dir(str(path)) if path.is_dir() else art.add_file(str(path))
        self._wandb.log_artifact(art)

    def set_tags(self, tags: dict) -> None:
        tags = redact(tags)
        if self._mlflow is not None:
            from mlflow.entities import RunTag

            items = [RunTag(str(k), str(v)) for k, v in tags.items()]
            self._guard("MLflow", lambda: self._mlflow.log_batch(self._run_id, tags=items, synchronous=True))
        if self._wandb is not None:
            new = tuple(f"{k}:{v}"[:WANDB_TAG_LENGTH] for k, v in tags.items())
            self._guard("W&B", lambda: setattr(self._wandb, "tags", tuple(self._wandb.tags or ()) + new))

    @property
    def mlflow_run_id(self) -> str | None:
        return self._run_id if self._mlflow is not None else None

    @property
    def active(self) -> list[str]:
        """Names of the backends still on."""
        return [n for n, b in (("TensorBoard", self._tb), ("MLflow", self._mlflow), ("W&B", self._wandb)) if b]

    def targets(self) -> list[str]:
        """One human-readable line per tracker, for the start banner."""
        return list(self._lines.values()) or ["none (all trackers disabled)"]

    def close(self, status: str = "FINISHED") -> None:
        if self._closed:
            return
        self._closed = True
        if self._tb is not None:
            self._guard("TensorBoard", self._tb.close)
        if self._mlflow is not None:
            self._guard("MLflow", lambda: self._mlflow.set_terminated(self._run_id, status))
        if self._wandb is not None:
            self._guard("W&B", lambda: self._wandb.finish(exit_code=0 if status == "FINISHED" else 1))

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or (exc_type is SystemExit and not getattr(exc, "code", 0)):
            self.close("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("KILLED")
        else:
            self.close("FAILED")

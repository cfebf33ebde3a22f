"""run_experiments.py's work: train + evaluate each model in its own process, then compare.

Each child is `python train.py` / `python evaluate.py` run from the repository
root, so an out-of-memory or a crash in one model never takes the others down.
Results come from the files the children write (checkpoint metrics, evaluation_metrics.json,
medical_validation.json), not from parsing their console output.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import PROJECT_ROOT, load_config
from core.errors import UserError
from core.fileio import atomic_file, write_json_atomic
from core.redaction import redact
from core.signals import sigterm_raises
from core.tracking import experiment_name
from evaluation.gates import GATES_FAILED_EXIT  # evaluate.py: evaluated, but the gates failed

if TYPE_CHECKING:
    from core.config import Config

MLFLOW_EXPERIMENT = experiment_name("experiments")  # with the default monitoring.mlflow.experiment_prefix
RULE = "=" * 60
ERROR_HINT = re.compile(r"error|exception|out of memory|killed|traceback", re.IGNORECASE)
CHILD_STOP_S = 300  # a stopped child saves its state (train.py: last_model.pth) before it exits; then it is killed


@dataclass
class Plan:
    """The flags every child gets: the same config, overrides, demo switch and epochs.

    epochs: --epochs N for every model; otherwise experiments.epochs per model (a short comparison), or
    train.epochs with full=True (--full)."""
    config: str | None = None
    sets: list[str] = field(default_factory=list)
    demo: bool | str = False  # True or "jpeg": the demo data set; "dicom": its DICOM series variant
    epochs: int | None = None
    resplit: bool = False
    full: bool = False

    def epochs_for(self, model: str | None):
        if self.epochs is not None or self.full or model is None:
            return self.epochs
        return load_config(self.config, self.sets, self.demo, {"model": model}).experiments.epochs_for(model)

    def load(self, model: str | None = None):
        return load_config(self.config, self.sets, self.demo, {"model": model, "train.epochs": self.epochs_for(model)})


@dataclass
class Experiment:
    model: str
    status: str = "PENDING"  # SUCCESS | FAILED
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    epochs: int | None = None
    batch_size: int | None = None
    best_val_acc: float | None = None
    best_epoch: int | None = None
    test_acc: float | None = None
    macro_f1: float | None = None
    deployment_ready: bool | None = None
    error: str = ""
    settings_hash: str = ""
    resumed: bool = False
    train_log: str = ""
    eval_log: str = ""


def settings_hash(cfg: Config) -> str:
    """What decides a model's result: its recipe and every section but tracking and the model list."""
    d = cfg.to_dict()
    kept = {k: v for k, v in d.items() if k not in ("models", "monitoring", "experiments")}
    kept["recipe"] = d["models"][cfg.model]
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def child_argv(script: str, model: str, plan: Plan, parent_run_id: str | None, first: bool) -> list[str]:
    argv = [sys.executable, script, "--model", model]
    if script == "train.py":
        epochs = plan.epochs_for(model)
        argv += ["--epochs", str(epochs)] if epochs is not None else []
        argv += ["--resplit"] if plan.resplit and first else []  # one new split, shared by all models
    else:
        argv += ["--medical-validation"]
    argv += ["--demo", "jpeg" if plan.demo is True else plan.demo] if plan.demo else []
    argv += ["--config", plan.config] if plan.config else []
    for assignment in plan.sets:
        argv += ["--set", assignment]
    if parent_run_id:
        argv += ["--set", f"monitoring.mlflow.parent_run_id={parent_run_id}"]
    return argv


def last_error_line(text: str, returncode: int) -> str:
    """The line that says what went wrong: the last error-looking line near the end, else the last line."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    hint = next((ln for ln in reversed(lines[-30:]) if ERROR_HINT.search(ln)), None)
    line = hint or (lines[-1] if lines else "")
    if returncode < 0:  # killed by a signal: SIGKILL is usually the kernel's out-of-memory killer
        sig = signal.Signals(-returncode).name
        line = f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "") + (f": {line}" if line else "")
    return (line or f"exit code {returncode}")[:300]


def run_child(argv: list[str], log_path: Path, echo: bool = True) -> tuple[int, float, str]:
    """Run one child, teeing its output (progress bars included) to the console and a log; (rc, s, error)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with log_path.open("wb") as log:
        log.write(("$ " + " ".join(redact(argv)) + "\n").encode())
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
        try:
            while chunk := proc.stdout.read1(65536):
                log.write(chunk)
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            rc = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the child too; a SIGTERM (Terminated) reached only us
            stop_child(proc, log)
            raise
    seconds = round(time.perf_counter() - start, 3)
    tail = log_path.read_bytes()[-20000:].decode("utf-8", "replace")
    return rc, seconds, ("" if rc == 0 else last_error_line(tail, rc))


def stop_child(proc: subprocess.Popen, log) -> None:
    """Pass the stop on (SIGTERM: train.py saves and exits), keep its last output in the log, wait for it."""
    if proc.poll() is None:
        proc.terminate()
    try:
        rest, _ = proc.communicate(timeout=CHILD_STOP_S)  # reading on: a child blocked on a full pipe never exits
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    log.write(rest or b"")


def _read_json(path: Path, since: float) -> dict | None:
    """A child's output file, only if this run wrote it (a stale file from an older run is ignored)."""
    try:
        if path.stat().st_mtime + 1 < since:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_training_result(exp: Experiment, cfg: Config) -> None:
    from core.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(cfg.output_dir / "best_model.pth")
    except UserError as exc:
        exp.error = f"train.py: {exc}"
        return
    exp.best_val_acc = ckpt["metrics"].get("val_acc")
    exp.best_epoch = ckpt.get("epoch")


def read_evaluation_result(exp: Experiment, cfg: Config, since: float) -> None:
    metrics = _read_json(cfg.output_dir / "evaluation_metrics.json", since) or {}
    exp.test_acc = (metrics.get("accuracy") or {}).get("value")
    exp.macro_f1 = (metrics.get("macro_f1") or {}).get("value")
    validation = _read_json(cfg.output_dir / "medical_validation.json", since) or {}
    exp.deployment_ready = validation.get("deployment_ready")


def run_experiment(model: str, plan: Plan, logs: Path, parent_run_id: str | None, first: bool,
                   echo: bool = True) -> Experiment:
    """Train, then evaluate one model; every failure is recorded in the result, never raised."""
    exp = Experiment(model)
    try:
        cfg = plan.load(model)
    except UserError as exc:  # e.g. an unknown model name: the same line train.py would print
        exp.status, exp.error = "FAILED", f"error: {exc}"
        return exp
    exp.epochs, exp.batch_size, exp.settings_hash = cfg.train.epochs, cfg.recipe.batch_size, settings_hash(cfg)
    exp.train_log = str(logs / f"{model}_train.log")
    rc, exp.train_seconds, error = run_child(child_argv("train.py", model, plan, parent_run_id, first),
                                             Path(exp.train_log), echo)
    if rc != 0:
        exp.status, exp.error = "FAILED", f"train.py: {error}"
        return exp
    read_training_result(exp, cfg)
    if exp.error:
        exp.status = "FAILED"
        return exp
    exp.eval_log = str(logs / f"{model}_evaluate.log")
    started = time.time()
    rc, exp.eval_seconds, error = run_child(child_argv("evaluate.py", model, plan, parent_run_id, False),
                                            Path(exp.eval_log), echo)
    if rc not in (0, GATES_FAILED_EXIT):
        exp.status, exp.error = "FAILED", f"evaluate.py: {error}"
        return exp
    read_evaluation_result(exp, cfg, started)
    exp.status = "SUCCESS"
    return exp


def load_previous(path: Path) -> dict[str, Experiment]:
    """Earlier results by model (for --resume); {} when there are none or the file is unreadable."""
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(Experiment)}
        return {r["model"]: Experiment(**{k: v for k, v in r.items() if k in known}) for r in data["experiments"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def reusable(previous: Experiment | None, plan: Plan, model: str) -> bool:
    """Finished earlier with the same settings, and its checkpoint is still there."""
    if previous is None or previous.status != "SUCCESS":
        return False
    try:
        cfg = plan.load(model)
    except UserError:
        return False
    return previous.settings_hash == settings_hash(cfg) and (cfg.output_dir / "best_model.pth").is_file()


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def _gates(exp: Experiment) -> str:
    return {True: "✅ PASS", False: "❌ FAIL"}.get(exp.deployment_ready, "-")


def summary_lines(experiments: list[Experiment]) -> list[str]:
    """The original README's summary rows, extended with validation/test quality and the gate verdict."""
    width = max([15] + [len(e.model) for e in experiments])
    lines = [" EXPERIMENT SUMMARY", RULE]
    for e in experiments:
        status = "✅ SUCCESS" if e.status == "SUCCESS" else "❌ FAILED "
        epochs = "-" if e.epochs is None else e.epochs
        batch = "-" if e.batch_size is None else e.batch_size
        f1 = "-" if e.macro_f1 is None else f"{e.macro_f1:.3f}"
        lines.append(f"{e.model:<{width}} | {status} | {e.train_seconds:.2f}s | Epochs: {epochs} | Batch: {batch} | "
                     f"Val acc: {_pct(e.best_val_acc)} | Test acc: {_pct(e.test_acc)} | Macro F1: {f1} | "
                     f"Gates: {_gates(e)}" + (" (resumed)" if e.resumed else ""))
        if e.error:
            lines.append(f"{'':<{width}}   └─ {e.error}")
    return lines


def write_summary(experiments: list[Experiment], out_dir: Path, meta: dict) -> list[Path]:
    """experiments_summary.csv / .json and experiments_comparison.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [asdict(e) for e in experiments]
    csv_path, json_path = out_dir / "experiments_summary.csv", out_dir / "experiments_summary.json"
    with atomic_file(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(Experiment)])
        writer.writeheader()
        writer.writerows(rows)
    write_json_atomic(json_path, dict(meta, experiments=rows))
    return [csv_path, json_path, experiments_plot(experiments, out_dir / "experiments_comparison.png")]


def experiments_plot(experiments: list[Experiment], path: Path) -> Path:
    """Validation/test accuracy and macro F1 per model beside the training time; failed models marked."""
    import numpy as np

    from evaluation.plots import legend_above, subplots

    names = [e.model for e in experiments]
    x = np.arange(len(names))
    fig, (ax, ax_t) = subplots(1, 2, figsize=(5 + 1.8 * len(names), 4.5))
    series = (("best val acc", "best_val_acc"), ("test acc", "test_acc"), ("test macro F1", "macro_f1"))
    for i, (label, key) in enumerate(series):
        values = [getattr(e, key) if getattr(e, key) is not None else np.nan for e in experiments]
        ax.bar(x + (i - 1) * 0.27, values, 0.27, label=label)
    for xi, e in zip(x, experiments):
        if e.status != "SUCCESS":
            ax.text(xi, 0.02, "FAILED", ha="center", color="tab:red", rotation=90)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    legend_above(ax, "Quality per model")
    ax.grid(axis="y", alpha=0.3)
    ax_t.bar(x, [e.train_seconds for e in experiments], 0.5, color="tab:gray")
    ax_t.set_xticks(x, names, rotation=20, ha="right")
    ax_t.set_ylabel("seconds")
    ax_t.set_title("Training time", pad=20)  # level with the quality title above its legend
    ax_t.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as fh:
        fig.savefig(fh, format="png", dpi=110)
    return path


def epochs_line(plan: Plan, models: list[str]) -> str:
    if plan.epochs is not None:
        return f"{plan.epochs} each (--epochs)"
    if plan.full:
        return "train.epochs each (--full)"
    per_model = {}
    for m in models:
        try:
            per_model[m] = plan.epochs_for(m)
        except UserError:  # an unknown model: it fails on its own turn, with the reason
            per_model[m] = "-"
    if None in per_model.values():
        return "train.epochs each (experiments.epochs: null)"
    return ", ".join(f"{m} {e}" for m, e in per_model.items()) + " (experiments.epochs; --epochs N or --full)"


def parent_experiment(cfg: Config) -> str:
    return experiment_name("experiments", prefix=cfg.monitoring.mlflow.experiment_prefix)


def _parent_tracker(cfg: Config, models: list[str]):
    """The parent MLflow run the training runs nest under (None, with one warning, if MLflow fails)."""
    from core.tracking import RunTracker

    name = "experiments-" + datetime.now().strftime("%Y%m%d-%H%M%S")
    return RunTracker(cfg, run_name=name, mlflow_experiment=parent_experiment(cfg), wandb_project=None,
                      tags={"models": ",".join(models)}, job_type="experiments")


def _log_to_parent(tracker, experiments: list[Experiment], files: list[Path]) -> None:
    for e in experiments:
        tracker.log_metrics({f"{e.model}.{k}": getattr(e, k) for k in
                             ("best_val_acc", "test_acc", "macro_f1", "train_seconds", "eval_seconds")})
        tracker.log_metrics({f"{e.model}.success": float(e.status == "SUCCESS")})
    for path in files:
        tracker.log_artifact(path, "experiments")


def run_all(plan: Plan, models: list[str] | None = None, resume: bool = False, echo: bool = True,
            log=print) -> tuple[list[Experiment], list[Path]]:
    """Every model in turn (the config's experiments.models by default), then the summary files."""
    base = plan.load()
    models = models or list(base.experiments.models)
    out_dir = Path(base.train.output_dir) / "experiments"
    previous = load_previous(out_dir / "experiments_summary.json") if resume else None
    tracker = _parent_tracker(base, models)
    parent = tracker.mlflow_run_id
    log(f"🧠 Brain Cancer MRI Classification - Model Comparison\n{RULE}")
    log(f"Models: {', '.join(models)} | epochs: {epochs_line(plan, models)} | logs: {out_dir / 'logs'}"
        + (f"\nMLflow parent run: {parent} (experiment {parent_experiment(base)})" if parent else ""))
    experiments: list[Experiment] = []
    status = "KILLED"
    try:
        with sigterm_raises():  # SIGTERM stops the running child too, and the summary below is still written
            for exp in run_models(models, plan, out_dir, parent, previous, echo, log):
                experiments.append(exp)
        status = "FINISHED"
    finally:  # Ctrl-C or SIGTERM still leaves the summary of the models that finished
        meta = {"created": datetime.now().astimezone().isoformat(timespec="seconds"), "models": models,
                "epochs": plan.epochs, "full": plan.full, "demo": plan.demo, "config": plan.config,
                "sets": redact(plan.sets),
                "mlflow_parent_run_id": parent, "interrupted": status != "FINISHED"}
        files = write_summary(experiments, out_dir, meta)
        _log_to_parent(tracker, experiments, files)
        tracker.close(status)
    return experiments, files


def run_models(models: list[str], plan: Plan, out_dir: Path, parent: str | None,
               previous: dict[str, Experiment] | None, echo: bool, log) -> Iterator[Experiment]:
    """Train and evaluate each model in turn, yielding its result (--resume: reuse the results in `previous`)."""
    for i, model in enumerate(models, 1):
        log(f"\n🔬 Experiment {i}/{len(models)}")
        if previous is not None and reusable(previous.get(model), plan, model):
            yield replace(previous[model], resumed=True)
            log(f"⏭️  Skipping {model}: finished earlier with the same settings (--resume)")
            continue
        log(f"🚀 Starting experiment: {model}")
        try:
            exp = run_experiment(model, plan, out_dir / "logs", parent, first=i == 1, echo=echo)
        except KeyboardInterrupt:  # its child has been stopped; the summary says so, then the stop goes on
            yield Experiment(model, status="FAILED", error="interrupted (Ctrl-C or SIGTERM)")
            raise
        yield exp
        log(f"✅ {model}: done in {exp.train_seconds + exp.eval_seconds:.2f}s" if exp.status == "SUCCESS"
            else f"❌ {model}: FAILED: {exp.error}")

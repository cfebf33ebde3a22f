"""test_mlflow_setup.py's work: what works on this machine, and what to do about what does not.

Each check reads, never writes: no run is logged, no data set generated, no weights downloaded.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import yaml

from core.tracking import _probe_http, wandb_mode
from data.images import is_dicom, is_image_file

if TYPE_CHECKING:
    from core.config import Config

MARKS = {"ok": "✅", "note": "ℹ️ ", "warn": "⚠️ ", "fail": "❌"}


@dataclass
class Probe:
    name: str
    status: str  # ok | note | warn | fail
    detail: str
    todo: str = ""


def check_torch() -> list[Probe]:
    import torch
    import torchvision

    checks = [Probe("PyTorch", "ok", f"torch {torch.__version__}, torchvision {torchvision.__version__} "
                                     f"(Python {platform.python_version()})")]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        checks.append(Probe("CUDA", "ok", f"CUDA {torch.version.cuda}: {torch.cuda.device_count()} GPU(s): {names}"))
    else:
        built = f"this torch is built for CUDA {torch.version.cuda} but sees no GPU" if torch.version.cuda \
            else "this torch build has no CUDA"
        checks.append(Probe("CUDA", "warn", f"{built}: training and evaluation run on the CPU ({os.cpu_count()} "
                                            "cores)",
                            "fine for --demo; for the real data set at 224 px use a machine with an NVIDIA GPU "
                            "(and a CUDA build of torch)"))
    return checks


def check_mlflow(cfg: Config) -> Probe:
    section = cfg.monitoring.mlflow
    uri = section.tracking_uri
    if not section.enabled:
        return Probe("MLflow store", "note", "tracking is off (monitoring.mlflow.enabled: false)",
                     "the registry (register_model.py, inference_with_mlflow.py) needs it on")
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            _probe_http(uri)
        except ConnectionError as exc:
            return Probe("MLflow store", "fail", str(exc),
                         "start the server: ./start_mlflow_server.sh (or use the local store: --set "
                         "monitoring.mlflow.tracking_uri=sqlite:///mlflow.db)")
        return _store_contents(uri, f"server {uri}")
    if scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            return Probe("MLflow store", "ok", f"{uri}: not created yet; the first run creates it (tracking and "
                                               "registry, no server needed)")
        return _store_contents(uri, f"{uri} ({path.stat().st_size / 2**20:.1f} MB)")
    if scheme in ("", "file"):
        return Probe("MLflow store", "fail", f"{uri} is a file store, which MLflow 3 refuses (and has no registry)",
                     "set monitoring.mlflow.tracking_uri: sqlite:///mlflow.db")
    return _store_contents(uri, uri)


def _store_contents(uri: str, where: str) -> Probe:
    """Experiments and registered models (with their aliases) in the store, read-only."""
    try:
        if uri.startswith("sqlite:///"):
            # read the file directly: opening it through MLflow would migrate an old schema in place
            with sqlite3.connect(f"file:{uri.removeprefix('sqlite:///')}?mode=ro", uri=True) as db:
                experiments = db.execute("SELECT count(*) FROM experiments WHERE lifecycle_stage='active'").fetchone()
                models = db.execute("SELECT name FROM registered_models ORDER BY name").fetchall()
                aliases = db.execute("SELECT name, alias, version FROM registered_model_aliases").fetchall()
            n_exp, names = experiments[0], [m[0] for m in models]
        else:
            from mlflow import MlflowClient

            client = MlflowClient(uri, registry_uri=uri)
            n_exp = len(client.search_experiments(max_results=1000))
            registered = client.search_registered_models(max_results=1000)
            names = [m.name for m in registered]
            aliases = [(m.name, a, v) for m in registered for a, v in (m.aliases or {}).items()]
    except Exception as exc:  # a locked, corrupt or foreign database, a server error: say so, do not crash
        return Probe("MLflow store", "fail", f"{where}: unreadable ({type(exc).__name__}: {str(exc)[:200]})",
                     "check the URI in monitoring.mlflow.tracking_uri; a corrupt mlflow.db can be moved away")
    by_model = {n: ", ".join(f"{a} -> v{v}" for m, a, v in aliases if m == n) for n in names}
    listed = "; ".join(f"{n} ({by_model[n] or 'no alias'})" for n in names[:6]) + (" ..." if len(names) > 6 else "")
    return Probe("MLflow store", "ok", f"{where}: {n_exp} experiment(s), {len(names)} registered model(s)"
                 + (f": {listed}" if names else ""),
                 "" if names else "register a model after evaluation: python register_model.py --model resnet18 "
                                  "--version 1.0.0")


def check_wandb(cfg: Config) -> Probe:
    mode = wandb_mode(cfg.monitoring.wandb.mode)
    project = cfg.monitoring.wandb.project
    if mode == "disabled":
        return Probe("W&B", "note", "disabled (monitoring.wandb.mode)")
    if importlib.util.find_spec("wandb") is None:
        return Probe("W&B", "warn", f"mode {mode}, but the wandb package is not installed", "pip install wandb")
    if mode == "online":
        return Probe("W&B", "ok", f"online (API key configured), project {project}")
    return Probe("W&B", "ok", f"offline: runs are kept in {Path(cfg.monitoring.wandb.dir) / 'wandb'} (project "
                              f"{project}); nothing leaves this machine",
                 "to publish them: wandb login, then wandb sync wandb/offline-run-*")


def check_weights(cfg: Config) -> list[Probe]:
    from models.zoo import get_spec, hub_cache_file, is_weights_name

    checks = []
    for name, recipe in cfg.models.items():
        label = f"weights {name}"
        if recipe.weights and not is_weights_name(recipe.weights):
            found = Path(recipe.weights).is_file()
            checks.append(Probe(label, "ok" if found else "fail", f"local file {recipe.weights}"
                                + ("" if found else " not found"), "" if found else "fix models.{name}.weights"))
            continue
        if not recipe.pretrained:
            checks.append(Probe(label, "ok", "random initialization (pretrained: false)"))
            continue
        try:
            cached = hub_cache_file(get_spec(name), recipe.weights)
        except Exception as exc:  # a weights name torchvision does not know: the config's error, shown here
            checks.append(Probe(label, "fail", str(exc)))
            continue
        path, url = cached
        if path.is_file():
            checks.append(Probe(label, "ok", f"ImageNet weights on this machine: {path}"))
        else:
            checks.append(Probe(label, "warn", f"ImageNet weights not on this machine ({path.name})",
                                f"the first training downloads them from {url}; offline: copy that file to "
                                f"{path.parent}/, or pass --weights PATH or --no-pretrained"))
    return checks


def _count_images(class_root: Path) -> dict[str, int]:
    folders = sorted(p for p in class_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {f.name: sum(1 for p in f.rglob("*") if p.is_file() and (is_image_file(p) or is_dicom(p)))
            for f in folders}


def check_dataset(cfg: Config) -> Probe:
    from data.manifest import manifest_path_for

    path = Path(cfg.dataset.path)
    name = "demo data set" if cfg.dataset.demo else "data set"
    if not path.is_dir():
        todo = ("generated by the first script run with --demo" if cfg.dataset.demo else
                "python download_data.py (Mendeley Data, or --archive PATH offline), or point dataset.path at "
                "your ImageFolder tree")
        return Probe(name, "warn", f"not found at {path}", todo)
    counts = _count_images(path)
    total = sum(counts.values())
    if not counts or total == 0:
        return Probe(name, "fail", f"{path} holds no class folders with images", "one folder per class, images in it")
    manifest = manifest_path_for(cfg)
    split = f"; split manifest {manifest}" if manifest.is_file() else "; no split manifest yet (a first run writes it)"
    return Probe(name, "ok", f"{path}: {total:,} images in {len(counts)} classes ("
                 + ", ".join(f"{c} {n}" for c, n in counts.items()) + ")" + split)


def check_demo(cfg: Config) -> Probe:
    """The embedded demo: generated or not, and which models have a checkpoint trained on it."""
    marker = Path(cfg.demo.root) / ".complete"
    try:
        generated = json.loads(marker.read_text())
    except (OSError, ValueError):
        generated = None
    trained = []
    for resolved in sorted(Path(cfg.train.output_dir).glob("*_outputs/resolved_config.yaml")):
        try:
            data = yaml.safe_load(resolved.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if (data.get("dataset") or {}).get("demo") and (resolved.parent / "best_model.pth").is_file():
            trained.append(data.get("model", resolved.parent.name.removesuffix("_outputs")))
    if generated is None:
        return Probe("demo", "note", f"not generated yet ({cfg.demo.root})",
                     "python train.py --model resnet18 --demo generates it (synthetic phantoms, not medical data) "
                     "and trains on the CPU in a few minutes")
    images = generated.get("n_per_class", 0) * 3
    models = f"; trained on it: {', '.join(trained)}" if trained else "; no model trained on it yet"
    return Probe("demo", "ok", f"synthetic demo data set in {cfg.demo.root} ({images} images){models}",
                 "" if trained else "python train.py --model resnet18 --demo")


def run_checks(cfg: Config, demo_cfg: Config) -> list[Probe]:
    """Every check, in the order a newcomer meets them; `demo_cfg` is the config with the demo overlay."""
    return [*check_torch(), check_mlflow(cfg), check_wandb(cfg), *check_weights(cfg), check_dataset(cfg),
            check_demo(demo_cfg)]


def format_checks(checks: list[Probe]) -> list[str]:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{MARKS[c.status]} {c.name:<{width}}  {c.detail}")
        if c.todo:
            lines.append(f"   {'':<{width}}  → {c.todo}")
    counts = {s: sum(c.status == s for c in checks) for s in MARKS}
    lines.append(f"Summary: {counts['ok']} ok, {counts['note']} note(s), {counts['warn']} to look at, "
                 f"{counts['fail']} failing")
    return lines

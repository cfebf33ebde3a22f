"""CPU training in bf16 against fp32 on the demo: accuracy parity, speed and peak memory.

train.py --demo runs twice, with performance.cpu_precision=fp32 and =bf16, each in its own process (same seed,
split and recipe). Both best checkpoints are then scored in fp32 on the validation split (and the test split),
through evaluate.py's own loop; bf16 is at parity when its validation accuracy lies inside the fp32 run's 95%
stratified-bootstrap interval. Beside it: wall time, training images/s and the training process's peak
resident memory (the cache is built before the first run, so neither run pays for it).

    python benchmarks/bench_precision.py                  # resnet18 on the demo (64 px): ~3 min per run on 2 cores
    python benchmarks/bench_precision.py --epochs 5 --precisions fp32 bf16
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

try:
    from benchmarks import harness
except ImportError:  # run as a file
    import harness

import torch

from core.hardware import usable_cpus
from data.manifest import prepare_split
from data.normalization import resolve_normalization
from data.preprocess import Preprocessor
from evaluation.prediction import predict_split
from evaluation.source import open_checkpoint
from evaluation.uncertainty import bootstrap_intervals
from models.loading import model_from_checkpoint

IMG_S = re.compile(r"\| ([\d.]+) img/s \|")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="bf16 vs fp32 training on the demo: validation accuracy with fp32's 95% "
                                            "CI, images/s, peak memory")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--epochs", type=int, default=None, help="default: the demo config's")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="the first is the reference")
    p.add_argument("--data-dir", default=str(harness.DEFAULT_DATA_DIR), help="checkpoints and logs go here")
    p.add_argument("--smoke", action="store_true", help="1 epoch on a tiny demo: checks that the benchmark runs")
    return p


def overrides(args) -> list[str]:
    """--set values of every run: outputs in the benchmark's folder, trackers off, tiny sizes with --smoke."""
    out = harness.Path(args.data_dir) / "precision"
    sets = ["monitoring.mlflow.enabled=false",
            "monitoring.wandb.mode=disabled", "monitoring.tensorboard=false", f"model={args.model}"]
    if args.smoke:
        sets += [f"demo.root={out / 'demo'}", f"dataset.path={out / 'demo' / 'Brain_Cancer raw MRI data/Brain_Cancer'}",
                 f"dataset.stats_path={out / 'demo' / 'stats.json'}", f"dataset.manifest_dir={out / 'demo' / 'splits'}",
                 f"dataset.cache_dir={out / 'demo' / 'cache'}", "demo.n_per_class=12", "dataset.img_size=32",
                 "demo.size=48", "evaluation.bootstrap_samples=100"]
    return sets


def train_once(args, precision: str, sets: list[str]) -> dict:
    """One train.py run in its own process; wall time, images/s per epoch and the process's peak RSS."""
    out = harness.Path(args.data_dir) / "precision" / precision
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(harness.ROOT / "train.py"), "--demo", "--seed", str(args.seed),
           *(f"--set={s}" for s in sets + [f"train.output_dir={out}", f"performance.cpu_precision={precision}"])]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    log = out / "train.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=harness.ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"train.py ({precision}) failed with exit code {proc.returncode}; see {log}")
    rates = [float(m) for m in IMG_S.findall(log.read_text())]
    return {"wall_s": time.perf_counter() - start, "images_per_s": harness.spread(rates) if rates else None,
            "peak_rss_mb": usage.ru_maxrss / 1024, "log": str(log),
            "checkpoint": str(out / f"{args.model}_outputs" / "best_model.pth")}


def score(cfg, checkpoint: str) -> dict:
    """fp32 scores of a best checkpoint on the validation and test splits: (labels, predictions) each."""
    opened = open_checkpoint(cfg, checkpoint, cfg.model, log=lambda *a, **k: None)
    model = model_from_checkpoint(opened.ckpt, "cpu")
    pre = Preprocessor(opened.contract.mean, opened.contract.std)
    out = {"run_val_acc": float(opened.ckpt["metrics"]["val_acc"]), "epoch": int(opened.ckpt["epoch"])}
    for name in ("val", "test"):
        s = predict_split(cfg, opened.split, name, model, pre, opened.contract.img_size, torch.device("cpu"))
        out[name] = (s.y_true, s.y_prob.argmax(1))
    return out


def accuracy_ci(y, pred, n_classes: int, ev) -> tuple[float, float, float]:
    low, high = bootstrap_intervals(y, pred, n_classes, ev.bootstrap_samples, ev.confidence,
                                    ev.bootstrap_seed)["accuracy"]
    return float((y == pred).mean()), float(low), float(high)


def run(args) -> dict:
    torch.set_num_threads(usable_cpus())
    sets = overrides(args)
    cfg = harness.load_config(None, sets + [f"train.seed={args.seed}"], demo=True)
    split = prepare_split(cfg, log=lambda *a, **k: None)  # demo data, split, statistics and cache: before timing
    resolve_normalization(cfg, split, cfg.img_size, log=lambda *a, **k: None)
    runs = {p: train_once(args, p, sets) for p in args.precisions}
    k = len(split.class_names)
    results = {}
    for p, r in runs.items():
        scored = score(cfg, r["checkpoint"])
        results[p] = {**r, "epoch": scored["epoch"], "run_val_acc": scored["run_val_acc"],
                      **{f"{s}_acc": accuracy_ci(*scored[s], k, cfg.evaluation) for s in ("val", "test")}}
    ref = results[args.precisions[0]]
    for r in results.values():
        acc, (_, low, high) = r["val_acc"][0], ref["val_acc"]
        r["val_inside_reference_ci"] = bool(low <= acc <= high)
        r["peak_rss_vs_reference"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
        if r["images_per_s"] and ref["images_per_s"]:
            r["speed_vs_reference"] = r["images_per_s"]["median"] / ref["images_per_s"]["median"]
    return {"runs": results, "reference": args.precisions[0], "n_val": len(split.rows_for("val"))}


def main(args) -> int:
    if args.smoke:
        args.epochs = 1
    results = run(args)
    settings = {"model": args.model, "epochs": args.epochs or "demo config", "seed": args.seed,
                "threads": usable_cpus()}
    rows = []
    for p, r in results["runs"].items():
        acc, low, high = r["val_acc"]
        rows.append([p, f"{acc:.2%} [{low:.2%}, {high:.2%}]", f"{r['run_val_acc']:.2%}", f"{r['test_acc'][0]:.2%}",
                     "yes" if r["val_inside_reference_ci"] else "NO",
                     r["images_per_s"]["median"] if r["images_per_s"] else "-", r.get("speed_vs_reference", "-"),
                     r["peak_rss_mb"], r["peak_rss_vs_reference"], r["wall_s"]])
    harness.report("bench_precision", settings,
                   ["precision", f"val acc (fp32 scoring) [95% CI], {results['n_val']} images", "val acc in run",
                    "test acc", f"inside {results['reference']} CI", "img/s", "x speed", "peak RSS MB", "x memory",
                    "wall s"], rows, results)
    return 0


if __name__ == "__main__":
    main(get_args_parser().parse_args())

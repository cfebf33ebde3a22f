"""Which series rule: the series accuracy of the top-k mean for several k, on the validation split (where k is
chosen) and on the test split (reported), beside the slice-level accuracy.

The model is the DICOM demo's (python train.py --model resnet18 --demo dicom): series of 16-32 slices whose lesion
fills a run of 30-60% of them. k = 1 is the single highest slice, k = all the mean over every slice.

    python benchmarks/bench_series_rule.py                         # the --demo dicom checkpoint of resnet18
    python benchmarks/bench_series_rule.py --k 1 2 3 5 8 64 --config my.yaml --checkpoint path/best_model.pth
"""
from __future__ import annotations

import argparse

try:
    from benchmarks import harness
except ImportError:  # run as a file
    import harness

import torch

from core.config import load_config
from data.preprocess import Preprocessor
from evaluation.prediction import predict_split
from evaluation.series_level import evaluate_series
from evaluation.source import open_checkpoint
from evaluation.uncertainty import bootstrap_intervals
from models.loading import model_from_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="series accuracy of the top-k rule for several k, validation and test")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--config", default=None, help="default: the --demo dicom configuration")
    p.add_argument("--checkpoint", default=None, help="default: the model's best_model.pth")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 5, 8, 64], help="k values (64: every slice)")
    return p


def accuracy_ci(y, pred, n_classes: int, ev) -> str:
    low, high = bootstrap_intervals(y, pred, n_classes, ev.bootstrap_samples, ev.confidence,
                                    ev.bootstrap_seed)["accuracy"]
    return f"{float((y == pred).mean()):.2%} [{low:.2%}, {high:.2%}]"


def figures(cfg, split, scored, classes: list[str], k: int) -> tuple[str, str, float]:
    cfg.series.top_k = k
    ev = evaluate_series(cfg, split, scored.name, scored.y_prob, classes)
    if ev is None:
        raise SystemExit(f"the {scored.name} split holds no DICOM series: use the --demo dicom data or a DICOM tree")
    r = ev.record
    return _ci(r["accuracy"]), _ci(r["balanced_accuracy"]), r["n_series"]


def _ci(d: dict) -> str:
    return f"{d['value']:.2%} [{d['ci_low']:.2%}, {d['ci_high']:.2%}]"


def main(args) -> int:
    cfg = load_config(args.config, demo=False if args.config else "dicom", overrides={"model": args.model})
    opened = open_checkpoint(cfg, args.checkpoint, args.model, log=lambda *a, **k: None)
    model = model_from_checkpoint(opened.ckpt, "cpu")
    pre = Preprocessor(opened.contract.mean, opened.contract.std)
    classes = opened.class_names
    scored = {name: predict_split(cfg, opened.split, name, model, pre, opened.contract.img_size, torch.device("cpu"))
              for name in ("val", "test")}
    rows, results = [], {}
    for name, s in scored.items():
        acc = accuracy_ci(s.y_true, s.y_prob.argmax(1), len(classes), cfg.evaluation)
        rows.append([name, "slice level", acc, "-", str(len(s.y_true))])
        for k in args.k:
            acc, bal, n = figures(cfg, opened.split, s, classes, k)
            rows.append([name, f"top-{k} mean", acc, bal, str(n)])
            results[f"{name}_top{k}"] = {"accuracy": acc, "balanced_accuracy": bal, "n_series": n}
    harness.report("bench_series_rule", {"model": args.model, "checkpoint": str(opened.path),
                                         "epoch": opened.ckpt["epoch"]},
                   ["split", "rule", "accuracy [95% CI]", "balanced accuracy [95% CI]", "n"], rows, results)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(get_args_parser().parse_args())

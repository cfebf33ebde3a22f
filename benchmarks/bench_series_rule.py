"""Which series rule: the top-k mean for several k, on the DICOM demo's series and on series drawn from its slices.

The model is the DICOM demo's (python train.py --model resnet18 --demo dicom): series of 16-32 slices whose lesion
fills a run of 30-60% of them, and slices without it that carry the series' class. Two measurements per k:
- the series accuracy on the validation split (where k is chosen) and the test split (reported), beside the
  slice-level accuracy;
- a stress test on the validation split's own slice probabilities: series of `--slices` slices of which only L show
  the lesion (the demo's files say which do), drawn many times per class and L, because a real lesion can be as
  short as one or two slices (a small pituitary adenoma on 5 mm slices); and the same with one slice replaced by a
  lesion slice of another class (a look-alike: an artefact, a vessel). Series accuracy, and the share of series the
  disagreement check (series.disagree_above) refers, per k and L.
k = 1 is the single highest slice, a k above the series' length the mean over every slice.

    python benchmarks/bench_series_rule.py                         # the --demo dicom checkpoint of resnet18
    python benchmarks/bench_series_rule.py --k 1 2 3 5 8 64 --runs 1 2 3 5 8
"""
from __future__ import annotations

import argparse

try:
    from benchmarks import harness
except ImportError:  # run as a file
    import harness

import numpy as np
import pydicom
import torch

from data.images import split_frame_name
from data.preprocess import Preprocessor
from evaluation.prediction import predict_split
from evaluation.series_level import evaluate_series
from evaluation.source import open_checkpoint
from evaluation.uncertainty import bootstrap_intervals
from models.loading import model_from_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="series accuracy of the top-k rule for several k: the demo's series and a "
                                            "stress test with short lesion runs")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--config", default=None, help="default: the --demo dicom configuration")
    p.add_argument("--checkpoint", default=None, help="default: the model's best_model.pth")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 5, 8, 64], help="k values (64: every slice)")
    p.add_argument("--runs", type=int, nargs="+", default=[1, 2, 3, 5], help="lesion slices per drawn series")
    p.add_argument("--slices", type=int, default=24, help="slices per drawn series")
    p.add_argument("--draws", type=int, default=2000, help="drawn series per class and run length")
    return p


def _ci(d: dict) -> str:
    return f"{d['value']:.2%} [{d['ci_low']:.2%}, {d['ci_high']:.2%}]"


def slice_accuracy(scored, n_classes: int, ev) -> str:
    pred = scored.y_prob.argmax(1)
    low, high = bootstrap_intervals(scored.y_true, pred, n_classes, ev.bootstrap_samples, ev.confidence,
                                    ev.bootstrap_seed)["accuracy"]
    return f"{float((scored.y_true == pred).mean()):.2%} [{low:.2%}, {high:.2%}]"


def lesion_flags(split, name: str) -> np.ndarray:
    """Which slices of the split show the lesion, as the demo's generator wrote it (ImageComments)."""
    return np.array([str(pydicom.dcmread(split.root / split_frame_name(r.path)[0], stop_before_pixels=True)
                         .get("ImageComments", "")).endswith(", lesion") for r in split.rows_for(name)])


def draw(rng, scored, lesion: np.ndarray, c: int, run: int, shape: tuple[int, int], look_alike: bool) -> np.ndarray:
    """Slice indices (draws, slices) of series of class c: `run` lesion slices of c, the rest without a lesion, one
    of them replaced by a lesion slice of another class when `look_alike` (an artefact that mimics a lesion)."""
    draws, n_slices = shape
    empty = np.flatnonzero(~lesion)
    pool = np.flatnonzero(lesion & (scored.y_true == c))
    idx = np.concatenate([rng.choice(pool, (draws, run)), rng.choice(empty, (draws, n_slices - run))], axis=1)
    if look_alike:
        idx[:, -1] = rng.choice(np.flatnonzero(lesion & (scored.y_true != c)), draws)
    return idx


def stress(scored, lesion: np.ndarray, ks: list[int], cases: list[tuple[int, bool]], n_slices: int, draws: int,
           disagree_above: float) -> dict:
    """{(k, (L, look-alike)): (accuracy, disagreement refer rate)} over series drawn from the split's slices."""
    rng = np.random.default_rng(0)  # the same draws on every run
    n_classes = scored.y_prob.shape[1]
    out = {}
    for case in cases:
        hits, refer = {k: 0 for k in ks}, {k: 0 for k in ks}
        for c in range(n_classes):
            idx = draw(rng, scored, lesion, c, case[0], (draws, n_slices), case[1])
            ranked = -np.sort(-scored.y_prob[idx], axis=1)  # (draws, slices, K), each class's highest first
            for k in ks:
                scores = ranked[:, :k].mean(axis=1)  # (draws, K)
                predicted = scores.argmax(1)
                hits[k] += int((predicted == c).sum())
                others = scores.copy()
                others[np.arange(draws), predicted] = -1
                refer[k] += int((others.max(1) >= disagree_above).sum())
        for k in ks:
            out[k, case] = (hits[k] / (draws * n_classes), refer[k] / (draws * n_classes))
    return out


def main(args) -> int:
    cfg = harness.load_config(args.config, demo=False if args.config else "dicom", overrides={"model": args.model})
    opened = open_checkpoint(cfg, args.checkpoint, args.model, log=lambda *a, **k: None)
    model = model_from_checkpoint(opened.ckpt, "cpu")
    pre = Preprocessor(opened.contract.mean, opened.contract.std)
    classes = opened.class_names
    scored = {name: predict_split(cfg, opened.split, name, model, pre, opened.contract.img_size, torch.device("cpu"))
              for name in ("val", "test")}
    headers = ["k", *(f"{name} series acc [95% CI]" for name in scored)]
    rows = [["slices", *(slice_accuracy(s, len(classes), cfg.evaluation) for s in scored.values())]]
    results = {}
    for k in args.k:
        cfg.series.top_k = k
        row = [str(k)]
        for name, s in scored.items():
            r = evaluate_series(cfg, opened.split, name, s.y_prob, classes).record
            row.append(_ci(r["accuracy"]))
            results[f"{name}_top{k}"] = {"accuracy": r["accuracy"], "n_series": r["n_series"]}
        rows.append(row)
    cases = [(run, False) for run in args.runs] + [(run, True) for run in args.runs if run > 1]
    drawn = stress(scored["val"], lesion_flags(opened.split, "val"), args.k, cases, args.slices, args.draws,
                   cfg.series.disagree_above)
    headers += [f"L={run}{' +1 look-alike' if odd else ''}: acc / refer" for run, odd in cases]
    for row, k in zip(rows[1:], args.k):
        row += [f"{drawn[k, case][0]:.1%} / {drawn[k, case][1]:.1%}" for case in cases]
    rows[0] += ["-"] * len(cases)
    results["stress"] = {f"top{k}_run{run}{'_look_alike' if odd else ''}": {"accuracy": a, "disagree_refer": r}
                         for (k, (run, odd)), (a, r) in drawn.items()}
    harness.report("bench_series_rule", {"model": args.model, "checkpoint": str(opened.path),
                                         "epoch": opened.ckpt["epoch"], "drawn_slices": args.slices,
                                         "draws": args.draws, "disagree_above": cfg.series.disagree_above},
                   headers, rows, results)
    return 0


if __name__ == "__main__":
    main(get_args_parser().parse_args())

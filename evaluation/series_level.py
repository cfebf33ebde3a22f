"""Series-level evaluation: the split's DICOM slices grouped into their series, each series read by the series rule
(series/rule.py), and the same figures as the slice level (bootstrap intervals over series, stratified by class).

A series is one case: its slices are not independent samples, so the slice-level intervals are narrower than the
evidence; the series-level ones are the figures a per-series product (the DICOM node, POST /v1/series) is judged
by. Every slice of a series carries the series' label (its class folder), slices without the lesion included.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.fileio import atomic_file
from data.images import ImageReadError, is_dicom, split_frame_name
from evaluation.record import score_predictions
from series.rule import SeriesResult, SeriesRule, aggregate
from series.slices import Series, group_series, read_slices

if TYPE_CHECKING:
    from core.config import Config
    from data.manifest import Split


@dataclass
class SeriesRows:
    """The series of one split: for each, its slices' row indices in the split (in slice order) and its label."""
    series: list[Series] = field(default_factory=list)
    rows: list[list[int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def series_rows(split: Split, name: str) -> SeriesRows | None:
    """The split's DICOM rows grouped into series (None when it has none: an image-file data set)."""
    rows = split.rows_for(name)
    index = {r.path: i for i, r in enumerate(rows)}
    files = dict.fromkeys(split_frame_name(r.path)[0].as_posix() for r in rows
                          if is_dicom(split_frame_name(r.path)[0]))
    if not files:
        return None
    out, slices = SeriesRows(), []
    for rel in files:
        try:
            slices.extend(read_slices(split.root / rel, rel))
        except (ImageReadError, OSError) as exc:
            out.notes.append(f"{rel}: left out of the series level ({exc})")
    classes = {c: k for k, c in enumerate(split.class_folders)}
    for series in group_series(slices):
        members = [index[s.name] for s in series.slices if s.name in index]
        labels = {rows[i].cls for i in members}
        if len(labels) > 1:
            out.notes.append(f"series {series.series_uid} has slices in {len(labels)} class folders "
                             f"({', '.join(sorted(labels))}): left out of the series level")
            continue
        out.series.append(series)
        out.rows.append(members)
        out.labels.append(classes[labels.pop()])
    return out if out.series else None


@dataclass
class SeriesEvaluation:
    record: dict            # evaluation_metrics.json's "series"
    grouped: SeriesRows
    results: list[SeriesResult]


def evaluate_series(cfg: Config, split: Split, name: str, y_prob: np.ndarray,
                    class_names: list[str]) -> SeriesEvaluation | None:
    """Series figures of one split from its slices' probabilities (rows as in the split), or None without series."""
    grouped = series_rows(split, name)
    if grouped is None:
        return None
    rule = SeriesRule.from_config(cfg.series)
    results = [aggregate(np.asarray(y_prob)[rows], class_names, rule) for rows in grouped.rows]
    probs = np.array([[r.probabilities[c] for c in class_names] for r in results])
    scores = score_predictions(np.asarray(grouped.labels), probs, class_names, cfg.evaluation)
    sizes = [len(r) for r in grouped.rows]
    record = {"rule": rule.name, "top_k": rule.top_k, "n_series": len(sizes), **scores,
              "slices_per_series": {"min": min(sizes), "median": float(np.median(sizes)), "max": max(sizes)}}
    correct = int(round(scores["accuracy"]["value"] * len(sizes)))
    low, high = exact_interval(correct, len(sizes), cfg.evaluation.confidence)
    level = f"{cfg.evaluation.confidence:.0%}"
    record["notes"] = [*scores["notes"], *grouped.notes,
                       f"{correct} of {len(sizes)} series right: exact (Clopper-Pearson) {level} interval of the "
                       f"accuracy [{low:.2%}, {high:.2%}] (the bootstrap's is narrower on few series)",
                       "slices of one series are not independent samples: the slice-level intervals are narrower than "
                       "the evidence"]
    return SeriesEvaluation(record, grouped, results)


def exact_interval(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """The Clopper-Pearson interval of a proportion: honest where a bootstrap of a perfect score is a point."""
    from scipy.stats import beta

    tail = (1 - confidence) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1 - tail, successes + 1, n - successes))
    return low, high


def write_series_predictions(path: Path, ev: SeriesEvaluation, slice_paths: list[str], class_names: list[str]) -> Path:
    """One row per series: its UIDs, slice count, true and predicted class, probabilities, key slices (paths, separated
    by ";")."""
    with atomic_file(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_uid", "series_uid", "n_slices", "true_class", "predicted_class",
                         *(f"prob_{c}" for c in class_names), "key_slices"])
        for series, rows, label, r in zip(ev.grouped.series, ev.grouped.rows, ev.grouped.labels, ev.results):
            writer.writerow([series.study_uid, series.series_uid, len(rows), class_names[label], r.predicted_class,
                             *(repr(r.probabilities[c]) for c in class_names),
                             ";".join(slice_paths[rows[i]] for i in r.key_slices)])
    return Path(path)

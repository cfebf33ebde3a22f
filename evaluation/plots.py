"""Evaluation figures: each function writes one PNG.

Figures are matplotlib's Figure objects drawn straight to a file (Agg), never through pyplot's figure manager: no
backend is chosen and no process-wide state is touched, at import or at a call, so a program that shows figures
of its own keeps its backend."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from core.fileio import atomic_file


def subplots(*args, figsize: tuple[float, float], **kwargs):
    """pyplot.subplots without pyplot: (figure, axes)."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # this figure's own canvas; the process's backend stays as it is
    return fig, fig.subplots(*args, **kwargs)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_file(path) as fh:
        fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=120)
    return path


def legend_above(ax, title: str) -> None:
    """The legend in one row between the title and the bars: never over a bar, whatever the values."""
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles), fontsize=8, frameon=False)
    ax.set_title(title, pad=20)


def confusion_matrix_plot(cm, class_names: list[str], path, title: str = "Confusion matrix") -> Path:
    """Counts with row percentages in every cell; colour by row percentage so rare classes stay visible."""
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    pct = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0) * 100
    k = len(class_names)
    fig, ax = subplots(figsize=(2.2 + 1.6 * k, 1.8 + 1.4 * k))
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n{pct[i, j]:.1f}%", ha="center", va="center", fontsize=11,
                    color="white" if pct[i, j] > 55 else "black")
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"{title} (n = {int(cm.sum())})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of true class")
    return _save(fig, path)


def per_class_plot(per_class: dict, path) -> Path:
    """Grouped bars: precision, sensitivity, specificity, F1 per class (sensitivity with its CI)."""
    names = list(per_class)
    series = {"precision": [per_class[c]["precision"] for c in names],
              "sensitivity": [per_class[c]["sensitivity"]["value"] for c in names],
              "specificity": [per_class[c]["specificity"]["value"] for c in names],
              "F1": [per_class[c]["f1"] for c in names]}
    sens_err = np.array([[per_class[c]["sensitivity"]["value"] - per_class[c]["sensitivity"]["ci_low"],
                          per_class[c]["sensitivity"]["ci_high"] - per_class[c]["sensitivity"]["value"]]
                         for c in names]).T
    x, width = np.arange(len(names)), 0.2
    fig, ax = subplots(figsize=(2 + 2 * len(names), 4.5))
    for i, (label, values) in enumerate(series.items()):
        err = sens_err if label == "sensitivity" else None
        ax.bar(x + (i - 1.5) * width, values, width, label=label, yerr=err, capsize=3)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    legend_above(ax, "Per-class metrics (sensitivity with its 95% CI)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def roc_curves_plot(y_true, y_prob, class_names: list[str], aucs: list, path) -> Path:
    """One-vs-rest ROC curve per class (classes absent from the test set are skipped)."""
    y_true = np.asarray(y_true)
    fig, ax = subplots(figsize=(5.5, 5))
    for k, (name, auc) in enumerate(zip(class_names, aucs)):
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(y_true == k, np.asarray(y_prob)[:, k])
        ax.plot(fpr, tpr, lw=2, label=f"{name} (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title("ROC curves, one vs rest")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def reliability_plot(bins: dict, ece: float, path, after: dict | None = None, ece_after: float | None = None) -> Path:
    """Accuracy vs confidence per bin against the diagonal, with a count histogram underneath."""
    edges = np.asarray(bins["edges"])
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    fig, (ax, ax_n) = subplots(2, 1, figsize=(5.5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    filled = np.asarray(bins["count"]) > 0
    ax.bar(centers[filled], np.asarray(bins["accuracy"])[filled], width * 0.9, alpha=0.7, edgecolor="k",
           label=f"accuracy per bin (ECE = {ece:.3f})")
    ax.plot(centers, bins["accuracy"], "D", color="k", markersize=4)  # marks every filled bin, even at accuracy 0
    if after is not None:
        ax.plot(centers, after["accuracy"], "o-", color="tab:orange",
                label=f"after temperature scaling (ECE = {ece_after:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.02)
    ax.set_title("Reliability diagram (top-class confidence)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax_n.bar(centers, bins["count"], width * 0.9, color="gray")
    ax_n.set_xlabel("confidence")
    ax_n.set_ylabel("images")
    ax_n.set_xlim(0, 1)
    return _save(fig, path)


def comparison_plot(rows: list[dict], path) -> Path:
    """Accuracy (with CI) and macro F1 per model, and latency, side by side."""
    names = [r["model"] for r in rows]
    x = np.arange(len(names))
    acc = np.array([r["accuracy"] for r in rows])
    err = np.array([[r["accuracy"] - r["accuracy_ci_low"], r["accuracy_ci_high"] - r["accuracy"]] for r in rows]).T
    fig, (ax, ax_t) = subplots(1, 2, figsize=(4 + 2.2 * len(names), 4.5))
    ax.bar(x - 0.2, acc, 0.4, yerr=err, capsize=3, label="accuracy (95% CI)")
    ax.bar(x + 0.2, [r["macro_f1"] for r in rows], 0.4, label="macro F1")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    legend_above(ax, "Test-set quality")
    ax.grid(axis="y", alpha=0.3)
    ax_t.bar(x, [r["latency_ms"] for r in rows], 0.5, color="tab:green")
    ax_t.set_xticks(x, names, rotation=20, ha="right")
    ax_t.set_ylabel("ms per image (batch 1)")
    ax_t.set_title("Latency", pad=20)  # level with the quality title above its legend
    ax_t.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def evaluation_figures(out_dir, record: dict, y_true, y_prob, bins: dict, bins_after: dict | None) -> list[Path]:
    """The four figures of an evaluation, from the same numbers as evaluation_metrics.json."""
    out_dir = Path(out_dir)
    names = record["class_names"]
    cal = record["calibration"]
    return [
        confusion_matrix_plot(record["confusion_matrix"], names, out_dir / "confusion_matrix.png",
                              title=f"{record['model']} {record.get('kind', 'test')} set"),
        per_class_plot(record["per_class"], out_dir / "per_class_metrics.png"),
        roc_curves_plot(y_true, y_prob, names, [record["per_class"][c]["roc_auc"] for c in names],
                        out_dir / "roc_curves.png"),
        reliability_plot(bins, cal["ece"], out_dir / "reliability_diagram.png", bins_after,
                         cal["ece_after_temperature"]),
    ]

"""One metrics routine for test.py, evaluate.py and validation during training (scikit-learn)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support)


def classification_metrics(y_true: np.ndarray, y_prob: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro F1, per-class precision/recall/specificity/F1/support, confusion."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_prob).argmax(axis=1)
    labels = list(range(len(class_names)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    per_class = {}
    for k, name in enumerate(class_names):
        tn = cm.sum() - cm[k, :].sum() - cm[:, k].sum() + cm[k, k]
        fp = cm[:, k].sum() - cm[k, k]
        per_class[name] = {
            "precision": float(precision[k]),
            "recall": float(recall[k]),  # = sensitivity
            "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
            "f1": float(f1[k]),
            "support": int(support[k]),
        }
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "n": int(len(y_true)),
    }


def format_metrics(m: dict, class_names: list[str]) -> str:
    """The console report: headline figures, per-class table, confusion matrix."""
    lines = [f"Accuracy: {m['accuracy']:.2%} | Balanced accuracy: {m['balanced_accuracy']:.2%} | "
             f"Macro F1: {m['macro_f1']:.4f} | n = {m['n']}", ""]
    width = max(12, *(len(c) for c in class_names))
    lines.append(f"{'class':<{width}} {'precision':>9} {'recall':>9} {'specif.':>9} {'f1':>9} {'support':>8}")
    for c in class_names:
        r = m["per_class"][c]
        lines.append(f"{c:<{width}} {r['precision']:>9.4f} {r['recall']:>9.4f} {r['specificity']:>9.4f} "
                     f"{r['f1']:>9.4f} {r['support']:>8d}")
    lines += ["", "Confusion matrix (rows: true, columns: predicted)"]
    lines.append(" " * width + "".join(f"{c[:10]:>11}" for c in class_names))
    for c, row in zip(class_names, m["confusion_matrix"]):
        lines.append(f"{c:<{width}}" + "".join(f"{v:>11d}" for v in row))
    return "\n".join(lines)

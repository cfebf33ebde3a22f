"""One metrics routine for test.py, evaluate.py and validation during training (scikit-learn)."""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)


def classification_metrics(y_true: np.ndarray, y_prob: np.ndarray, class_names: list[str],
                           with_auc: bool = False) -> dict:
    """Accuracy, balanced accuracy, macro F1, per-class precision/recall/specificity/F1/support, confusion.

    with_auc adds one-vs-rest ROC AUC per class and macro (None where a class is absent), and the
    confusion matrix as row percentages.
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob)
    y_pred = y_prob.argmax(axis=1) if len(y_true) else np.zeros(0, dtype=np.int64)
    labels = list(range(len(class_names)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    per_class = {}
    for k, (name, spec) in enumerate(zip(class_names, specificities(y_true, y_pred, labels))):
        per_class[name] = {
            "precision": float(precision[k]),
            "recall": float(recall[k]),  # = sensitivity
            "specificity": spec,
            "f1": float(f1[k]),
            "support": int(support[k]),
        }
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "n": int(len(y_true)),
    }
    if with_auc:
        aucs, macro, notes = roc_auc_per_class(y_true, y_prob, class_names)
        for name, auc in zip(class_names, aucs):
            per_class[name]["roc_auc"] = auc
        out.update(roc_auc_macro=macro, notes=notes, confusion_matrix_row_pct=row_percentages(cm))
    return out


def _balanced_accuracy(y_true, y_pred) -> float:
    if not len(y_true):
        return 0.0
    with warnings.catch_warnings():  # a class absent from y_true is reported in the notes instead
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y_true, y_pred))


def specificities(y_true: np.ndarray, y_pred: np.ndarray, labels: list[int]) -> list[float]:
    """Per-class specificity TN / (TN + FP), one-vs-rest (0.0 when a class has no negatives)."""
    mcm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)  # [[tn, fp], [fn, tp]] per class
    tn, fp = mcm[:, 0, 0], mcm[:, 0, 1]
    return [float(t / (t + f)) if t + f else 0.0 for t, f in zip(tn, fp)]


def roc_auc_per_class(y_true: np.ndarray, y_prob: np.ndarray, class_names: list[str]):
    """One-vs-rest ROC AUC per class and their macro mean; None (with a note) where it is undefined."""
    aucs, notes = [], []
    for k, name in enumerate(class_names):
        positives = int(np.sum(y_true == k))
        if positives == 0 or positives == len(y_true):
            aucs.append(None)  # AUC needs both positives and negatives
            notes.append(f"ROC AUC of {name} undefined: {'no' if positives == 0 else 'only'} "
                         f"{name} images in the test set")
        else:
            aucs.append(float(roc_auc_score(y_true == k, y_prob[:, k])))
    defined = [a for a in aucs if a is not None]
    # = sklearn's roc_auc_score(multi_class="ovr", average="macro") when every class is present
    macro = float(np.mean(defined)) if defined else None
    if defined and len(defined) < len(aucs):
        notes.append(f"macro ROC AUC averages the {len(defined)} classes where it is defined")
    return aucs, macro, notes


def row_percentages(cm) -> list[list[float]]:
    """Each row of the confusion matrix as percentages of that true class (0 for an empty row)."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    return (np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0) * 100).tolist()


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

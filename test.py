"""Quick check of a trained model on the split manifest's test rows, with the checkpoint's own preprocessing.

    python test.py --model resnet18 --demo

Accuracy, macro F1, per-class metrics and the confusion matrix (console and confusion_matrix.png),
logged to MLflow `brain-cancer-mri-test-{model}` / W&B `brain-cancer-mri-test`. The same metrics code
as evaluate.py; for intervals, calibration, timing and gates use evaluate.py.
"""
from __future__ import annotations

import argparse

from core.cli import add_common_args, run
from core.device import select_device
from data.preprocess import Preprocessor
from evaluation.metrics import classification_metrics, format_metrics
from evaluation.plots import confusion_matrix_plot
from evaluation.prediction import predict_split
from evaluation.record import open_tracker
from evaluation.source import open_for_scoring
from models.loading import model_from_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on the test split (accuracy, per-class metrics, "
                                            "confusion matrix)")
    add_common_args(p, checkpoint=True, device=True)
    return p


def test_metrics(m: dict, class_names: list[str]) -> dict[str, float]:
    """Scalars for the trackers: test_accuracy, test_macro_f1, test_recall_<class>, ..."""
    out = {"test_accuracy": m["accuracy"], "test_balanced_accuracy": m["balanced_accuracy"],
           "test_macro_f1": m["macro_f1"]}
    for c in class_names:
        out.update({f"test_{k}_{c}": m["per_class"][c][k] for k in ("precision", "recall", "specificity", "f1")})
    return out


def main(args) -> int:
    device = select_device(args.device)
    cfg, opened = open_for_scoring(args)
    ckpt, ckpt_path, split = opened.ckpt, opened.path, opened.split
    name, classes = opened.model_name, opened.class_names
    with open_tracker(cfg, name, "test", ckpt) as tracker:
        model = model_from_checkpoint(ckpt, device)
        # Preprocessing comes from the checkpoint, never re-derived from the config.
        contract = opened.contract
        pre = Preprocessor(contract.mean, contract.std).to(device)
        test = predict_split(cfg, split, "test", model, pre, contract.img_size, device)
        y, prob = test.y_true, test.y_prob
        metrics = classification_metrics(y, prob, classes)
        png = confusion_matrix_plot(metrics["confusion_matrix"], classes, ckpt_path.parent / "confusion_matrix.png",
                                    title=f"{name} test set")
        print(f"Test split of {split.manifest_path} ({len(y)} images), checkpoint epoch {ckpt['epoch']}")
        print(format_metrics(metrics, classes))
        print(f"📁 {png}")
        tracker.log_params({"checkpoint": str(ckpt_path), "checkpoint_epoch": ckpt["epoch"],
                            "split_manifest": str(split.manifest_path), "n_test": len(y)})
        tracker.log_metrics(test_metrics(metrics, classes))
        tracker.log_artifact(png, "test")
    return 0


if __name__ == "__main__":
    run(main, get_args_parser())

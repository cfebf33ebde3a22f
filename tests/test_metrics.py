"""Evaluation maths on hand-checkable cases: metrics, bootstrap intervals, calibration, gates, report files."""
import csv
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

from evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    logits_from_probs,
    reliability_bins,
)
from evaluation.gates import check_gates, format_gates
from evaluation.metrics import classification_metrics, format_metrics
from evaluation.uncertainty import bootstrap_intervals, confusion_matrices, metrics_from_confusion, stratified_indices

CLASSES = ["glioma", "meningioma", "pituitary"]
# 10 images: glioma 3/4 right (one called meningioma), meningioma 2/3 (one called pituitary), pituitary 3/3
Y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
P = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.3, 0.6, 0.1],
              [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.4, 0.1, 0.5],
              [0.05, 0.05, 0.9], [0.05, 0.15, 0.8], [0.05, 0.25, 0.7]])


def test_metrics_on_a_hand_checked_case():
    m = classification_metrics(Y, P, CLASSES, with_auc=True)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [0, 0, 3]]
    assert m["accuracy"] == pytest.approx(0.8)
    pc = m["per_class"]
    assert [pc[c]["recall"] for c in CLASSES] == pytest.approx([3 / 4, 2 / 3, 1.0])
    assert [pc[c]["specificity"] for c in CLASSES] == pytest.approx([1.0, 6 / 7, 6 / 7])
    assert [pc[c]["precision"] for c in CLASSES] == pytest.approx([1.0, 2 / 3, 3 / 4])
    assert [pc[c]["support"] for c in CLASSES] == [4, 3, 3]
    # glioma: the 0.3 positive ranks below one negative (0.4) -> 23 of 24 pairs; meningioma has a tie
    assert [pc[c]["roc_auc"] for c in CLASSES] == pytest.approx([23 / 24, 16.5 / 21, 1.0])
    assert m["roc_auc_macro"] == pytest.approx((23 / 24 + 16.5 / 21 + 1.0) / 3)
    assert m["confusion_matrix_row_pct"][0] == pytest.approx([75.0, 25.0, 0.0])
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 1) / 3)
    assert "Confusion matrix" in format_metrics(m, CLASSES)  # train.py / test.py console format still works


def test_auc_of_a_class_missing_from_the_test_set_is_null_with_a_note():
    y, p = Y[Y != 2], P[Y != 2]
    m = classification_metrics(y, p, CLASSES, with_auc=True)
    assert m["per_class"]["pituitary"]["roc_auc"] is None
    assert m["roc_auc_macro"] is not None and any("pituitary" in n for n in m["notes"])


def test_confusion_matrix_arithmetic_of_the_bootstrap_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 300)
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 4, 300))
    cm = confusion_matrices(y, pred, np.arange(300)[None, :], 4)
    got = metrics_from_confusion(cm)
    assert got["accuracy"][0] == pytest.approx(np.mean(y == pred))
    assert got["balanced_accuracy"][0] == pytest.approx(balanced_accuracy_score(y, pred))
    assert got["macro_f1"][0] == pytest.approx(f1_score(y, pred, average="macro"))
    assert got["sensitivity"][0] == pytest.approx(recall_score(y, pred, average=None))
    spec = classification_metrics(y, np.eye(4)[pred], list("abcd"))["per_class"]
    assert got["specificity"][0] == pytest.approx([spec[c]["specificity"] for c in "abcd"])


def test_stratified_resamples_keep_class_counts():
    idx = stratified_indices(Y, 50, seed=0)
    assert idx.shape == (50, len(Y))
    for row in idx:
        assert np.bincount(Y[row], minlength=3).tolist() == [4, 3, 3]


def _noisy(n, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return y, np.where(rng.random(n) < 0.8, y, rng.integers(0, 3, n))


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_data():
    y, pred = _noisy(200)
    small = bootstrap_intervals(y, pred, 3, 1000, 0.95, seed=0)
    big = bootstrap_intervals(np.tile(y, 9), np.tile(pred, 9), 3, 1000, 0.95, seed=0)
    acc = np.mean(y == pred)
    for ci in (small, big):
        assert ci["accuracy"][0] <= acc <= ci["accuracy"][1]
        sens = recall_score(y, pred, average=None)
        assert np.all(ci["sensitivity"][0] <= sens) and np.all(sens <= ci["sensitivity"][1])
    width = lambda ci: ci["accuracy"][1] - ci["accuracy"][0]  # noqa: E731
    assert width(big) < 0.5 * width(small)  # ~1/3 with 9x the data
    # fixed seed: the same interval every run
    assert np.array_equal(small["macro_f1"], bootstrap_intervals(y, pred, 3, 1000, 0.95, seed=0)["macro_f1"])


def test_bootstrap_is_vectorised():
    y, pred = _noisy(900)
    start = time.perf_counter()
    bootstrap_intervals(y, pred, 3, 1000, 0.95, seed=0)
    assert time.perf_counter() - start < 2.0  # ~0.1 s unloaded; a Python loop over resamples takes far longer


def test_ece_is_zero_for_a_perfectly_calibrated_case():
    # 75% confident everywhere, right 75% of the time
    p = np.tile([0.75, 0.25], (100, 1))
    y = np.array([0] * 75 + [1] * 25)
    assert expected_calibration_error(y, p, 15) == pytest.approx(0.0, abs=1e-12)
    bins = reliability_bins(y, p, 10)
    assert sum(bins["count"]) == 100 and bins["count"][7] == 100  # 0.75 is in (0.7, 0.8]


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    z = rng.normal(size=(3000, 3))
    z[np.arange(3000), y] += 1.5
    p = np.exp(4 * z) / np.exp(4 * z).sum(1, keepdims=True)  # logits x4: over-confident
    val, test = slice(0, 1500), slice(1500, None)
    t = fit_temperature(logits_from_probs(p[val]), y[val])
    assert t > 2.0  # cools the over-confident model down
    before = expected_calibration_error(y[test], p[test])
    after = expected_calibration_error(y[test], apply_temperature(logits_from_probs(p[test]), t))
    assert before > 0.1 and after < before / 3
    assert np.array_equal(apply_temperature(logits_from_probs(p), t).argmax(1), p.argmax(1))  # accuracy unchanged


def _record(acc=(0.9, 0.86, 0.94), sens=(0.9, 0.79, 0.97), latency=(20.0, 30.0), imbalance=1.5):
    ci = lambda v: {"value": v[0], "ci_low": v[1], "ci_high": v[2]}  # noqa: E731
    return {"model": "resnet18", "confidence": 0.95, "accuracy": ci(acc),
            "per_class": {c: {"sensitivity": ci(sens)} for c in CLASSES},
            "timing": {"latency_ms_mean": latency[0], "latency_ms_p95": latency[1]},
            "class_imbalance_ratio": imbalance}


GATES = SimpleNamespace(accuracy=0.85, sensitivity=0.80, latency_ms=500.0, max_imbalance=5.0)


def test_gates_on_point_estimates_pass_and_strict_judges_the_lower_bound():
    v = check_gates(_record(), GATES, strict=False)
    assert v["deployment_ready"] and v["basis"] == "point estimate"
    assert [g["name"] for g in v["gates"]] == ["accuracy", *(f"sensitivity_{c}" for c in CLASSES),
                                               "latency_ms", "class_imbalance"]
    strict = check_gates(_record(), GATES, strict=True)
    assert not strict["deployment_ready"] and strict["strict"]
    assert strict["basis"] == "lower bound of the 95% confidence interval"
    failed = [g["name"] for g in strict["gates"] if not g["passed"]]
    assert failed == [f"sensitivity_{c}" for c in CLASSES]  # CI low 0.79 < 0.80; accuracy low 0.86 passes
    assert "Deployment ready: NO" in format_gates(strict) and "lower bound" in format_gates(strict)
    assert "Deployment ready: YES" in format_gates(v)


@pytest.mark.parametrize("change, gate", [({"acc": (0.84, 0.8, 0.88)}, "accuracy"),
                                          ({"latency": (500.0, 600.0)}, "latency_ms"),
                                          ({"imbalance": 5.0}, "class_imbalance")])
def test_each_gate_fails_at_its_threshold(change, gate):
    v = check_gates(_record(**change), GATES)
    assert not v["deployment_ready"]
    assert [g["name"] for g in v["gates"] if not g["passed"]] == [gate]


def test_predictions_csv_round_trips_probabilities_exactly(tmp_path):
    from evaluation.reports import write_predictions

    p = np.random.default_rng(1).dirichlet([1, 1, 1], 10).astype(np.float32)
    path = write_predictions(tmp_path / "predictions.csv", [f"a b/{i}.jpg" for i in range(10)], Y, p, CLASSES)
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == ["path", "true_class", "predicted_class", *(f"prob_{c}" for c in CLASSES)]
    back = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
    assert np.array_equal(back, p.astype(np.float64))
    assert [r["path"] for r in rows][:2] == ["a b/0.jpg", "a b/1.jpg"]


def test_figures_are_readable_pngs(tmp_path):
    from evaluation.plots import comparison_plot, evaluation_figures
    from evaluation.record import calibration_summary, score_predictions

    ev = SimpleNamespace(bootstrap_samples=200, confidence=0.95, bootstrap_seed=0)
    record = {"model": "resnet18", "class_names": CLASSES, **score_predictions(Y, P, CLASSES, ev)}
    record["calibration"], bins, after = calibration_summary(Y, P, 10, val=(Y, P))
    files = evaluation_figures(tmp_path, record, Y, P, bins, after)
    row = {"model": "resnet18", "accuracy": 0.8, "accuracy_ci_low": 0.6, "accuracy_ci_high": 1.0,
           "macro_f1": 0.8, "latency_ms": 3.0}
    files.append(comparison_plot([row, {**row, "model": "swin_t"}], tmp_path / "model_comparison.png"))
    assert [f.name for f in files] == ["confusion_matrix.png", "per_class_metrics.png", "roc_curves.png",
                                       "reliability_diagram.png", "model_comparison.png"]
    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 300
    json.dumps(record, allow_nan=False)  # every figure is plain JSON

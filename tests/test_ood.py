"""Knowing when not to answer: the feature-space out-of-distribution score and the conformal prediction sets, fitted
when training ends, stored with the model, computed the same way by the checkpoint, the ONNX file and the int8 file,
and carried by every prediction record."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script, write_overlay
from core.checkpoint import load_checkpoint
from core.conformal import CONFORMAL_KEY, conformal_quantile, fit_conformal, prediction_set, set_members
from core.contract import Contract
from core.feature_ood import FEATURE_OOD_KEY, OOD_OUTPUT
from data.synthetic import generate_dataset
from models.features import FEATURE_OOD_STATE, MIDDLE_LAYERS, FeatureModel, ScoredModel, split_classifier
from models.zoo import build_model
from tests.slowest import slow_setup


# ---- the feature cut ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "medical_cnn"])
def test_features_then_classifier_is_the_whole_model(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, pretrained=False, img_size=32).eval()
    body, classifier = split_classifier(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = body(x)
        assert features.ndim == 2 and features.shape[1] == classifier.in_features
        torch.testing.assert_close(classifier(features), model(x))
        # with the middle stage beside it: the same logits, one pass, the middle stage's channels first
        logits, both = FeatureModel(model, MIDDLE_LAYERS[name])(x)
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(both[:, -classifier.in_features:], features)
        assert both.shape[1] > classifier.in_features


def test_scored_model_distance_is_the_mahalanobis_distance():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, pretrained=False).eval()
    body, _ = split_classifier(model)
    d = body(torch.randn(1, 3, 32, 32)).shape[1]
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, d))
    a = rng.normal(size=(d, d))
    precision = a @ a.T / d + np.eye(d)
    w = np.linalg.cholesky(precision)
    shift = rng.normal(size=d)
    scored = ScoredModel(model, None, torch.from_numpy((means - shift) @ w), torch.from_numpy(w),
                         torch.from_numpy(shift)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits, dist = scored(x)
        f = body(x).double().numpy()
    want = np.sqrt(np.min([np.einsum("nd,de,ne->n", f - m, precision, f - m) for m in means], axis=0))
    np.testing.assert_allclose(dist.numpy(), want, rtol=1e-4)
    torch.testing.assert_close(logits, model(x))


def test_the_distance_is_stable_in_float32_on_nearly_degenerate_features():
    """A few directions carry all the variance, on a large common offset, beside dead units: computed in float32 (as
    every exported flavor does) the distance still matches float64 to 1e-3, the export's parity tolerance. Features
    that hardly vary at all (a model trained one epoch from scratch on a few tiny images) are refused: their
    distance would be rounding noise, another one in each runtime."""
    from core.errors import UserError
    from evaluation.answer_checks import mahalanobis, mahalanobis_fit

    rng = np.random.default_rng(0)
    n, d = 24, 300
    labels = np.arange(n) % 3
    features = 50.0 + rng.normal(size=(n, 4)) @ rng.normal(size=(4, d)) + 1e-6 * rng.normal(size=(n, d))
    features[:, :150] = 1e-3  # dead units: the same value for every image
    fit = mahalanobis_fit(features, labels, 3)
    probe = features[:6] + rng.normal(scale=0.1, size=(6, d))
    want = mahalanobis(probe, fit)
    f32 = torch.from_numpy(probe).float()
    z = (f32 - torch.from_numpy(fit.shift).float()) @ torch.from_numpy(fit.whitening).float()
    got = (z[:, None, :] - torch.from_numpy(fit.centers).float()[None]).pow(2).sum(-1).min(dim=1).values.sqrt()
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-3)

    flat = 0.13 + 1e-9 * rng.normal(size=(n, d))
    with pytest.raises(UserError, match="no usable covariance: they hardly vary"):
        mahalanobis_fit(flat, labels, 3)


# ---- conformal sets -------------------------------------------------------------------------------
def test_conformal_quantile_is_the_finite_sample_rank():
    scores = np.arange(1, 20) / 20  # 19 scores: rank ceil(20 * 0.95) = 19, the largest
    assert conformal_quantile(scores, 0.05) == pytest.approx(0.95)
    assert conformal_quantile(scores[:10], 0.05) == 1.0  # too few scores: every class


def dirichlet_probs(rng, n, k=3, sharp=2.0):
    y = rng.integers(0, k, n)
    alpha = np.ones((n, k))
    alpha[np.arange(n), y] += sharp
    return y, np.array([rng.dirichlet(a) for a in alpha])


def test_conformal_sets_cover_the_true_class_at_the_target_rate():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    y_cal, p_cal = dirichlet_probs(rng, 600)
    spec = fit_conformal(y_cal, p_cal, names, alpha=0.1)
    assert spec["class_conditional"] and spec["coverage_target"] == 0.9
    y, p = dirichlet_probs(rng, 4000)
    member = set_members(p, spec, names)
    coverage = member[np.arange(len(y)), y].mean()
    assert 0.88 <= coverage <= 0.93  # >= 0.9 in expectation; within sampling noise of 4000 images
    per_class = [member[y == k, k].mean() for k in range(3)]
    assert min(per_class) >= 0.86
    assert 1 < member.sum(1).mean() < 3  # informative: not every class every time


def test_conformal_falls_back_to_one_threshold_when_a_class_is_rare():
    rng = np.random.default_rng(1)
    y, p = dirichlet_probs(rng, 100)
    y[y == 2] = 0
    y[:5] = 2  # five calibration images of class c: too few for its own 95% quantile
    spec = fit_conformal(y, p, ["a", "b", "c"], alpha=0.05)
    assert not spec["class_conditional"]
    assert len(set(spec["thresholds"].values())) == 1
    assert spec["calibration"]["per_class"]["c"] == 5


def test_prediction_set_is_never_empty_and_ordered():
    spec = {"thresholds": {"a": 0.2, "b": 0.2, "c": 0.2}}
    assert prediction_set([0.5, 0.3, 0.2], spec, ["a", "b", "c"]) == ["a"]
    assert prediction_set([0.1, 0.85, 0.05], {"thresholds": {"a": 0.95, "b": 0.0, "c": 0.0}},
                          ["a", "b", "c"]) == ["b", "a"]


# ---- fitted when training ends, carried by every flavor -------------------------------------------
def permuted(gray: np.ndarray, rng) -> np.ndarray:
    """The same pixels, in random places: exactly the phantom's grey-level histogram, none of its shapes."""
    return rng.permutation(gray.ravel()).reshape(gray.shape)


def stripes_like(gray: np.ndarray) -> np.ndarray:
    """The phantom's grey levels sorted into vertical bands: same histogram, a texture no brain has."""
    return np.sort(gray.ravel()).reshape(gray.shape[1], gray.shape[0]).T.copy()


def write_far_images(src_dir: Path, out_dir: Path, n: int = 12) -> list[Path]:
    rng = np.random.default_rng(3)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(sorted(src_dir.rglob("*.jpg"))[:n]):
        gray = np.asarray(Image.open(path).convert("L"))
        for kind, img in (("permuted", permuted(gray, rng)), ("stripes", stripes_like(gray))):
            written.append(out_dir / f"{kind}_{i:02d}.png")
            Image.fromarray(img).save(written[-1])
    return written


@pytest.fixture(scope="module")
@slow_setup("trains resnet18 for two epochs on the quick start's phantoms")
def phantom_run(tmp_path_factory):
    """resnet18 trained for two epochs at 32 px on the quick start's phantoms (20 per class)."""
    tmp = tmp_path_factory.mktemp("ood run")
    data = generate_dataset(tmp / "phantoms", n_per_class=20, size=64, seed=5)
    cfg = write_overlay(tmp, data, **{"train.epochs": 2, "registry.auto_register": False})
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_script("train", ["--config", cfg, "--model", "resnet18"]) == 0
    return cfg, tmp, data, tmp / "checkpoints" / "resnet18_outputs" / "best_model.pth"


def ckpt_split_rows(ckpt: dict) -> list[str]:
    import csv

    with open(ckpt["split_manifest"], newline="") as fh:
        return [row["split"] for row in csv.DictReader(fh)]


def test_training_stores_both_checks_with_the_model(phantom_run):
    _, _, _, ckpt_path = phantom_run
    ckpt = load_checkpoint(ckpt_path)
    state = ckpt[FEATURE_OOD_STATE]
    assert state["middle"] == ["layer3", "nchw"]  # 256 channels of layer3 beside the classifier's 512 inputs
    assert state["whitening"].shape == (768, 768) and state["centers"].shape == (3, 768)
    contract = Contract.from_checkpoint(ckpt)
    ood = contract.extra[FEATURE_OOD_KEY]
    assert ood["percentile"] == 95 and ood["limit"] == ood["validation_distances"]["p95"] > 0
    assert ood["n_train"] == sum(1 for r in ckpt_split_rows(ckpt) if r == "train")
    conformal = contract.extra[CONFORMAL_KEY]
    assert conformal["coverage_target"] == 0.95 and set(conformal["thresholds"]) == set(contract.class_names)


def test_every_flavor_computes_the_same_distance_and_refers_far_images(phantom_run, tmp_path):
    import onnx

    from deploy.export import OOD_TOLERANCE, export_onnx
    from deploy.predictors import OnnxPredictor, TorchPredictor
    from models.features import scored_model
    from models.loading import model_from_checkpoint

    _, _, data, ckpt_path = phantom_run
    ckpt = load_checkpoint(ckpt_path)
    contract = Contract.from_checkpoint(ckpt)
    scored = scored_model(model_from_checkpoint(ckpt), ckpt[FEATURE_OOD_STATE])
    onnx_path = export_onnx(scored, contract, tmp_path / "m.onnx")
    assert [o.name for o in onnx.load(str(onnx_path)).graph.output] == ["logits", OOD_OUTPUT]
    torch_p, onnx_p = TorchPredictor(ckpt_path), OnnxPredictor(onnx_path, providers=["CPUExecutionProvider"])
    phantoms = sorted(data.rglob("*.jpg"))[::6]
    far = write_far_images(data, tmp_path / "far")
    for path in phantoms + far[:4]:
        a, b = torch_p.predict_path(path), onnx_p.predict_path(path)
        assert a["predicted_class"] == b["predicted_class"] and a["prediction_set"] == b["prediction_set"]
        assert abs(a["ood_distance"] - b["ood_distance"]) <= OOD_TOLERANCE * a["ood_distance"] + 1e-3
    far_records = [onnx_p.predict_path(p) for p in far]
    assert all(r["ood_limit"] == contract.extra[FEATURE_OOD_KEY]["limit"] for r in far_records)
    flagged = [r["out_of_distribution"] for r in far_records]
    assert np.mean(flagged) >= 0.9, [(Path(r["path"]).name, r["ood_distance"]) for r in far_records]


def test_evaluate_reports_coverage_refer_rate_and_the_detectors_auroc(phantom_run, tmp_path, capsys):
    import json

    cfg, tmp, data, ckpt_path = phantom_run
    far = tmp_path / "other domain"
    write_far_images(data, far)
    (far / "broken.png").write_bytes(b"not an image")  # reported by path, skipped
    assert run_script("evaluate", ["--config", cfg, "--model", "resnet18", "--ood-self-check", "--ood", far]) == 0
    out, err = capsys.readouterr()
    assert "broken.png" in err
    record = json.loads((ckpt_path.parent / "evaluation_metrics.json").read_text())
    checks = record["answer_checks"]
    cov = checks["conformal"]["coverage"]
    assert cov["ci_low"] <= 0.95 <= cov["ci_high"]  # the target lies inside the test split's interval
    assert 1 <= checks["conformal"]["mean_set_size"]["value"] <= 3
    assert set(checks["refer"]["reasons"]) == {"low_confidence", "prediction_set", "out_of_distribution",
                                               "unlike_training"}
    sets = checks["ood_sets"]
    assert set(sets) == {"other domain", *(f"self-check {k}" for k in
                                           ("permuted", "stripes", "inverted", "noise", "blank"))}
    assert sets["other domain"]["n"] == 24  # the broken file left out
    for name in ("other domain", "self-check permuted", "self-check noise"):  # 9 test slices: a wide interval
        assert sets[name]["auroc"]["value"] >= 0.8 and sets[name]["referred"]["value"] >= 0.9, (name, sets[name])
    report = (ckpt_path.parent / "evaluation_report.txt").read_text()
    assert "Conformal prediction sets (target coverage 95%" in report and "OOD set other domain" in report
    assert "accuracy of what was not referred" in out


def test_an_ood_folder_without_images_is_one_line(phantom_run, tmp_path, capsys):
    cfg, _, _, _ = phantom_run
    empty = tmp_path / "empty"
    empty.mkdir()
    import evaluate
    from core.cli import run
    with pytest.raises(SystemExit) as exit_info:
        run(evaluate.main, evaluate.get_args_parser(), ["--config", str(cfg), "--model", "resnet18", "--ood",
                                                        str(empty)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("no readable images") and "Traceback" not in "\n".join(err)


def test_the_monitoring_panel_counts_out_of_distribution_slices_against_the_test_split():
    import json

    from core.config import MonitorLimits
    from deploy.refer import ReferRule
    from review.monitor import ood_check, refer_check

    limits = MonitorLimits(min_samples=10)
    ref = {"confidence": [0.9] * 100, "intensity_distance": [0.05] * 100, "ood_distance": [10.0] * 95 + [40.0] * 5,
           "ood_limit": 30.0, "set_size": [2] * 10 + [1] * 90}
    far = {"ood_distance": 55.0, "ood_limit": 30.0, "out_of_distribution": True, "prediction_set": ["glioma"]}
    near = {"ood_distance": 12.0, "ood_limit": 30.0, "out_of_distribution": False, "prediction_set": ["glioma"]}

    rule = ReferRule(threshold=0.6, limit=0.2)
    probabilities = {"probabilities": {"glioma": 0.9, "meningioma": 0.06, "pituitary": 0.04}}

    def recent(record, n):
        judged = rule.assess({**probabilities, **record}, None)
        return [{"predicted_class": "glioma", "confidence": 0.9, "refer": judged.refer,
                 "probabilities_json": "{}", "reasons_json": json.dumps(judged.explained())}] * n

    drifted = ood_check(recent(far, 8) + recent(near, 12), ref, limits)
    assert drifted.status == "warn" and drifted.recent == "40%" and drifted.reference == "5%"
    assert ood_check(recent(near, 20), ref, limits).status == "ok"
    assert ood_check(recent(near, 20), {"confidence": [0.9]}, limits).status == "no reference"
    # the refer rate's reference counts the test slices the record's checks refer: 5 far + 10 with two classes
    assert refer_check(recent(near, 20), ref, rule, limits).reference == "15%"



def test_the_refer_rule_says_each_check_in_words():
    from deploy.refer import NO_FEATURE_CHECK, ReferRule

    rule = ReferRule(threshold=0.6)
    base = {"probabilities": {"glioma": 0.9, "meningioma": 0.06, "pituitary": 0.04}}
    far = rule.assess({**base, "ood_distance": 61.73, "ood_limit": 47.03, "out_of_distribution": True,
                       "prediction_set": ["glioma"]}, None)
    assert far.refer and [r.text for r in far.reasons] == [
        "out of distribution: unlike the images the model learned from (feature distance 61.7, limit 47.0)"]
    unsure = rule.assess({**base, "ood_distance": 12.0, "ood_limit": 47.03, "out_of_distribution": False,
                          "prediction_set": ["glioma", "meningioma"]}, None)
    assert unsure.refer and [r.text for r in unsure.reasons] == [
        "more than one class is plausible: glioma or meningioma (the conformal prediction set)"]
    fine = rule.assess({**base, "ood_distance": 12.0, "ood_limit": 47.03, "out_of_distribution": False,
                        "prediction_set": ["glioma"]}, None)
    older = rule.assess(base, None)  # a model trained before the checks: judged on what it has
    assert not fine.refer and not older.refer
    assert NO_FEATURE_CHECK in older.notes and NO_FEATURE_CHECK not in fine.notes  # said, never guessed


def test_evaluate_counts_referrals_as_the_served_rule_makes_them_with_the_fitted_temperature():
    """evaluate.py's refer rate is a promise about serving: for every image, its reasons are the ones the served
    rule (deploy.refer.ReferRule, with the version's temperature) gives. Without the temperature, a calibrated
    model's low-confidence referrals were counted on the raw probabilities."""
    from deploy.refer import ReferRule
    from evaluation.answer_report import refer_reasons

    rng = np.random.default_rng(3)
    names = ["glioma", "meningioma", "pituitary"]
    y_prob = rng.dirichlet([0.6, 0.6, 0.6], size=400)
    sizes, ood, limit = rng.integers(1, 3, 400), rng.gamma(2.0, 10.0, 400), 35.0
    for temperature in (None, 1.8, 0.6):
        counted = refer_reasons(y_prob, 0.6, sizes, (ood, limit), None, temperature)
        rule = ReferRule(0.6, temperature)
        served = [rule.assess({"probabilities": dict(zip(names, p)), "ood_distance": float(d), "ood_limit": limit,
                               "out_of_distribution": bool(d > limit),
                               "prediction_set": names[:int(n)]}, None).reasons for p, d, n in zip(y_prob, ood, sizes)]
        for code in ("low_confidence", "out_of_distribution", "prediction_set"):
            assert [any(r.code == code for r in reasons) for reasons in served] == counted[code].tolist(), \
                (temperature, code)
        assert counted["low_confidence"].any() and not counted["low_confidence"].all()

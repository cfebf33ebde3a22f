"""evaluate.py and test.py end to end on the shared one-epoch checkpoint: files, figures, gates, exit codes,
MLflow."""
import csv
import json
import shlex

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score

from core.errors import UserError
from tests.conftest import run_script, write_overlay
from tests.slowest import slow_setup

OUTPUTS = ["evaluation_metrics.json", "medical_validation.json", "predictions.csv", "evaluation_report.txt",
           "confusion_matrix.png", "per_class_metrics.png", "roc_curves.png", "reliability_diagram.png"]
PASS_ALL = ["--set", "evaluation.gates.accuracy=0", "--set", "evaluation.gates.sensitivity=0",
            "--set", "evaluation.gates.latency_ms=100000", "--set", "evaluation.gates.max_imbalance=100"]


@pytest.fixture(scope="module")
@slow_setup("one evaluate.py --detailed --medical-validation --compare run (bootstrap CIs, plots)")
def full_run(trained):
    """One evaluate.py --detailed --medical-validation --compare run (1-epoch model: the gates fail)."""
    overlay, tmp, best = trained
    code = run_script("evaluate", ["--config", overlay, "--model", "resnet18", "--detailed",
                                   "--medical-validation", "--compare"])
    return code, tmp, best.parent


def test_failed_gates_exit_3_and_every_file_is_written(full_run):
    code, tmp, out = full_run
    assert code == 3
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    for png in ("confusion_matrix.png", "per_class_metrics.png", "roc_curves.png", "reliability_diagram.png"):
        with Image.open(out / png) as im:
            im.verify()
    v = json.loads((out / "medical_validation.json").read_text())
    assert v["deployment_ready"] is False and v["strict"] is False and v["basis"] == "point estimate"
    assert {g["name"] for g in v["gates"]} >= {"accuracy", "latency_ms", "class_imbalance", "sensitivity_glioma"}
    assert "Deployment ready: NO" in (out / "evaluation_report.txt").read_text()
    # --compare: the table, its CSV and plot beside the model folders
    rows = list(csv.DictReader(open(tmp / "checkpoints" / "model_comparison.csv")))
    assert rows[0]["model"] == "resnet18" and rows[0]["gates"] == "FAIL"
    with Image.open(tmp / "checkpoints" / "model_comparison.png") as im:
        im.verify()


def test_metrics_json_follows_the_contract(full_run, trained):
    _, _, out = full_run
    r = json.loads((out / "evaluation_metrics.json").read_text())
    for key in ("model", "checkpoint", "checkpoint_epoch", "split_manifest", "data_fingerprint", "class_names",
                "n_test", "confidence", "bootstrap_samples", "roc_auc_macro", "confusion_matrix",
                "confusion_matrix_row_pct", "class_imbalance_ratio", "training_run_id", "created"):
        assert key in r, key
    assert r["bootstrap_samples"] == 200 and r["confidence"] == 0.95  # the test overlay's setting
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert r[key]["ci_low"] <= r[key]["value"] <= r[key]["ci_high"]
    for row in r["per_class"].values():
        assert set(row) >= {"precision", "recall", "sensitivity", "specificity", "f1", "support", "roc_auc"}
        assert set(row["sensitivity"]) == {"value", "ci_low", "ci_high"}
    assert set(r["calibration"]) == {"ece", "n_bins", "temperature", "ece_after_temperature"}
    assert set(r["timing"]) == {"device", "latency_ms_mean", "latency_ms_p95", "throughput_images_per_s", "batch_size"}
    assert r["timing"]["device"] == "cpu" and r["timing"]["latency_ms_mean"] > 0
    import torch

    ckpt = torch.load(trained[2], map_location="cpu", weights_only=True)
    assert r["data_fingerprint"] == ckpt["data_fingerprint"] and r["class_names"] == ckpt["class_names"]


def test_predictions_csv_reproduces_the_reported_figures(full_run):
    """Recompute every headline figure from predictions.csv alone, independently of the toolkit's code."""
    _, _, out = full_run
    r = json.loads((out / "evaluation_metrics.json").read_text())
    classes = r["class_names"]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == r["n_test"]
    y = np.array([classes.index(row["true_class"]) for row in rows])
    prob = np.array([[float(row[f"prob_{c}"]) for c in classes] for row in rows])
    pred = np.array([classes.index(row["predicted_class"]) for row in rows])
    assert np.array_equal(pred, prob.argmax(1))
    assert accuracy_score(y, pred) == pytest.approx(r["accuracy"]["value"], abs=1e-12)
    assert f1_score(y, pred, average="macro", labels=range(len(classes)), zero_division=0) == pytest.approx(
        r["macro_f1"]["value"], abs=1e-12)
    assert confusion_matrix(y, pred, labels=range(len(classes))).tolist() == r["confusion_matrix"]
    sens = recall_score(y, pred, average=None, labels=range(len(classes)), zero_division=0)
    for k, c in enumerate(classes):
        assert sens[k] == pytest.approx(r["per_class"][c]["sensitivity"]["value"], abs=1e-12)
        if r["per_class"][c]["roc_auc"] is not None:
            assert roc_auc_score(y == k, prob[:, k]) == pytest.approx(r["per_class"][c]["roc_auc"], abs=1e-12)
    manifest = {row["path"] for row in csv.DictReader(open(r["split_manifest"])) if row["split"] == "test"}
    assert {row["path"] for row in rows} == manifest  # relative paths, exactly the manifest's test rows


def test_gradcam_page_shows_every_misclassified_image(full_run):
    _, _, out = full_run
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    wrong = sum(row["true_class"] != row["predicted_class"] for row in rows)
    page = (out / "gradcam" / "index.html").read_text()
    assert page.count("MISCLASSIFIED") == wrong
    overlays = sorted((out / "gradcam").glob("gradcam_*.png"))
    assert len(overlays) == page.count("<img")
    with Image.open(overlays[0]) as im:
        assert im.size[0] > 1.5 * im.size[1]  # image and overlay side by side, caption underneath


def test_evaluation_run_is_in_mlflow(full_run, trained):
    from mlflow import MlflowClient

    _, tmp, _ = full_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("brain-cancer-mri-evaluation-resnet18")
    assert exp is not None
    run = client.search_runs([exp.experiment_id], max_results=1)[0]
    assert "test_accuracy" in run.data.metrics and "test_sensitivity_glioma_ci_low" in run.data.metrics
    assert run.data.tags["deployment_ready"] == "False" and "training_run_id" in run.data.tags
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/evaluation_metrics.json" in logged and "evaluation/confusion_matrix.png" in logged


def test_gates_pass_when_thresholds_allow_and_strict_says_so(trained, capsys):
    overlay, _, best = trained
    code = run_script("evaluate", ["--config", overlay, "--model", "resnet18", "--medical-validation",
                                   "--strict", "--calibrate", *PASS_ALL])
    assert code == 0
    out = capsys.readouterr().out
    assert "Deployment ready: YES" in out and "lower bound of the 95% confidence interval" in out
    v = json.loads((best.parent / "medical_validation.json").read_text())
    assert v["deployment_ready"] and v["strict"] and v["basis"] == "lower bound of the 95% confidence interval"
    r = json.loads((best.parent / "evaluation_metrics.json").read_text())
    assert r["calibration"]["temperature"] > 0 and r["calibration"]["ece_after_temperature"] is not None


def test_a_model_of_synthetic_data_gets_no_praise_and_the_next_step_parses_as_copied(capsys):
    """The demo's phantoms are not medical data: passing gates there say the pipeline works, nothing more; and the
    printed next command carries the flags that found this data and store (--demo, --config, --set), quoted."""
    import evaluate
    import register_model

    store = "monitoring.mlflow.tracking_uri=sqlite:////tmp/my runs/mlflow.db"
    args = evaluate.get_args_parser().parse_args(["--model", "resnet18", "--demo", "--set", store])
    passed = {"deployment_ready": True, "gates": []}
    assert evaluate.verdict(passed, "resnet18", args, synthetic=True) == 0
    out = capsys.readouterr().out
    assert "synthetic demo phantoms" in out and "says nothing about real MRI" in out
    assert "excellent" not in out and "🏆" not in out
    (hint,) = [ln for ln in out.splitlines() if ln.startswith("📝 Next: python register_model.py")]
    command = shlex.split(hint.removeprefix("📝 Next: ").partition(" (a new semantic version)")[0])
    copied = register_model.get_args_parser().parse_args(command[2:])
    assert (copied.model, copied.demo, copied.sets, copied.version) == ("resnet18", "jpeg", [store], "1.0.0")
    assert evaluate.verdict(passed, "resnet18", args, synthetic=False) == 0
    assert "Every quality gate passed on this data set's test split" in capsys.readouterr().out


def test_tracker_down_costs_a_warning_only(tmp_path, tiny_data, trained, capsys):
    _, tmp, best = trained
    down = write_overlay(tmp_path, tiny_data, **{"monitoring.mlflow.tracking_uri": "http://127.0.0.1:9",
                                                 "dataset.manifest_dir": str(tmp / "splits")})
    code = run_script("evaluate", ["--config", down, "--checkpoint", best])
    assert code == 0
    captured = capsys.readouterr()
    assert "MLflow tracking is off" in captured.err
    assert (best.parent / "evaluation_metrics.json").is_file()
    # a plain evaluation computes every gate figure: its verdict is recorded too (registration re-checks it)
    assert json.loads((best.parent / "medical_validation.json").read_text())["deployment_ready"] is False
    assert "Quality gates (evaluation.gates): failed: accuracy" in captured.out


def test_checkpoint_of_another_split_is_refused(trained, tmp_path, tiny_data):
    _, _, best = trained
    other = write_overlay(tmp_path, tiny_data, **{"dataset.seed": 7})
    with pytest.raises(UserError, match="another split"):
        run_script("evaluate", ["--config", other, "--checkpoint", best])


def test_test_script_writes_confusion_matrix_and_logs_the_test_run(trained, capsys):
    from mlflow import MlflowClient

    overlay, tmp, best = trained
    assert run_script("test", ["--config", overlay, "--model", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "MLflow experiment: brain-cancer-mri-test-resnet18" in out and "Macro F1" in out
    with Image.open(best.parent / "confusion_matrix.png") as im:
        im.verify()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("brain-cancer-mri-test-resnet18")
    run = client.search_runs([exp.experiment_id], max_results=1)[0]
    assert "test_accuracy" in run.data.metrics and "test_macro_f1" in run.data.metrics


def drawn_figures(monkeypatch, draw) -> list:
    """The figures `draw()` saves, kept for inspection."""
    from matplotlib.figure import Figure

    kept, save = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        kept.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    draw()
    return kept


def test_plot_legends_never_cover_a_bar(monkeypatch, tmp_path):
    """A good model's bars reach the top of the axes, where the legends used to sit: every legend is now outside
    every bar (error bars included), in the evaluation's per-class and comparison plots and the experiments'."""
    from evaluation.plots import comparison_plot, per_class_plot
    from ops.experiments import Experiment, experiments_plot

    high = {"value": 0.98, "ci_low": 0.95, "ci_high": 1.0}
    per_class = {c: {"precision": 0.99, "sensitivity": high, "specificity": high, "f1": 0.98}
                 for c in ("glioma", "meningioma", "pituitary")}
    rows = [{"model": m, "accuracy": 0.98, "accuracy_ci_low": 0.95, "accuracy_ci_high": 1.0, "macro_f1": 0.97,
             "latency_ms": 12.0} for m in ("resnet18", "efficientnet_b0")]
    runs = [Experiment(m, "SUCCESS", 60.0, best_val_acc=0.99, test_acc=0.98, macro_f1=0.98)
            for m in ("resnet18", "efficientnet_b0", "swin_t")]
    figures = drawn_figures(monkeypatch, lambda: (per_class_plot(per_class, tmp_path / "a.png"),
                                                  comparison_plot(rows, tmp_path / "b.png"),
                                                  experiments_plot(runs, tmp_path / "c.png")))
    assert len(figures) == 3
    for fig in figures:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            if ax.get_legend() is None:
                continue
            legend = ax.get_legend().get_window_extent(renderer)
            marks = [p.get_window_extent(renderer) for p in ax.patches]
            marks += [line.get_window_extent(renderer) for line in ax.lines]  # error bars and their caps
            assert marks and not any(legend.overlaps(m) for m in marks), ax.get_title()


def test_the_gradcam_page_shows_a_file_name_as_text(tmp_path):
    from evaluation.explain import write_gradcam_index

    hostile = "<img src=x onerror=alert(1)>.jpg"
    page = write_gradcam_index([{"file": "gradcam_000.png", "path": hostile, "true": "glioma", "predicted": "glioma",
                                 "confidence": 0.873}], tmp_path, "resnet18").read_text()
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in page and "onerror=alert(1)>" not in page
    assert page.count("<img") == 1 and "87.3%" in page and "MISCLASSIFIED" not in page

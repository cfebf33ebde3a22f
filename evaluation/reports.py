"""Evaluation outputs: evaluation_report.txt, predictions.csv, the JSON files, and the --compare table."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from core.fileio import atomic_file, write_json_atomic, write_text_atomic
from core.hardware import hardware_summary_metrics
from evaluation.gates import format_gates

COMPARISON_COLUMNS = ("rank", "model", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "macro_f1",
                      "balanced_accuracy", "latency_ms", "throughput_images_per_s", "device", "gates",
                      "n_test", "checkpoint_epoch", "created")


def write_json(path, obj) -> Path:
    """Write JSON atomically (readers such as run_experiments.py never see half a file)."""
    return write_json_atomic(path, obj)


def write_predictions(path, rel_paths: list[str], y_true, y_prob, class_names: list[str]) -> Path:
    """One row per test image: path (as in the manifest), true and predicted class, a probability per class.

    Probabilities are written with repr() (shortest exact round trip), so figures recomputed from
    this file match evaluation_metrics.json exactly.
    """
    y_prob = np.asarray(y_prob, dtype=np.float64)
    with atomic_file(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "true_class", "predicted_class", *(f"prob_{c}" for c in class_names)])
        for rel, t, p in zip(rel_paths, y_true, y_prob):
            writer.writerow([rel, class_names[int(t)], class_names[int(p.argmax())], *(repr(float(v)) for v in p)])
    return Path(path)


def _ci(d: dict, pct: bool = True) -> str:
    if d["value"] is None:
        return "n/a (no images)"
    f = (lambda v: f"{v:.2%}") if pct else (lambda v: f"{v:.4f}")
    return f"{f(d['value'])} [{f(d['ci_low'])}, {f(d['ci_high'])}]"


def format_evaluation(r: dict) -> str:
    """The human-readable report: every figure of evaluation_metrics.json with its interval."""
    conf = f"{r['confidence']:.0%}"
    auc = "n/a" if r["roc_auc_macro"] is None else f"{r['roc_auc_macro']:.4f}"
    external = r.get("kind") == "external"
    lines = [*_external_lines(r),
             f"Evaluation of {r['model']} (checkpoint {r['checkpoint']}, epoch {r['checkpoint_epoch']})",
             f"{'External set' if external else 'Test split'}: {r['n_test']} images of {r['split_manifest']} "
             f"(fingerprint {r['data_fingerprint']})",
             f"Intervals: {conf} stratified bootstrap, {r['bootstrap_samples']} resamples", "",
             f"Accuracy:          {_ci(r['accuracy'])}",
             f"Balanced accuracy: {_ci(r['balanced_accuracy'])}",
             f"Macro F1:          {_ci(r['macro_f1'], pct=False)}",
             f"ROC AUC (macro, one-vs-rest): {auc}", ""]
    width = max(12, *(len(c) for c in r["class_names"]))
    lines.append(f"{'class':<{width}} {'precision':>9} {'sensitivity [' + conf + ' CI]':>27} "
                 f"{'specificity [' + conf + ' CI]':>27} {'f1':>7} {'AUC':>7} {'support':>8}")
    for c, row in r["per_class"].items():
        auc_c = "n/a" if row["roc_auc"] is None else f"{row['roc_auc']:.4f}"
        lines.append(f"{c:<{width}} {row['precision']:>9.4f} {_ci(row['sensitivity']):>27} "
                     f"{_ci(row['specificity']):>27} {row['f1']:>7.4f} {auc_c:>7} {row['support']:>8d}")
    lines += ["", "Confusion matrix (rows: true class, columns: predicted; count and % of the true class)",
              " " * width + "".join(f"{c[:14]:>16}" for c in r["class_names"])]
    for c, counts, pcts in zip(r["class_names"], r["confusion_matrix"], r["confusion_matrix_row_pct"]):
        lines.append(f"{c:<{width}}" + "".join(f"{f'{n} ({p:.1f}%)':>16}" for n, p in zip(counts, pcts)))
    lines += ["", *_calibration_lines(r["calibration"]), *_timing_lines(r["timing"]),
              *hardware_lines(r.get("hardware")),
              f"Class imbalance: {r['class_imbalance_ratio']:.2f}:1 (largest / smallest class in the training split: "
              + ", ".join(f"{k} {v}" for k, v in r.get("train_class_counts", {}).items()) + ")"]
    lines += [f"Note: {n}" for n in r.get("notes", [])]
    lines += _series_lines(r.get("series"), r["class_names"], conf)
    lines += answer_check_lines(r.get("answer_checks"), conf)
    if r.get("artifact"):  # evaluate.py --onnx: the figures are the exported file's, not the PyTorch model's
        a = r["artifact"]
        lines.insert(1, f"Scored artifact: {a['path']} ({a['precision']}, {a['runtime']})")
    return "\n".join(lines)


def _series_lines(s: dict | None, class_names: list[str], conf: str) -> list[str]:
    """The series level beside the slice level: the same figures over series read by the series rule."""
    if not s:
        return []
    size = s["slices_per_series"]
    width = max(12, *(len(c) for c in class_names))
    lines = ["", f"Series level: {s['n_series']} series ({size['min']}-{size['max']} slices, median "
                 f"{size['median']:g}) read by the series rule ({s['rule']}); intervals over series",
             f"Accuracy:          {_ci(s['accuracy'])}",
             f"Balanced accuracy: {_ci(s['balanced_accuracy'])}",
             f"Macro F1:          {_ci(s['macro_f1'], pct=False)}",
             f"{'class':<{width}} {'sensitivity [' + conf + ' CI]':>27} {'specificity [' + conf + ' CI]':>27} "
             f"{'series':>7}"]
    for c, row in s["per_class"].items():
        lines.append(f"{c:<{width}} {_ci(row['sensitivity']):>27} {_ci(row['specificity']):>27} {row['support']:>7d}")
    return lines + [f"Note (series level): {n}" for n in s.get("notes", [])]


REASON_WORDS = {"low_confidence": "top probability under {refer_below:.0%}",
                "prediction_set": "more than one class in the prediction set",
                "out_of_distribution": "out of distribution (feature distance past the limit)",
                "unlike_training": "unlike the training data (intensity)"}


def answer_check_lines(a: dict | None, conf: str) -> list[str]:
    """When the model refers instead of answering, how well its conformal sets cover, how its OOD detector does."""
    if not a:
        return []
    ref = a["refer"]
    lines = ["", f"Refer rule on the test split (intervals: {conf} exact): referred {_ci(ref['rate'])}; accuracy of "
                 f"what was not referred {_ci(ref['accuracy_not_referred'])}"]
    lines += [f"  {REASON_WORDS[k].format(refer_below=ref['refer_below'])}: {_ci(v)}"
              for k, v in ref["reasons"].items()]
    c = a.get("conformal")
    if c:
        lines += [f"Conformal prediction sets (target coverage {c['coverage_target']:.0%}, "
                  f"{'per class' if c['class_conditional'] else 'one threshold'}): coverage {_ci(c['coverage'])}, "
                  f"mean set size {_ci(c['mean_set_size'], pct=False)}, more than one class "
                  f"{_ci(c['more_than_one_class'])}"]
    if a.get("ood"):
        lines.append(f"Out-of-distribution limit: feature distance {a['ood']['limit']:.3f} (the validation split's "
                     f"{a['ood']['percentile']:g}th percentile)")
    for name, s in a.get("ood_sets", {}).items():
        referred = f", referred {_ci(s['referred'])}" if "referred" in s else ""
        lines.append(f"  OOD set {name} ({s['n']} images; {s['description']}): AUROC {_ci(s['auroc'], pct=False)}"
                     + referred)
    return lines + [f"Note: {n}" for n in a.get("notes", [])]


def _calibration_lines(cal: dict) -> list[str]:
    lines = [f"Calibration: ECE {cal['ece']:.4f} ({cal['n_bins']} bins)"]
    if cal["temperature"] is not None:
        lines.append(f"  temperature {cal['temperature']:.3f} (fitted on the validation split): "
                     f"ECE {cal['ece_after_temperature']:.4f} after scaling")
    return lines


def _external_lines(r: dict) -> list[str]:
    if r.get("kind") != "external":
        return []
    e = r["external"]
    lines = [f"EXTERNAL VALIDATION on {e['path']} (training manifest {e['training_manifest']})",
             "Folders: " + ", ".join(f"{f} -> {c}" for f, c in e["folder_classes"].items())]
    if e["unmapped_folders"]:
        lines.append("Left out, matching no class: "
                     + ", ".join(f"{f} ({n} files)" for f, n in e["unmapped_folders"].items()))
    lines.append(f"Left out: {e['left_out_in_training_manifest']} image(s) byte-identical to the training "
                 f"manifest's, {e['left_out_unreadable']} unreadable")
    return [*lines, ""]


def hardware_lines(hw: dict | None) -> list[str]:
    """CPU, RAM and GPU readings taken while the evaluation ran."""
    if not hw or not hw.get("cpu_pct"):
        return []
    cpu, ram = hw["cpu_pct"], hw["ram_pct"]
    lines = [f"Hardware during evaluation ({hw['samples']} readings over {hw['seconds']:.1f} s): "
             f"CPU {cpu['mean']:.0f}% mean, {cpu['max']:.0f}% max of {hw['cpu_count']} cores; "
             f"RAM {ram['mean']:.0f}% mean, {ram['max']:.0f}% max"]
    for g in hw.get("gpus", []):
        util = g["utilization_pct"]
        util_text = f"utilization {util['mean']:.0f}% mean, {util['max']:.0f}% max" if util else "utilization n/a"
        lines.append(f"  GPU {g['index']} ({g['name']}): {util_text}; memory {g['memory_used_mb']['max']:.0f} MB max "
                     f"of {g['memory_total_mb']:.0f} MB ({g['memory_pct']['max']:.0f}%)")
    return lines


def _timing_lines(t: dict) -> list[str]:
    return [f"Inference on {t['device']}: {t['latency_ms_mean']:.2f} ms per image (p95 {t['latency_ms_p95']:.2f} ms) "
            f"at batch size 1; {t['throughput_images_per_s']:.1f} images/s at batch size {t['batch_size']}"]


def format_side_by_side(internal: dict, external: dict) -> str:
    """Internal test split and external set, figure by figure, with their intervals."""
    rows = [("accuracy", internal["accuracy"], external["accuracy"]),
            ("balanced accuracy", internal["balanced_accuracy"], external["balanced_accuracy"]),
            ("macro F1", internal["macro_f1"], external["macro_f1"])]
    rows += [(f"sensitivity {c}", internal["per_class"][c]["sensitivity"], external["per_class"][c]["sensitivity"])
             for c in internal["per_class"]]
    heads = (f"internal ({internal['n_test']} images)", f"external ({external['n_test']} images)")
    lines = [f"Internal vs external ({internal['confidence']:.0%} CI)", f"{'':<24} {heads[0]:>28} {heads[1]:>28}"]
    lines += [f"{name:<24} {_ci(a, name != 'macro F1'):>28} {_ci(b, name != 'macro F1'):>28}" for name, a, b in rows]
    return "\n".join(lines)


def write_report(path, record: dict, validation: dict | None = None) -> Path:
    text = format_evaluation(record)
    if validation is not None:
        text += "\n\n" + format_gates(validation)
    write_text_atomic(path, text + "\n")
    return Path(path)


def classification_figures(r: dict, prefix: str) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1 (with intervals) and the per-class figures, as flat scalars."""
    out = {}
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        out.update({f"{prefix}{key}": r[key]["value"], f"{prefix}{key}_ci_low": r[key]["ci_low"],
                    f"{prefix}{key}_ci_high": r[key]["ci_high"]})
    for c, row in r["per_class"].items():
        for key in ("sensitivity", "specificity"):
            out[f"{prefix}{key}_{c}"] = row[key]["value"]
            out[f"{prefix}{key}_{c}_ci_low"] = row[key]["ci_low"]
        out[f"{prefix}f1_{c}"] = row["f1"]
        if row["roc_auc"] is not None:
            out[f"{prefix}roc_auc_{c}"] = row["roc_auc"]
    if r["roc_auc_macro"] is not None:
        out[f"{prefix}roc_auc_macro"] = r["roc_auc_macro"]
    return out


def flat_metrics(r: dict, prefix: str = "test_") -> dict[str, float]:
    """Scalar figures for MLflow / W&B (test_accuracy, test_accuracy_ci_low, test_sensitivity_<class>..., the
    series level's series_accuracy ... when the test split holds DICOM series, the hardware readings
    hw_cpu_pct_mean ...). An external set's: external_accuracy, ..., external_ece, ..."""
    out = classification_figures(r, prefix)
    if r.get("series"):
        out.update(classification_figures(r["series"], "series_"))  # series_accuracy, series_sensitivity_<class> ...
    other = "" if prefix == "test_" else prefix  # the test split's keep their first, unprefixed names
    out[f"{other}ece"] = r["calibration"]["ece"]
    if r["calibration"]["ece_after_temperature"] is not None:
        out[f"{other}ece_after_temperature"] = r["calibration"]["ece_after_temperature"]
    out.update({f"{other}latency_ms_mean": r["timing"]["latency_ms_mean"],
                f"{other}latency_ms_p95": r["timing"]["latency_ms_p95"],
                f"{other}throughput_images_per_s": r["timing"]["throughput_images_per_s"],
                f"{other}class_imbalance_ratio": r["class_imbalance_ratio"]})
    if r.get("hardware"):
        out.update(hardware_summary_metrics(r["hardware"], prefix=f"{other}hw_"))
    out.update(answer_check_metrics(r.get("answer_checks"), other))
    return out


def answer_check_metrics(a: dict | None, prefix: str) -> dict[str, float]:
    """refer_rate, accuracy_not_referred, conformal_coverage, mean_set_size, ood_auroc_<set> (with intervals)."""
    if not a:
        return {}
    figures = {"refer_rate": a["refer"]["rate"], "accuracy_not_referred": a["refer"]["accuracy_not_referred"]}
    if a.get("conformal"):
        figures.update(conformal_coverage=a["conformal"]["coverage"], mean_set_size=a["conformal"]["mean_set_size"])
    for name, s in a.get("ood_sets", {}).items():
        figures["ood_auroc_" + "".join(ch if ch.isalnum() else "_" for ch in name)] = s["auroc"]
    out = {}
    for key, d in figures.items():
        if d["value"] is not None:  # a share of nothing (every image referred) is not a figure
            out.update({f"{prefix}{key}": d["value"], f"{prefix}{key}_ci_low": d["ci_low"],
                        f"{prefix}{key}_ci_high": d["ci_high"]})
    return out


# ---- --compare: every model evaluated under the checkpoints folder ----

def _gate_status(folder: Path) -> str:
    path = folder / "medical_validation.json"
    if not path.is_file():
        return "not checked"
    try:
        v = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable"
    return ("PASS" if v["deployment_ready"] else "FAIL") + (" (strict)" if v.get("strict") else "")


def collect_evaluations(root, log=print) -> list[dict]:
    """One row per checkpoints/*_outputs/evaluation_metrics.json, ranked by accuracy, then macro F1."""
    rows = []
    for path in sorted(Path(root).glob("*_outputs/evaluation_metrics.json")):
        try:
            r = json.loads(path.read_text())
            rows.append({
                "model": r["model"], "accuracy": r["accuracy"]["value"], "accuracy_ci_low": r["accuracy"]["ci_low"],
                "accuracy_ci_high": r["accuracy"]["ci_high"], "macro_f1": r["macro_f1"]["value"],
                "balanced_accuracy": r["balanced_accuracy"]["value"], "latency_ms": r["timing"]["latency_ms_mean"],
                "throughput_images_per_s": r["timing"]["throughput_images_per_s"], "device": r["timing"]["device"],
                "gates": _gate_status(path.parent), "n_test": r["n_test"],
                "checkpoint_epoch": r["checkpoint_epoch"], "created": r["created"],
                "data_fingerprint": r["data_fingerprint"]})
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            log(f"⚠️  skipped {path}: not a readable evaluation ({type(exc).__name__}: {exc})")
    rows.sort(key=lambda row: (-row["accuracy"], -row["macro_f1"], row["latency_ms"]))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def recommend(rows: list[dict]) -> tuple[dict | None, str]:
    """The best-ranked model that passes the gates (else the best-ranked one), with the reason."""
    if not rows:
        return None, "no evaluated model found"
    passing = [r for r in rows if r["gates"].startswith("PASS")]
    pick = passing[0] if passing else rows[0]
    if passing:
        basis = "it passes the medical-validation gates"
    elif any(r["gates"].startswith("FAIL") for r in rows):
        basis = "no model passes the medical-validation gates yet, so it is only the best available"
    else:
        basis = "gates not checked (run evaluate.py --medical-validation)"
    reason = (f"{pick['model']}: highest accuracy ({pick['accuracy']:.2%}, 95% CI {pick['accuracy_ci_low']:.2%}-"
              f"{pick['accuracy_ci_high']:.2%}) and macro F1 ({pick['macro_f1']:.4f}) of the models ranked, "
              f"{pick['latency_ms']:.1f} ms per image on {pick['device']}; {basis}")
    return pick, reason


def format_comparison(rows: list[dict], reason: str) -> str:
    head = (f"{'#':>2} {'model':<18} {'accuracy [95% CI]':>26} {'macro F1':>9} {'bal. acc':>9} "
            f"{'ms/image':>9} {'images/s':>9} {'gates':>18}")
    lines = ["Model comparison (ranked by accuracy, then macro F1)", head, "-" * len(head)]
    for r in rows:
        acc = f"{r['accuracy']:.2%} [{r['accuracy_ci_low']:.2%}, {r['accuracy_ci_high']:.2%}]"
        lines.append(f"{r['rank']:>2} {r['model']:<18} {acc:>26} {r['macro_f1']:>9.4f} {r['balanced_accuracy']:>9.2%} "
                     f"{r['latency_ms']:>9.2f} {r['throughput_images_per_s']:>9.1f} {r['gates']:>18}")
    if len({r["data_fingerprint"] for r in rows}) > 1:
        lines.append("⚠️  these models were evaluated on different test splits: their figures are not comparable")
    lines.append(f"🏆 Recommended: {reason}")
    return "\n".join(lines)


def write_comparison_csv(path, rows: list[dict]) -> Path:
    with atomic_file(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COMPARISON_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)

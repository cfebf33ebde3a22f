"""The benchmark scripts keep working: each runs in --smoke mode and prints its table and JSON line.

The figures themselves are not asserted (they depend on the machine and its load).
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from benchmarks import bench_data, bench_inference, bench_precision, bench_serving, bench_training


def run_smoke(module, tmp_path, capsys, *extra) -> dict:
    args = module.get_args_parser().parse_args(["--smoke", "--data-dir", str(tmp_path), *extra])
    assert module.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["benchmark"] == module.__name__.split(".")[-1]
    assert record["machine"]["cpu"] and record["machine"]["cores"] >= 1
    assert any(line.startswith("---") for line in lines), "no table printed"
    assert lines[-2].startswith(f"measured on: {record['machine']['cpu']} (flags: ")  # the CPU beside the figures
    return record["results"]


def test_training_smoke(tmp_path, capsys):
    results = run_smoke(bench_training, tmp_path, capsys, "--threads", "1", "--workers", "1", "--precision", "fp32")
    models = {"model fp32", "model fp32 channels_last", "model bf16", "model bf16 channels_last"}
    assert set(results["images_per_s"]) == {"loop", "toolkit", "original"} | models
    assert all(v["median"] > 0 for v in results["images_per_s"].values())
    assert results["best_model"] in models and results["pipeline"]["row"] == "model fp32 channels_last"
    assert {"loop/best_model", "loop/same_model", "toolkit/same_model", "model bf16/best_model"} <= \
        set(results["ratios"])


def test_inference_smoke(tmp_path, capsys):
    results = run_smoke(bench_inference, tmp_path, capsys, "--threads", "1")
    assert set(results["latency"]) == {"onnx_e2e", "torch_eager", "onnx_limit", "int8_e2e", "int8_limit", "ood_limit"}
    assert all(v["median_ms"] > 0 and v["p95_ms"] >= v["median_ms"] for v in results["latency"].values())
    assert results["ratios"]["onnx_e2e/onnx_limit"] > 0 and results["ratios"]["int8_e2e/onnx_limit"] > 0
    assert results["ratios"]["ood_limit/onnx_limit"] > 0


@pytest.mark.slow("each data-path task in its own subprocess (for its peak memory), at 1x and 10x the data set")
def test_data_smoke(tmp_path, capsys):
    results = run_smoke(bench_data, tmp_path, capsys)
    for scale in ("1x", "10x"):
        assert results[f"decode@{scale}"]["rate"]["median"] > 0
        assert results[f"stats@{scale}"]["rate_cold"]["median"] > 0
        assert results[f"evaluate@{scale}"]["n_images"] > 0
    assert results["stats_memory_10x_vs_1x"] > 0


def test_serving_smoke(tmp_path, capsys):
    results = run_smoke(bench_serving, tmp_path, capsys)
    assert [r["clients"] for r in results["server"]] == [1, 4]
    assert all(r["ok"] == r["answers"] > 0 and r["errors"] == 0 for r in results["server"] + results["mlflow"])
    assert results["onnx_limit"]["per_s"] > 0 and results["offline"]["median_ms"] > 0
    assert results["memory"]["server_tracebacks"] == 0


def test_a_serving_anchor_that_cannot_start_is_a_row_with_its_reason(tmp_path, monkeypatch):
    """`mlflow models serve` is started from this interpreter's environment (its bin/ need not be on PATH), and
    when it cannot start (here: no such registered model) the anchor is one row saying why, not a traceback."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the interpreter's bin/ (uvicorn, mlflow) not on it
    env = bench_serving.interpreter_env()
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    args = bench_serving.get_args_parser().parse_args(["--smoke", "--model", "not_registered"])
    rows = bench_serving.mlflow_anchor(args, tmp_path, None, tmp_path)
    assert len(rows) == 1 and rows[0]["failed"].startswith("mlflow models serve exited")
    assert "not_registered" in rows[0]["log_tail"]


def test_precision_smoke(tmp_path, capsys):
    results = run_smoke(bench_precision, tmp_path, capsys)
    assert set(results["runs"]) == {"fp32", "bf16"} and results["reference"] == "fp32"
    for run in results["runs"].values():
        low, value, high = run["val_acc"][1], run["val_acc"][0], run["val_acc"][2]
        assert low <= value <= high and run["peak_rss_mb"] > 0 and run["wall_s"] > 0
    assert results["runs"]["fp32"]["val_inside_reference_ci"]  # the reference lies inside its own interval


@pytest.mark.slow("starts a local Ray beside the single-process loop it is compared with")
def test_archive_smoke(tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-scale.txt")
    from benchmarks import bench_archive

    results = run_smoke(bench_archive, tmp_path, capsys)
    assert results["loop"]["per_s"]["median"] > 0 and results["ray"]["per_s_past_startup"]["median"] > 0
    assert results["ray"]["runs"][0]["rows"] == 48 and results["ray"]["startup_s"]["median"] > 0
    assert results["ratios"]["ray_past_startup/loop"] > 0
    first = results["loop"]["runs"][0]  # the loop's own split, and what it allows on these cores
    assert first["decode_s"] > 0 and first["model_s"] > 0
    assert 1 <= results["ratios"]["ceiling_from_loop_split"] <= results["threads"]

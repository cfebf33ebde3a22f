"""score_archive.py: a real registered model scores a folder of JPEGs and DICOM series on a real local Ray into
Parquet; the answers equal inference_with_mlflow.py's, a rerun is a no-op, a changed file is scored again, a bad
file is a row with its error, and each run is one audit record."""
from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from server_process import free_port

from conftest import ROOT, run_script, stop_process_group, write_dicom

pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-scale.txt")

from archive.table import OUTPUT, ArchiveOutput, read_output  # noqa: E402

MODEL = "brain-cancer-resnet18"


@pytest.fixture(scope="module")
def archive(tiny_data, tmp_path_factory) -> Path:
    """An archive as a site has it: JPEG slices in nested folders (names with spaces), one MR series of three
    single-frame DICOM files, a multi-frame file, a corrupt JPEG, an empty .dcm and a note."""
    root = tmp_path_factory.mktemp("archive") / "site archive"
    slices = sorted(tiny_data.rglob("*.jpg"))[:6]
    for i, src in enumerate(slices):
        dst = root / f"year {2020 + i % 2}" / f"slice {i}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    grays = [np.asarray(Image.open(p).convert("L")).astype(np.uint16) * 16 for p in slices[:3]]
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    (root / "mr").mkdir()
    for k, gray in enumerate(grays, start=1):
        write_dicom(root / "mr" / f"IM{k}.dcm", gray, (2000, 4000), StudyInstanceUID=study,
                    SeriesInstanceUID=series, InstanceNumber=k)
    write_dicom(root / "mr" / "cine.dcm", np.stack(grays))
    (root / "broken.jpg").write_bytes(slices[0].read_bytes()[:300])
    (root / "mr" / "empty.dcm").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def score(registered, *args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "score_archive.py"), *map(str, registered), "--model", MODEL,
            "--alias", "staging", *map(str, args)]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def cli_probabilities(registered, paths: list[Path]) -> dict:
    """{record name: probabilities} from inference_with_mlflow.py --json on the same files."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        run_script("inference_with_mlflow", registered + ["--model", MODEL, "--alias", "staging", "--json",
                                                          "--image", *paths])
    return {p["path"]: p["probabilities"] for p in json.loads(out.getvalue())["predictions"]}


def runs(db: Path) -> list[dict]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM archive_runs ORDER BY started_at")]


@pytest.mark.slow("starts a local Ray, then scores the archive three times: all of it, a no-op rerun, a changed "
                  "file")
def test_an_archive_is_scored_a_rerun_is_a_no_op_and_a_changed_file_is_scored_again(registered, archive, tmp_path):
    out, db = tmp_path / "preds.parquet", tmp_path / "audit.db"
    first = score(registered, "--root", archive, "--out", out, "--database", f"sqlite:///{db}", "--cpus", 2,
                  cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    table = read_output(out).to_pylist()
    rows = {(Path(r["path"]).relative_to(archive).as_posix(), r["frame"]): r for r in table}
    assert len(table) == 6 + 3 + 3 + 2  # the slices, the series, cine's three frames, the two bad files
    assert {r["kind"] for r in table} == {"image"}
    # the answers are the registry model's, to the digit inference_with_mlflow.py gives
    expected = cli_probabilities(registered, [p for p in archive.rglob("*") if p.suffix in (".jpg", ".dcm")
                                              and p.stat().st_size > 300])
    for (rel, frame), r in rows.items():
        if r["error"] is None:
            want = expected[str(archive / rel) + (f"#frame={frame}" if frame else "")]
            got = json.loads(r["probabilities"])
            assert max(abs(got[k] - want[k]) for k in want) <= 1e-6, rel
            assert r["predicted_class"] == max(got, key=got.get) and r["confidence"] == max(got.values())
            assert isinstance(r["refer"], bool) and (r["refer"] == bool(r["refer_reasons"]))
    assert rows[("mr/IM2.dcm", None)]["series_uid"] == "1.2.826.0.1.3680043.8.498.2"
    assert rows[("mr/IM2.dcm", None)]["study_uid"] == "1.2.826.0.1.3680043.8.498.1"
    assert rows[("mr/IM2.dcm", None)]["sop_instance_uid"]
    assert [rows[("mr/cine.dcm", k)]["frame"] for k in (1, 2, 3)] == [1, 2, 3]
    assert rows[("broken.jpg", None)]["error"] and rows[("broken.jpg", None)]["predicted_class"] is None
    assert "empty" in rows[("mr/empty.dcm", None)]["error"]
    assert {(r["model_name"], r["model_version"], r["flavor"]) for r in table} == {(MODEL, "1", "onnx")}
    assert len({r["run_id"] for r in table}) == 1
    assert out.stat().st_mode & 0o077 == 0  # the rows name patients' files: owner only
    [run] = runs(db)
    assert (run["model_name"], run["model_version"], run["model_alias"], run["flavor"]) == (MODEL, "1", "staging",
                                                                                           "onnx")
    assert (run["files"], run["files_skipped"], run["rows"], run["errors"]) == (12, 0, 14, 2)
    assert run["id"] == table[0]["run_id"] and run["user"] and run["engine"].startswith("ray ")
    assert run["output_sha256"] == ArchiveOutput(out).digest()

    parts = sorted(out.glob("*.parquet"))
    again = score(registered, "--root", archive, "--out", out, "--database", f"sqlite:///{db}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(out.glob("*.parquet")) == parts  # a no-op: nothing written
    assert (runs(db)[1]["rows"], runs(db)[1]["files_skipped"]) == (0, 12)
    assert runs(db)[1]["output_sha256"] == run["output_sha256"]

    changed = archive / "year 2020" / "slice 0.jpg"
    Image.open(changed).rotate(90).save(changed, quality=95)
    third = score(registered, "--root", archive, "--out", out, "--database", f"sqlite:///{db}", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    new = [r for r in read_output(out).to_pylist() if r["run_id"] == runs(db)[2]["id"]]
    assert [Path(r["path"]).name for r in new] == ["slice 0.jpg"] and runs(db)[2]["rows"] == 1


def test_a_run_killed_mid_write_leaves_whole_files_and_the_next_run_keeps_them(tmp_path):
    out = tmp_path / "preds.parquet"
    staging = out / ".staging-dead"
    staging.mkdir(parents=True)
    row = dict.fromkeys(OUTPUT.names) | {"kind": "image", "path": "/a.jpg", "sha256": "ab" * 32,
                                         "model_name": MODEL, "model_version": "1", "flavor": "onnx"}
    pq.write_table(pa.Table.from_pylist([row], schema=OUTPUT), staging / "whole.parquet")
    (staging / "half.parquet").write_bytes((staging / "whole.parquet").read_bytes()[:100])
    with ArchiveOutput(out) as output:
        assert output.adopt_staged() == 1
        assert output.done({"model_name": MODEL, "model_version": "1", "flavor": "onnx"}) == {("/a.jpg", "ab" * 32)}
        assert output.done({"model_name": MODEL, "model_version": "2", "flavor": "onnx"}) == frozenset()
    assert [p.name for p in out.iterdir() if not p.name.startswith(".lock")] == ["part-dead-whole.parquet"]


def test_user_errors_are_one_line(registered, archive, tmp_path):
    (tmp_path / "a file").write_text("x")
    for args, says in ((["--root", archive, "--out", tmp_path / "a file"], "is a file"),
                       (["--root", tmp_path / "missing", "--out", tmp_path / "o"], "no such file or folder"),
                       (["--out", tmp_path / "o"], "nothing to score"),
                       (["--root", archive, "--out", tmp_path / "o", "--actors", "0"], "--actors must be at least 1")):
        done = score(registered, *args, cwd=tmp_path)
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow("starts a Ray head node (ray start --head), then scores the archive on it")
def test_a_running_ray_cluster_is_joined_with_address(registered, archive, tmp_path):
    """`ray start --head` on loopback with a cluster token, as a site starts its cluster's head, and score_archive.py
    --address HOST:PORT on it with the same token in its environment: the same rows as a local Ray, the run's engine
    naming the cluster; the head is stopped by the test."""
    port, session = free_port(), tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must be short
    # Ray's token authentication: the token in the environment of the head and of every driver, never in argv
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    ray = Path(sys.executable).parent / "ray"
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([str(ray), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={session}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(ray), "status", f"--address=127.0.0.1:{port}"], capture_output=True,
                             env=env).returncode:
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        out, db = tmp_path / "preds.parquet", tmp_path / "audit.db"
        without = score(registered, "--root", archive, "--out", out, "--database", f"sqlite:///{db}", "--address",
                        f"127.0.0.1:{port}", cwd=tmp_path, env={k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"})
        assert without.returncode == 2 and "cannot join the Ray cluster" in without.stderr  # no token: one line
        assert "Traceback" not in without.stderr
        done = score(registered, "--root", archive, "--out", out, "--database", f"sqlite:///{db}", "--address",
                     f"127.0.0.1:{port}", cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        stop_process_group(head, timeout=90)  # Ray drains for up to 30 s on SIGTERM
        log.close()
        shutil.rmtree(session, ignore_errors=True)
    table = read_output(out).to_pylist()
    assert len(table) == 14 and sum(r["error"] is not None for r in table) == 2
    [run] = runs(db)
    assert run["engine"].startswith("ray ") and f"cluster 127.0.0.1:{port}" in run["engine"]

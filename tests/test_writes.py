"""Writes that cannot tear or collide, and stops that clean up: concurrent writers of one file, a second
trainer on one output folder, SIGTERM during a cache build and during run_experiments.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, write_overlay
from core.checkpoint import load_checkpoint
from core.errors import UserError
from core.fileio import FolderLock, write_json_atomic


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    """End a process this test started, and its process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


SAVER = """
import sys, torch
from core.checkpoint import save_checkpoint
from core.fileio import write_json_atomic
folder, me = sys.argv[1], int(sys.argv[2])
for i in range(150):
    state = {"model_state": {"w": torch.full((64,), float(i))}, "model_name": "m", "class_names": ["a"],
             "img_size": 8, "mean": [0.0] * 3, "std": [1.0] * 3, "epoch": i, "metrics": {"writer": me}, "config": {}}
    save_checkpoint(state, f"{folder}/best_model.pth")
    write_json_atomic(f"{folder}/report.json", {"writer": me, "i": i})
print("done")
"""


def test_two_runs_saving_into_one_folder_never_collide(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), str(k)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip() == "done", err[-2000:]
    ckpt = load_checkpoint(tmp_path / "best_model.pth")  # whole, from one writer or the other
    assert ckpt["epoch"] == 149 and ckpt["metrics"]["writer"] in (1, 2)
    assert json.loads((tmp_path / "report.json").read_text())["i"] == 149
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pth", "report.json"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    write_json_atomic(tmp_path / "r.json", {"ok": 1})
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "r.json", {"bad": float("nan")})  # strict JSON refuses NaN mid-write
    assert json.loads((tmp_path / "r.json").read_text()) == {"ok": 1} and len(list(tmp_path.iterdir())) == 1


def test_a_held_folder_names_its_holder(tmp_path):
    with FolderLock(tmp_path, "train.py"):
        with pytest.raises(UserError, match=rf"is in use by train.py \(pid {os.getpid()} on .+, started 20"):
            FolderLock(tmp_path, "train.py").acquire()
    with FolderLock(tmp_path, "train.py"):  # released on exit: the next writer gets it
        pass


def test_a_second_trainer_on_the_same_model_is_refused_while_the_first_goes_on(tmp_path, tiny_data):
    overlay = write_overlay(tmp_path, tiny_data, **{"train.epochs": 1000, "train.patience": 1000,
                                                    "monitoring.mlflow.enabled": False,
                                                    "monitoring.tensorboard": False})
    argv = [sys.executable, str(ROOT / "train.py"), "--config", str(overlay), "--model", "resnet18"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    lock = tmp_path / "checkpoints" / "resnet18_outputs" / FolderLock.NAME
    try:
        wait_for(lambda: "Epoch 1/1000 Summary" in log.read_text(), 240, "the first epoch", first)
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid
        second = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-2000:]
        (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
        assert f"is in use by train.py (pid {first.pid} on {holder['host']}, started {holder['started']})" in line
        assert "Traceback" not in second.stderr and first.poll() is None  # the first one trains on
        first.send_signal(signal.SIGTERM)  # it saves and stops; the folder is free again
        assert first.wait(timeout=240) == 130
    finally:
        stop(first)
    assert (tmp_path / "checkpoints" / "resnet18_outputs" / "last_model.pth").is_file()


CACHE_BUILD = """
import sys, time
import data.cache as cache
from data.synthetic import generate_dataset

root = generate_dataset(sys.argv[1], n_per_class=40, size=48, seed=0)
paths = sorted(root.rglob("*.jpg"))
cache.PROCESS_MIN_IMAGES = int(sys.argv[3])
decode = cache.read_frames
def slow(*args, **kwargs):  # a slow disk: the build is still running when SIGTERM comes
    time.sleep(0.2)
    return decode(*args, **kwargs)
cache.read_frames = slow
slot = cache.CacheSlot(sys.argv[2], "f" * 16, "train", 32)
cache.open_cache(slot, paths, [p.name for p in paths], progress=False)
"""


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_sigterm_during_a_cache_build_leaves_no_temporary_file(tmp_path, workers):
    cache_dir = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", CACHE_BUILD, str(tmp_path / "demo"), str(cache_dir),
                             "100000" if workers == "threads" else "10"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: list(cache_dir.glob(".*.tmp.npy")), 240, "the cache build", proc)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # to the builder only, as a scheduler's kill does
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode != 0 and "Terminated" in err  # stopped inside the build, by the signal
    assert sorted(p.name for p in cache_dir.iterdir()) == ["ffffffffffffffff_train_32px.npy.lock"]


def children_of(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc/*/stat)."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


def test_sigterm_stops_the_running_child_and_the_summary_is_still_written(tmp_path, tiny_data):
    overlay = write_overlay(tmp_path, tiny_data, **{"train.epochs": 1000, "train.patience": 1000,
                                                    "monitoring.tensorboard": False})
    argv = [sys.executable, str(ROOT / "run_experiments.py"), "--config", str(overlay), "--models", "resnet18",
            "--full", "--quiet"]
    parent = subprocess.Popen(argv, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = tmp_path / "checkpoints" / "experiments" / "logs" / "resnet18_train.log"
    try:
        wait_for(lambda: log.is_file() and "Epoch 1/1000 Summary" in log.read_text(), 300, "an epoch", parent)
        (child,) = children_of(parent.pid)
        parent.send_signal(signal.SIGTERM)  # to run_experiments.py only, as a scheduler's kill does
        out, err = parent.communicate(timeout=300)
    finally:
        stop(parent)
    assert parent.returncode == 143 and "terminated" in err, err[-2000:]
    assert not Path(f"/proc/{child}").exists()  # the child stopped too: not orphaned
    assert "SIGTERM received: saving" in log.read_text()  # it was asked, and saved its state
    assert (tmp_path / "checkpoints" / "resnet18_outputs" / "last_model.pth").is_file()
    summary = json.loads((tmp_path / "checkpoints" / "experiments" / "experiments_summary.json").read_text())
    assert summary["interrupted"] is True
    assert [(e["model"], e["status"]) for e in summary["experiments"]] == [("resnet18", "FAILED")]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("brain-cancer-mri-experiments").experiment_id])
    assert run.info.status == "KILLED"

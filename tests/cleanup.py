"""What a test run must leave behind: no process it started, the user's checkout as it was, little temp space.

tests/conftest.py calls these from the run's controlling process (the only one with -n 0, the one that starts the
xdist workers otherwise): `become_subreaper()` when the run starts, `sweep()` and `checkout_changes()` when it ends.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
# Not the user's state: caches of the tools, and what the test run itself writes.
IGNORED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "test-artifacts"}


def become_subreaper() -> bool:
    """Orphans of this process's descendants (a server whose test process died, a worker killed on a timeout)
    become its children instead of PID 1's, so that the sweep at the end still finds them. Linux only."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


# Helpers of this interpreter that end with it (multiprocessing's resource tracker and fork server, torch's
# compile workers, which watch their parent): with -n 0 they are children of the run itself.
HELPERS = ("multiprocessing", "compile_worker")


def leftovers() -> list[psutil.Process]:
    """Descendants of this process still running: what a test started and did not stop, orphans reparented here
    included; zombies are reaped, and this interpreter's own helpers are not counted."""
    me = psutil.Process()
    found = []
    for proc in me.children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                if proc.ppid() == me.pid:
                    os.waitpid(proc.pid, os.WNOHANG)
                continue
            if proc.ppid() == me.pid and any(h in " ".join(proc.cmdline()) for h in HELPERS):
                continue
            found.append(proc)
        except (psutil.NoSuchProcess, ProcessLookupError, ChildProcessError):
            continue
    return found


def describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:200] or proc.name()}"
    except psutil.Error:
        return f"pid {proc.pid}"


def sweep(grace: float = 10.0) -> list[str]:
    """Wait up to `grace` seconds for the run's processes to end on their own (workers' children exit with them),
    then stop whatever is left, each with its whole process group (SIGTERM, then SIGKILL). Returns what was left."""
    deadline = time.monotonic() + grace
    left = leftovers()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = leftovers()
    named = [describe(p) for p in left]
    own_group = os.getpgrp()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in left:
            try:
                group = os.getpgid(proc.pid)
                if group != own_group:
                    os.killpg(group, sig)
                else:
                    proc.send_signal(sig)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        _, left = psutil.wait_procs(left, timeout=5)
        if not left:
            break
    leftovers()  # reaps the zombies of what was just stopped
    return named


def checkout_state(root: Path) -> dict[str, tuple[int, int]]:
    """The user's state in the checkout, as .gitignore names it (checkpoints/, mlflow.db, mlartifacts/, data/demo/,
    ...; tool caches aside): every file's (size, mtime) and every folder. Without git, every file of the checkout.
    Source files a developer edits while the tests run are not watched."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--directory"],
                                cwd=root, capture_output=True, text=True, timeout=60, check=True).stdout
        tops = [root / p for p in listed.split("\0") if p and not IGNORED & set(Path(p).parts)]
    except (OSError, subprocess.SubprocessError):
        tops = [root]
    state = {}
    for top in tops:
        if not top.is_dir():
            _record(state, root, top)
            continue
        state[str(top.relative_to(root)) + "/"] = (0, 0)
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d not in IGNORED]
            for name in dirs:  # an empty folder a script made is a change too
                state[str((Path(folder) / name).relative_to(root)) + "/"] = (0, 0)
            for name in files:
                _record(state, root, Path(folder) / name)
    return state


def _record(state: dict, root: Path, path: Path) -> None:
    try:
        st = path.lstat()
    except OSError:
        return
    state[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)


def checkout_changes(before: dict, after: dict, limit: int = 10) -> list[str]:
    """What a run changed in the checkout: files written, changed or removed (the first `limit`)."""
    changes = [f"written: {p}" for p in sorted(after.keys() - before.keys())]
    changes += [f"changed: {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    changes += [f"removed: {p}" for p in sorted(before.keys() - after.keys())]
    return changes[:limit] + ([f"... and {len(changes) - limit} more"] if len(changes) > limit else [])


def folder_size(folder: Path) -> int:
    """Bytes the files under `folder` take on disk (a sparse file counts what it holds, not what it claims)."""
    total = 0
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.lstat().st_blocks * 512
        except OSError:
            continue
    return total


def remove_large_files(folder: Path, over: int = 10_000_000) -> list[Path]:
    """Delete files over `over` bytes (weights, exported models, their MLflow copies) under `folder`: what a test
    failed on is in its logs and small files; the names removed are listed in LARGE-FILES-REMOVED.txt."""
    removed = []
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and path.lstat().st_blocks * 512 > over:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    if removed:
        (Path(folder) / "LARGE-FILES-REMOVED.txt").write_text("".join(f"{p}\n" for p in removed))
    return removed

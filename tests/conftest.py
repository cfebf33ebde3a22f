"""Shared fixtures: a tiny synthetic data set and a config overlay that keeps every output in tmp."""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import core  # noqa: E402,F401  (library telemetry off before any test imports MLflow)
from tests import cleanup  # noqa: E402
from tests.slowest import slow_setup  # noqa: E402

CHECKOUT, PROBLEMS = pytest.StashKey[dict](), pytest.StashKey[list]()

# Test files run in parallel (pyproject.toml: -n auto --dist loadfile), one worker per core up to 4.
MAX_WORKERS = 4
# Files that take longest start first, so that the others fill the remaining workers around them.
LONG_FILES = ("test_original_readme.py", "test_experiments.py", "test_serving.py", "test_review.py",
              "test_archive.py", "test_pacs.py", "test_registry.py")


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def is_controller(config) -> bool:
    """The process that owns the run: the only one with -n 0, the one that starts the xdist workers otherwise."""
    return not hasattr(config, "workerinput")


def pytest_configure(config) -> None:
    if is_controller(config):  # before any worker starts: every process of the run is then found at its end
        cleanup.become_subreaper()
        config.stash[CHECKOUT] = cleanup.checkout_state(ROOT)
    share_cores(config)


def share_cores(config) -> None:
    """In a parallel run each worker gets its share of the cores: torch threads that outnumber the cores spin on
    barriers and slow every test down (a training step several times slower), and the scripts the tests start
    as processes inherit the same share through OMP_NUM_THREADS."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = share
        import torch

        torch.set_num_threads(int(share))


def run_basetemp(config) -> Path | None:
    """The run's pytest temp folder, if it made one (pytest keeps it private: read, never created here)."""
    return getattr(getattr(config, "_tmp_path_factory", None), "_basetemp", None)


@pytest.hookimpl(trylast=True)  # after the xdist workers have stopped and pytest has removed a passing run's temp
def pytest_sessionfinish(session, exitstatus) -> None:
    """The run fails if a process it started is still running (each is stopped, with its process group), or if it
    wrote into the checkout; a failed run's temp folders keep their logs, not their multi-MB weights."""
    config = session.config
    if not is_controller(config):
        return
    problems = [f"process left running (stopped now): {p}" for p in cleanup.sweep()]
    problems += [f"the checkout was changed: {c}" for c in cleanup.checkout_changes(config.stash[CHECKOUT],
                                                                                    cleanup.checkout_state(ROOT))]
    basetemp = run_basetemp(config)
    if basetemp is not None and basetemp.is_dir():
        cleanup.remove_large_files(basetemp)
    config.stash[PROBLEMS] = problems
    if problems:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not is_controller(config):
        return
    for line in config.stash.get(PROBLEMS, []):
        terminalreporter.write_line(f"ERROR {line}", red=True, bold=True)
    basetemp = run_basetemp(config)
    if basetemp is not None:
        left = cleanup.folder_size(basetemp) if basetemp.is_dir() else 0
        terminalreporter.write_line(f"temp space this run leaves: {left / 1e6:.0f} MB in {basetemp} (a passing run "
                                    "leaves none; a failing one its failed tests' folders, until the next run)")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: order within a file kept


def write_overlay(tmp: Path, data_path: Path, **extra) -> Path:
    """A --config overlay for tests: tiny images, no workers, every output under tmp, trackers local/off."""
    overlay = {
        "dataset": {
            "path": str(data_path), "img_size": 32, "num_workers": 0,
            "stats_path": str(tmp / "normalization_stats.json"), "manifest_dir": str(tmp / "splits"),
            "cache_dir": str(tmp / "cache"),
        },
        "models": {"resnet18": {"batch_size": 8, "pretrained": False, "lr": 0.003},
                   "efficientnet_b0": {"batch_size": 8, "pretrained": False}},
        "train": {"epochs": 1, "output_dir": str(tmp / "checkpoints"), "save_every": 0, "warmup_epochs": 0},
        "monitoring": {"tensorboard_log_dir": str(tmp / "runs"),
                       "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                                  "artifact_location": str(tmp / "mlartifacts")},
                       "wandb": {"mode": "disabled", "dir": str(tmp)}},
        # fp32 on every CPU, so a test's numbers do not depend on the machine's bf16 units (tests/test_precision.py
        # covers bf16)
        "performance": {"mixed_precision": False, "cpu_precision": "fp32", "compile_model": False,
                        "channels_last": False},
        "evaluation": {"bootstrap_samples": 200, "timing_runs": 3, "timing_warmup": 1},
    }
    for key, value in extra.items():  # dotted keys: {"train.epochs": 2}
        node = overlay
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path = tmp / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


@pytest.fixture(autouse=True)
def default_image_limits():
    """Scripts run in-process set the process's image limits from their config: each test starts at the defaults."""
    from data.images import ImageLimits, set_limits

    set_limits(ImageLimits())


@pytest.fixture(scope="session")
@slow_setup("writes the tiny phantom data set the session's tests share")
def tiny_data(tmp_path_factory) -> Path:
    """A synthetic data set, 8 images per class at 48 px (class root)."""
    from data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("tiny data"), n_per_class=8, size=48, seed=1)


@pytest.fixture
def overlay(tmp_path, tiny_data) -> Path:
    return write_overlay(tmp_path, tiny_data)


def run_script(name: str, argv: list[str]) -> int:
    """Run a top-level script's main() in-process, as its command line would; returns the exit code."""
    module = importlib.import_module(name)
    args = module.get_args_parser().parse_args([str(a) for a in argv])
    return module.main(args) or 0


@pytest.fixture(scope="session")
@slow_setup("trains resnet18 for one epoch, the model most tests share")
def trained(tmp_path_factory, tiny_data):
    """A resnet18 trained for one epoch on the tiny set: (overlay path, tmp dir, checkpoint path)."""
    tmp = tmp_path_factory.mktemp("trained run")
    cfg = write_overlay(tmp, tiny_data)
    assert run_script("train", ["--config", cfg, "--model", "resnet18"]) == 0
    return cfg, tmp, tmp / "checkpoints" / "resnet18_outputs" / "best_model.pth"


@pytest.fixture(scope="session")
@slow_setup("registers the trained model in MLflow (ONNX, int8 and PyTorch flavors)")
def registered(trained, tmp_path_factory):
    """The trained model registered as brain-cancer-resnet18 @staging (forced: the tiny model is never evaluated,
    so it may never be @production) in a registry of its own: the argv prefix that points a script at it."""
    overlay, _, ckpt_path = trained
    tmp = tmp_path_factory.mktemp("inference registry")
    (tmp / "checkpoints" / "resnet18_outputs").mkdir(parents=True)
    shutil.copy(ckpt_path, tmp / "checkpoints" / "resnet18_outputs" / "best_model.pth")
    store = ["--config", overlay, "--set", f"monitoring.mlflow.tracking_uri=sqlite:///{tmp / 'registry.db'}",
             "--set", f"monitoring.mlflow.artifact_location={tmp / 'mlartifacts'}"]
    assert run_script("register_model", store + ["--model", "resnet18", "--version", "1.0.0", "--alias", "staging",
                                                 "--force", "--set", f"train.output_dir={tmp / 'checkpoints'}"]) == 0
    return store


def write_distinct_classes(root: Path, n_per_class: int = 40, size: int = 48, seed: int = 0) -> Path:
    """Three classes a small CNN tells apart in three epochs (dark, bright, half and half), as noisy PNGs: a model
    that passes the medical-validation gates honestly, for the tests of what happens when they pass."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in ("dark", "bright", "split"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.normal(0, 12, (size, size)) + (50 if name == "dark" else 200)
            if name == "split":
                img[:, : size // 2] -= 150
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{name}_{i:03d}.png")
    return root


@contextlib.contextmanager
def one_torch_thread():
    """Single-threaded torch while a latency is measured: with two threads on a busy 2-core machine a batch of one
    waits on thread barriers (resnet18 at 32 px: 485 ms instead of 18 ms), and the latency gate would judge that."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="session")
@slow_setup("trains resnet18 for three epochs to a model that passes the gates, then registers it")
def passing_run(tmp_path_factory):
    """resnet18 trained for three epochs on distinct classes with the default registry automation (it passes the
    gates, so train.py registers and promotes it): (overlay path, tmp dir, train.py's console output). Two epochs
    sat on the gates' edge: on some CPUs the half-and-half class was still 17% sensitive, and nothing registered."""
    tmp = tmp_path_factory.mktemp("passing run")
    cfg = write_overlay(tmp, write_distinct_classes(tmp / "distinct"), **{"train.epochs": 3})
    out = io.StringIO()
    with contextlib.redirect_stdout(out), one_torch_thread():
        assert run_script("train", ["--config", cfg, "--model", "resnet18"]) == 0
    return cfg, tmp, out.getvalue()


def tool_env(**extra) -> dict:
    """The environment for a script the tests start as a process: the tools of the Python running the tests (its
    `mlflow`, ...) first on PATH, whatever environment the user has, or has not, activated or created in the
    checkout."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **extra}


def stop_process_group(proc, timeout: float = 30) -> None:
    """Stop a process started with start_new_session=True and everything it started: SIGTERM, then SIGKILL."""
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_dicom(path, pixels, window: tuple[float, float] | None = None, bits_stored: int = 12, **attrs):
    """An MR image as a scanner writes it: 16-bit pixels, one frame (H, W) or several (F, H, W), optionally a
    display window; `attrs` set or override any attribute (PhotometricInterpretation, StudyInstanceUID, ...).
    Returns the dataset written."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID, "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "TEST0001", "Test^Phantom"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(str(path), enforce_file_format=True)
    return ds


def write_bomb_jpeg(path, side: int = 65000) -> Path:
    """A ~3.5 KB JPEG whose header claims side x side pixels (65000: 4.2 Gpx): a decompression bomb."""
    import struct

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "JPEG",
                                                                                           quality=90)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    Path(path).write_bytes(bytes(data))
    return Path(path)


def build_with_training_hook(on_forward):
    """A build_model replacement whose model calls on_forward(n, output) on its n-th training forward
    (1-based); a non-None return replaces the output. Tests use it to inject NaNs or signals."""
    from models.zoo import build_model

    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        count = {"n": 0}

        def hook(module, inputs, output):
            if module.training:
                count["n"] += 1
                return on_forward(count["n"], output)
        model.register_forward_hook(hook)
        return model
    return build

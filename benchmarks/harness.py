"""Shared benchmark helpers: test images, machine description, statistics, table + JSON output."""
from __future__ import annotations

import io
import json
import os
import platform
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py`: make the toolkit importable
    sys.path.insert(0, str(ROOT))

# Generated images, caches and exported models: outside the repository, reused between runs.
DEFAULT_DATA_DIR = Path(tempfile.gettempdir()) / "brain-mri-bench"


def load_config(*args, **kwargs):
    """core.config.load_config, then the config's image limits put in force, as every entry point does."""
    from core.config import load_config as load
    from data.images import configure_limits

    cfg = load(*args, **kwargs)
    configure_limits(cfg)
    return cfg


def _with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: identical pixels, different bytes (and sha256)."""
    comment = text.encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]


def make_jpegs(root: str | Path, n_images: int, size: int = 512, distinct_per_class: int = 2, seed: int = 0) -> Path:
    """An ImageFolder tree of n_images synthetic phantoms (3 classes) as size x size JPEGs; returns its root.

    Rendering a 512 px phantom takes ~0.3 s, so a few per class are drawn and the rest are byte-unique
    copies (a JPEG comment), which decode exactly like them. Reused when already complete.
    """
    from PIL import Image

    from core.fileio import atomic_write, sync_all, write_text_atomic
    from data.synthetic import CLASS_FOLDERS, render_slice

    root = Path(root)
    args = {"n_images": n_images, "size": size, "distinct": distinct_per_class, "seed": seed}
    marker = root / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == args:
        return root
    marker.unlink(missing_ok=True)  # an interrupted regeneration must not pass for a complete one
    encoded = {}
    for c, folder in enumerate(CLASS_FOLDERS):
        for k in range(distinct_per_class):
            buf = io.BytesIO()
            pixels = render_slice(folder, np.random.default_rng([seed, c, k]), size)
            Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=90)
            encoded[c, k] = buf.getvalue()
    for i in range(n_images):
        c = i % len(CLASS_FOLDERS)
        data = _with_comment(encoded[c, (i // len(CLASS_FOLDERS)) % distinct_per_class], f"copy {i}")
        atomic_write(root / CLASS_FOLDERS[c] / f"img_{i:06d}.jpg", lambda fh, d=data: fh.write(d), sync=False)
    sync_all()  # one sync for every image, before the marker says they are complete
    write_text_atomic(marker, json.dumps(args))
    return root


def list_images(root: Path) -> tuple[list[Path], list[int]]:
    """(paths, labels) of an ImageFolder tree, in torchvision ImageFolder's order."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    pairs = [(p, i) for i, c in enumerate(classes) for p in sorted((root / c).glob("*.jpg"))]
    return [p for p, _ in pairs], [label for _, label in pairs]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    import torch

    from core.device import cpu_flags

    info = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(info: dict) -> str:
    """What the figures above were measured on: CPU model, the flags that decide bf16/int8 speed, cores, load."""
    gpu = f"; GPU {info['gpu']}" if "gpu" in info else ""
    return (f"measured on: {info['cpu']} (flags: {' '.join(info['cpu_flags']) or 'none of the bf16/int8 ones'}), "
            f"{info['cores']} cores, {info['torch_threads']} torch threads, load {info['load_avg_1m']}, "
            f"torch {info['torch']}{gpu}")


def spread(values) -> dict:
    """Median and range of repeated measurements (the range shows how noisy the machine was)."""
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def latency_stats(seconds) -> dict:
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "n": int(ms.size)}


class Stopwatch:
    """Wall-clock seconds of a block, and this process's CPU seconds (all its threads; robust to other processes
    on a shared machine, where wall-clock rates swing with their load); `sync` (e.g. torch.cuda.synchronize)
    runs before each reading."""

    def __init__(self, sync=None):
        self.sync, self.seconds, self.cpu_seconds = sync, 0.0, 0.0

    def __enter__(self):
        if self.sync:
            self.sync()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if self.sync:
            self.sync()
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def report(name: str, settings: dict, headers: list[str], rows: list[list], results: dict, device: str = "cpu") -> dict:
    """Print a table and then one JSON line ({"benchmark": ...}) holding every figure."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else f"{c:,.2f}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{name}  ({', '.join(f'{k}={v}' for k, v in settings.items())})")
    for i, r in enumerate(cells):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    record = {"benchmark": name, "machine": machine(device), "settings": settings, "results": results}
    print(machine_line(record["machine"]))
    print(json.dumps(record), flush=True)
    return record

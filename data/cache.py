"""A preprocessed image cache: every image decoded, made grayscale and resized once, kept as uint8.

One file per (split manifest fingerprint, split, image size):
``{cache_dir}/{fingerprint}_{split}_{size}px.npy`` holds the images as a uint8 (N, S, S) array
(a standard .npy: ``np.load(path, mmap_mode="r")`` opens it as a memmap), and a JSON sidecar
beside it records what it was built from. The sidecar is written last and is the completion
marker: a cache without it, or whose sidecar, size or row list disagree with the split, is
rebuilt (with one line saying why), never trusted.

Readers use positioned reads (``os.preadv``) rather than a long-lived memory map: the page cache
still serves repeated epochs, but the process's resident memory stays flat however large the
data set grows, and nothing big is pickled into DataLoader workers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent builders of one cache are then unsupported
    fcntl = None

import numpy as np
from tqdm import tqdm

from core.errors import UserError
from core.fileio import private_dir, publish, temporary_path, write_json_atomic
from core.hardware import usable_cpus
from core.signals import default_sigterm, sigterm_raises
from data.images import ImageLimits, ImageReadError, current_limits, read_frames, set_limits, split_frame_name

if TYPE_CHECKING:
    from core.config import Config
    from data.manifest import Split

# 2: the header holds the pixel histogram; 3: JPEGs decoded with DCT scaling; 4: decode rule gray8-v4
CACHE_VERSION = 4
# PIL releases the GIL while it decodes and resizes, so threads decode in parallel with no process start
# and no IPC: for small splits they beat processes (60 images on 2 cores: 1.5x one core vs 1.1x). The
# rest of a row (JPEG header parsing in Python, the training split's histogram; ~10% since JPEGs decode
# at reduced scale) holds the GIL and caps threads, so a split big enough to pay for starting processes
# gets processes (600-7000 images on 2 cores: 1.6-1.7x vs 1.4-1.6x; and at many cores the cap bites hard).
PROCESS_MIN_IMAGES = 500


def rows_hash(names: list[str]) -> str:
    """Hash of the row list in order: row i of the cache is image i of the split."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\n")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CacheSlot:
    """Where one split's cache lives: {cache_dir}/{fingerprint}_{split}_{size}px.npy and its .json header."""
    cache_dir: Path
    fingerprint: str
    split: str
    img_size: int

    @property
    def files(self) -> tuple[Path, Path]:
        stem = f"{self.fingerprint}_{self.split}_{self.img_size}px"
        return Path(self.cache_dir) / f"{stem}.npy", Path(self.cache_dir) / f"{stem}.json"


class CachedImages:
    """Read-only rows of a cache file; the file is opened lazily in each process that reads it."""

    def __init__(self, path: str | Path, count: int, img_size: int, offset: int, histogram=None):
        self.path, self.count, self.img_size, self.offset = Path(path), count, img_size, offset
        # 256-bin histogram of every pixel, counted while building: exact statistics without a pass.
        self.histogram = None if histogram is None else np.asarray(histogram, dtype=np.int64)
        self.row_bytes = img_size * img_size
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:
        # Workers get the path, not a file descriptor or any pixels.
        return dict(self.__dict__, _fd=None)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _read_into(self, out: np.ndarray, first_row: int) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        got = os.preadv(self._fd, [out], self.offset + first_row * self.row_bytes)
        if got != out.nbytes:
            raise UserError(f"image cache {self.path} is truncated; delete it to rebuild")

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.count <= i < self.count:
            raise IndexError(f"row {i} out of range for a cache of {self.count} images")
        out = np.empty((self.img_size, self.img_size), dtype=np.uint8)
        self._read_into(out, i % self.count)
        return out

    def read_rows(self, indices) -> np.ndarray:
        """uint8 (k, S, S) for the given rows; each run of consecutive rows is one read."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.count):
            raise IndexError(f"rows out of range for a cache of {self.count} images")
        out = np.empty((idx.size, self.img_size, self.img_size), dtype=np.uint8)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for start, end in zip(np.r_[0, breaks], np.r_[breaks, idx.size]):
            self._read_into(out[start:end], int(idx[start]))
        return out



def cache_problem(data_path: Path, header_path: Path, key: dict) -> str | None:
    """Why the cache on disk cannot be used for `key` (None: it can)."""
    if not header_path.is_file():
        return "incomplete earlier build (no completion marker)" if data_path.exists() else None
    try:
        header = json.loads(header_path.read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable header"
    if header.get("complete") is not True:
        return "incomplete earlier build"
    for field, value in key.items():
        if header.get(field) != value:
            return f"stale: {field} changed ({header.get(field)!r} -> {value!r})"
    expected = header.get("offset", 0) + key["count"] * key["img_size"] ** 2
    size = data_path.stat().st_size if data_path.is_file() else None
    if size != expected:
        return f"truncated or corrupt: data file has {size} bytes, header says {expected}"
    return None


_out: dict = {}  # the cache file being written, opened once in each decoding process (shared by threads)


def _open_output(path: str, offset: int, img_size: int, histogram: bool, limits: ImageLimits | None = None) -> None:
    if limits is not None:  # a pool worker: the parent's image limits (a spawned worker would not inherit them)
        default_sigterm()
        set_limits(limits)
    _out.update(fd=os.open(path, os.O_WRONLY), offset=offset, img_size=img_size, histogram=histogram)


def by_file(paths: list[Path]) -> list[tuple[Path, list[tuple[int, int | None]]]]:
    """The rows grouped by the file they come from: (file, [(row, frame or None), ...]), in first-row order."""
    files: dict[Path, list[tuple[int, int | None]]] = {}
    for i, path in enumerate(paths):
        file, frame = split_frame_name(path)
        files.setdefault(file, []).append((i, frame))
    return list(files.items())


def _decode_file(item: tuple[Path, list[tuple[int, int | None]]]) -> tuple[np.ndarray | int, int]:
    """Decode the rows of one file (a multi-frame DICOM read once for all its frames) and write each at its row
    (pixels never travel back through a pipe); (their histogram, how many rows)."""
    file, rows = item
    frames = list(dict.fromkeys(frame for _, frame in rows))  # a file may stand in several rows
    images = dict(read_frames(file, _out["img_size"], None if frames == [None] else frames))
    hist = np.zeros(256, dtype=np.int64) if _out["histogram"] else 0
    for i, frame in rows:
        image = images[frame]
        os.pwrite(_out["fd"], image, _out["offset"] + i * image.nbytes)
        if _out["histogram"]:  # bincount holds the GIL: counting where nobody needs it cost ~10% of a 2-core build
            hist += np.bincount(image.ravel(), minlength=256)
    return hist, len(rows)


def decode_into(path: Path, offset: int, paths: list[Path], img_size: int, progress: bool, desc: str,
                histogram: bool) -> np.ndarray | None:
    """The images of `paths` (files, or frames file#frame=K) into the rows of `path`, each file decoded once, on all
    usable cores, with a progress bar.

    Returns the 256-bin histogram of all pixels (the exact statistics come free with the build),
    or None when `histogram` is off."""
    cores = usable_cpus()
    items = by_file(paths)
    hist = np.zeros(256, dtype=np.int64)
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar, \
            contextlib.ExitStack() as stack:
        if cores > 1 and len(paths) >= PROCESS_MIN_IMAGES:
            pool = stack.enter_context(multiprocessing.get_context().Pool(
                cores, _open_output, (str(path), offset, img_size, histogram, current_limits())))
            rows = pool.imap_unordered(_decode_file, items, chunksize=max(1, min(16, len(items) // (cores * 8))))
        else:
            _open_output(str(path), offset, img_size, histogram)  # one descriptor: os.pwrite is safe from any thread
            stack.callback(lambda: os.close(_out.pop("fd")))  # after the threads are done (exits run in reverse)
            # one thread more than cores keeps them busy while another holds the GIL
            threads = ThreadPoolExecutor(min(cores + 1, len(items)))
            # on Ctrl-C/SIGTERM the rows not started yet are dropped, not decoded first
            stack.callback(lambda: threads.shutdown(wait=True, cancel_futures=True))
            rows = threads.map(_decode_file, items)
        for file_hist, n in rows:
            hist += file_hist
            bar.update(n)
    return hist if histogram else None


def write_cache(paths: list[Path], img_size: int, data_path: Path, header_path: Path, key: dict,
                progress: bool = True) -> int:
    """Decode into a temporary file, rename it into place, then write the header (the marker) last.

    The rows are decoded patient pixels: the file is created owner-only (0600) in an owner-only folder.
    Ctrl-C, SIGTERM or a bad image leave no temporary file behind."""
    private_dir(data_path.parent)
    header_path.unlink(missing_ok=True)  # the old marker goes first: a crash leaves "incomplete"
    remove_stale_temporaries(data_path)
    tmp = temporary_path(data_path)  # unique, 0600
    try:
        with sigterm_raises():
            with open(tmp, "r+b") as fh:
                np.lib.format.write_array_header_1_0(
                    fh, {"descr": "|u1", "fortran_order": False, "shape": (len(paths), img_size, img_size)})
                offset = fh.tell()
                fh.truncate(offset + len(paths) * img_size * img_size)
            hist = decode_into(tmp, offset, paths, img_size, progress,
                               f"Caching {key['split']} images ({img_size}px)",
                               histogram=key["split"] == "train")  # statistics come from the training split only
            publish(tmp, data_path)  # every process's writes are on disk before the rename makes them visible
    except ImageReadError as exc:
        raise UserError(f"cannot cache {exc} (the file changed since the split manifest was made; "
                        f"fix it or rerun with --resplit)") from None
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(header_path, dict(key, offset=offset, dtype="uint8", complete=True,
                                        pixel_histogram=None if hist is None else hist.tolist()), indent=None)
    return offset


def remove_stale_temporaries(data_path: Path) -> None:
    """Temporary files of this cache left by a build that was killed (-9: no cleanup ran); called under
    build_lock, so no live builder of this cache owns one."""
    for stale in data_path.parent.glob(f".{data_path.stem}.*.tmp{data_path.suffix}"):
        stale.unlink(missing_ok=True)


def open_cache(slot: CacheSlot, paths: list[Path], names: list[str], log=print,
               progress: bool = True) -> CachedImages:
    """The cache for these rows (names: their manifest paths), built or rebuilt (saying why) when the one on
    disk cannot be used."""
    img_size = int(slot.img_size)
    key = {"version": CACHE_VERSION, "fingerprint": slot.fingerprint, "split": slot.split,
           "img_size": img_size, "count": len(paths), "rows_hash": rows_hash(names)}
    data_path, header_path = slot.files
    if key["count"] == 0:
        return CachedImages(data_path, 0, img_size, 0, np.zeros(256, dtype=np.int64))
    with build_lock(data_path):
        problem = cache_problem(data_path, header_path, key)
        if problem is not None:
            log(f"Rebuilding image cache {data_path}: {problem}")
        if problem is not None or not header_path.is_file():
            write_cache(paths, img_size, data_path, header_path, key, progress)
        header = json.loads(header_path.read_text())
    return CachedImages(data_path, key["count"], img_size, header["offset"], header.get("pixel_histogram"))


@contextlib.contextmanager
def build_lock(data_path: Path):
    """One process at a time checks and builds a cache file: DDP ranks and parallel runs share caches."""
    private_dir(data_path.parent)
    if fcntl is None:
        yield
        return
    with open(data_path.with_name(data_path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def split_cache(cfg: Config, split: Split, split_name: str, img_size: int, log=print,
                progress: bool = True) -> CachedImages:
    """The cache of one split of the manifest, in cfg.dataset.cache_dir."""
    paths, _ = split.samples(split_name)
    names = [r.path for r in split.rows_for(split_name)]
    slot = CacheSlot(Path(cfg.dataset.cache_dir), split.fingerprint, split_name, img_size)
    return open_cache(slot, paths, names, log, progress)

"""The preprocessed image cache: same tensors as decoding each file, rebuilt when stale, never trusted blindly."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from conftest import write_overlay
from core.config import load_config
from core.errors import UserError
from data.cache import CacheSlot
from data.dataset import build_dataset, make_loader
from data.images import load_gray
from data.manifest import prepare_split
from data.preprocess import Preprocessor


def setup(tmp_path, data_path, **extra):
    cfg = load_config(write_overlay(tmp_path, data_path, **extra))
    return cfg, prepare_split(cfg, log=lambda *_: None)


def loader_tensors(cfg, split, name="test", size=32, workers=0):
    """Evaluation tensors as test.py/evaluate.py see them: loader + Preprocessor (no augmentation)."""
    cfg.dataset.num_workers = workers
    loader = make_loader(build_dataset(cfg, split, name, size), cfg, batch_size=5)
    pre = Preprocessor([0.2] * 3, [0.3] * 3).eval()
    xs, ys = zip(*[(pre(x), y) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def split_files(cfg, split, name, size):
    data, header = CacheSlot(cfg.dataset.cache_dir, split.fingerprint, name, size).files
    return data, header


def test_cached_pipeline_gives_the_per_sample_tensors(tmp_path, tiny_data):
    cfg, split = setup(tmp_path, tiny_data)
    cfg.dataset.cache = False
    x_plain, y_plain = loader_tensors(cfg, split)
    cfg.dataset.cache = True
    x_cached, y_cached = loader_tensors(cfg, split)
    assert split_files(cfg, split, "test", 32)[0].is_file()
    assert torch.equal(y_plain, y_cached)
    torch.testing.assert_close(x_cached, x_plain, rtol=0, atol=0)  # both go through load_gray
    # Second use reads the cache: same tensors, also through DataLoader worker processes.
    x_workers, _ = loader_tensors(cfg, split, workers=2)
    torch.testing.assert_close(x_workers, x_plain, rtol=0, atol=0)


def test_dataset_pickles_small_for_workers(tmp_path, tiny_data):
    cfg, split = setup(tmp_path, tiny_data)
    dataset = build_dataset(cfg, split, "train", 32)
    assert len(pickle.dumps(dataset)) < 4096 + 300 * len(dataset)  # paths and labels, never pixels
    images, labels = zip(*dataset.__getitems__([3, 0, 1, 2]))
    assert torch.equal(images[0][0], torch.from_numpy(load_gray(dataset.paths[3], 32)))


def test_build_shows_progress_then_reuses(tmp_path, tiny_data, capsys):
    cfg, split = setup(tmp_path, tiny_data)
    build_dataset(cfg, split, "train", 32)
    assert "Caching train images (32px)" in capsys.readouterr().err
    data, header = split_files(cfg, split, "train", 32)
    built = data.stat().st_mtime_ns
    build_dataset(cfg, split, "train", 32)
    assert data.stat().st_mtime_ns == built and "Caching" not in capsys.readouterr().err
    meta = json.loads(header.read_text())
    assert meta["complete"] is True and meta["count"] == split.sizes()["train"]
    assert np.load(data, mmap_mode="r").shape == (meta["count"], 32, 32)


def test_new_image_size_gets_its_own_cache(tmp_path, tiny_data):
    cfg, split = setup(tmp_path, tiny_data)
    build_dataset(cfg, split, "val", 32)
    dataset = build_dataset(cfg, split, "val", 40)
    assert split_files(cfg, split, "val", 40)[0].is_file()
    assert dataset[0][0].shape == (1, 40, 40)
    assert torch.equal(dataset[1][0][0], torch.from_numpy(load_gray(dataset.paths[1], 40)))


def test_changed_data_new_fingerprint_rebuilds(tmp_path, tiny_data):
    data_path = tmp_path / "data"
    shutil.copytree(tiny_data, data_path)
    cfg, split = setup(tmp_path, data_path)
    before = build_dataset(cfg, split, "train", 32)
    # Replace one training image with another picture, then make a new split (new fingerprint).
    target, donor = before.paths[0], before.paths[-1]
    shutil.copyfile(donor, target)
    with pytest.raises(UserError):
        prepare_split(cfg, log=lambda *_: None)
    split2 = prepare_split(cfg, resplit=True, log=lambda *_: None)
    assert split2.fingerprint != split.fingerprint
    after = build_dataset(cfg, split2, "train", 32)
    for i, path in enumerate(after.paths):
        assert torch.equal(after[i][0][0], torch.from_numpy(load_gray(path, 32))), path


def corrupt_and_reload(cfg, split, damage, capsys):
    dataset = build_dataset(cfg, split, "train", 32)
    expected = [dataset[i][0] for i in range(len(dataset))]
    capsys.readouterr()
    data, header = split_files(cfg, split, "train", 32)
    damage(data, header)
    rebuilt = build_dataset(cfg, split, "train", 32)
    out = capsys.readouterr().out
    assert all(torch.equal(rebuilt[i][0], expected[i]) for i in range(len(rebuilt)))
    return out


def test_truncated_cache_is_rebuilt(tmp_path, tiny_data, capsys):
    cfg, split = setup(tmp_path, tiny_data)
    out = corrupt_and_reload(cfg, split, lambda data, _: data.write_bytes(data.read_bytes()[:-100]), capsys)
    assert "Rebuilding image cache" in out and "truncated" in out


def test_stale_header_is_rebuilt(tmp_path, tiny_data, capsys):
    def stale(_, header):
        meta = json.loads(header.read_text())
        header.write_text(json.dumps(dict(meta, fingerprint="0" * 16)))

    cfg, split = setup(tmp_path, tiny_data)
    assert "stale: fingerprint" in corrupt_and_reload(cfg, split, stale, capsys)


def test_interrupted_build_is_rebuilt(tmp_path, tiny_data, capsys):
    def interrupted(data, header):  # data written, completion marker never was
        header.unlink()
        data.write_bytes(b"\x93NUMPY garbage")

    cfg, split = setup(tmp_path, tiny_data)
    assert "incomplete" in corrupt_and_reload(cfg, split, interrupted, capsys)


def test_file_truncated_while_open_is_refused(tmp_path, tiny_data):
    cfg, split = setup(tmp_path, tiny_data)
    dataset = build_dataset(cfg, split, "train", 32)
    data, _ = split_files(cfg, split, "train", 32)
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size // 2)
    with pytest.raises(UserError, match="truncated"):
        dataset.__getitems__(list(range(len(dataset))))


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_parallel_build_keeps_row_order(tmp_path, tiny_data, monkeypatch, pool):
    from data.cache import open_cache

    def unused(*args, **kwargs):
        raise AssertionError(f"the {pool} build used the other pool")
    if pool == "processes":  # what a split of PROCESS_MIN_IMAGES or more uses
        monkeypatch.setattr("data.cache.PROCESS_MIN_IMAGES", 0)
        monkeypatch.setattr("data.cache.usable_cpus", lambda: 2)
        monkeypatch.setattr("data.cache.ThreadPoolExecutor", unused)
    else:
        monkeypatch.setattr("data.cache.multiprocessing.get_context", unused)
    paths = sorted(tiny_data.rglob("*.jpg"))
    paths = (paths * 3)[::-1]  # several rows per worker, in no sorted order
    names = [f"{i}/{p.name}" for i, p in enumerate(paths)]
    cache = open_cache(CacheSlot(tmp_path, "f" * 16, "train", 24), paths, names, progress=False)
    expected = np.stack([load_gray(p, 24) for p in paths])
    assert np.array_equal(cache.read_rows(range(len(paths))), expected)
    assert np.array_equal(cache.read_rows([7, 2, 3, 4, 0]), expected[[7, 2, 3, 4, 0]])
    assert np.array_equal(cache.histogram, np.bincount(expected.ravel(), minlength=256))
    other = open_cache(CacheSlot(tmp_path, "f" * 16, "test", 24), paths, names, progress=False)  # no statistics
    assert np.array_equal(other.read_rows(range(len(paths))), expected) and other.histogram is None


def test_cuda_loader_prefetches_the_sampler_batches(tmp_path, tiny_data):
    """A cached dataset is read by a prefetch thread (pinned on CUDA): the seeded shuffle order's rows."""
    from data.dataset import PrefetchLoader

    cfg, split = setup(tmp_path, tiny_data)
    cfg.dataset.pin_memory = False  # pinning needs a GPU; the rest of the CUDA path runs here
    dataset = build_dataset(cfg, split, "train", 32)
    fast = make_loader(dataset, cfg, 5, device=torch.device("cuda"), generator=torch.Generator().manual_seed(3))
    assert isinstance(fast, PrefetchLoader) and len(fast) == -(-len(dataset) // 5)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(3)).tolist()
    for k, (images, labels) in enumerate(fast):
        rows = order[5 * k:5 * k + 5]
        assert torch.equal(images, torch.stack([dataset[i][0] for i in rows]))
        assert labels.tolist() == [dataset.labels[i] for i in rows]
    for _ in fast:  # an abandoned epoch leaves nothing behind and the next one starts over
        break
    assert sum(len(y) for _, y in fast) == len(dataset)


def test_cuda_loader_raises_reader_errors(tmp_path, tiny_data):
    cfg, split = setup(tmp_path, tiny_data)
    cfg.dataset.pin_memory = False
    dataset = build_dataset(cfg, split, "train", 32)
    loader = make_loader(dataset, cfg, 4, device=torch.device("cuda"))
    data, _ = split_files(cfg, split, "train", 32)
    with open(data, "r+b") as fh:
        fh.truncate(200)
    with pytest.raises(UserError, match="truncated"):
        list(loader)


def test_statistics_from_the_cache_equal_a_pass_over_the_images(tmp_path, tiny_data):
    from data.normalization import compute_stats

    cfg, split = setup(tmp_path, tiny_data)
    cached = compute_stats(cfg, split, 32, progress=False)  # builds the cache, histogram counted on the way
    cfg.dataset.cache = False
    plain = compute_stats(cfg, split, 32, progress=False)
    assert cached["mean"] == plain["mean"] and cached["std"] == plain["std"]
    paths = split.samples("train")[0]
    pixels = np.stack([load_gray(p, 32) for p in paths]).astype(np.float64) / 255
    assert abs(cached["mean"][0] - pixels.mean()) < 1e-6 and abs(cached["std"][0] - pixels.std()) < 1e-6




def _open_in_child(role, job, start, results):
    """Open the cache with timings that expose an unguarded check-then-build: the first process
    pauses after building, the second starts its build then and builds slowly."""
    import time

    import data.cache as cache_mod
    paths, names, cache_dir, fingerprint = job
    write, decode = cache_mod.write_cache, cache_mod.decode_into

    def slow_write(*a, **k):
        time.sleep(0.0 if role == 0 else 0.3)
        out = write(*a, **k)
        time.sleep(0.8 if role == 0 else 0.0)
        return out

    def slow_decode(*a, **k):
        time.sleep(0.0 if role == 0 else 1.5)
        return decode(*a, **k)

    cache_mod.write_cache, cache_mod.decode_into = slow_write, slow_decode
    start.wait()  # both processes find the cache missing at the same moment
    try:
        cache = cache_mod.open_cache(cache_mod.CacheSlot(cache_dir, fingerprint, "val", 32), paths, names,
                                     log=lambda *_: None, progress=False)
        results.put(cache.read_rows(list(range(len(paths)))).tobytes())
    except Exception as exc:  # noqa: BLE001 - the parent reports what went wrong
        results.put(repr(exc))


def test_processes_that_open_one_cache_at_once_all_get_it_whole(tmp_path, tiny_data):
    """DDP ranks (and parallel runs) share a cache: one builds it, the other waits and reads it."""
    import multiprocessing
    cfg, split = setup(tmp_path, tiny_data)
    paths, _ = split.samples("val")
    names = [r.path for r in split.rows_for("val")]
    job = (paths, names, str(cfg.dataset.cache_dir), split.fingerprint)
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(role, job, start, results)) for role in (0, 1)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join()
    expected = np.stack([load_gray(p, 32) for p in paths]).tobytes()
    assert got == [expected, expected], [r for r in got if isinstance(r, str)]


def test_an_unreadable_file_stops_the_build_with_one_line_and_leaves_no_cache(tmp_path, tiny_data):
    from data.cache import open_cache

    paths = sorted(tiny_data.rglob("*.jpg"))[:10]
    bad = tmp_path / "broken scan.jpg"
    bad.write_bytes(paths[0].read_bytes()[:200])  # truncated after the manifest was made
    paths = paths[:5] + [bad] + paths[5:]
    names = [p.name for p in paths]
    with pytest.raises(UserError, match=r"cannot cache .*broken scan\.jpg.*--resplit"):
        open_cache(CacheSlot(tmp_path / "cache", "e" * 16, "train", 24), paths, names, progress=False)
    data, header = CacheSlot(tmp_path / "cache", "e" * 16, "train", 24).files
    assert not data.exists() and not header.exists()
    assert not list((tmp_path / "cache").glob("*.tmp"))

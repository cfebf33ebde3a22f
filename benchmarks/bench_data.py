"""Data-path speed and memory: compute_normalization and evaluate vs bare decoding on one core.

  decode    bare decoding, the reference rate: each image of the training split opened with PIL,
            converted to grayscale and resized to img_size (full decode, the one resize filter), in a
            plain loop on one core, as a per-sample pipeline does it (the original also resized in RGB)
  decode_toolkit  the toolkit's loader (data.images.load_gray: JPEGs decoded at reduced DCT scale
            straight to grayscale) in the same loop on one core
  decode_all_cores  load_gray in a process pool on every usable core: what the machine can give
            right now (on a shared machine, less than cores x decode_toolkit)
  stats     data.normalization.compute_stats (what compute_normalization.py runs); cold = the cache
            is built first (parallel decode), warm = the cache exists
  evaluate  evaluate/test's data path over the test split: build_dataset + make_loader

Each task runs in its own subprocess, so its peak resident memory (main process, and the largest
worker) is its own; all of them at 1x and 10x the data set size.

    python benchmarks/bench_data.py                       # 400 and 4000 512x512 JPEGs, 224 px
    python benchmarks/bench_data.py --n-images 1000 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from core.config import Config
    from data.manifest import Split

try:
    from benchmarks import harness
except ImportError:  # run as a file
    import harness

TASKS = ("decode", "decode_toolkit", "decode_all_cores", "stats", "evaluate")
SCALES = (1, 10)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="compute_normalization / evaluate data path vs one-core decoding; peak "
                                            "memory at 1x and 10x")
    p.add_argument("--n-images", type=int, default=400, help="images at 1x (10x is ten times this)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--jpeg-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (dataset.num_workers)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--data-dir", default=str(harness.DEFAULT_DATA_DIR))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs")
    p.add_argument("--child", choices=TASKS, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p


def data_config(root, work, img_size: int, workers: int):
    work = harness.Path(work)
    return harness.load_config(overrides={"dataset.path": str(root), "dataset.img_size": img_size,
                                  "dataset.num_workers": workers, "dataset.manifest_dir": str(work / "splits"),
                                  "dataset.cache_dir": str(work / "cache"),
                                  "dataset.stats_path": str(work / "normalization_stats.json")})


def evaluate_pass(cfg: Config, split: Split, img_size: int) -> int:
    """What test.py / evaluate.py read before preprocessing and the model: dataset and loader."""
    from data.dataset import build_dataset, make_loader

    loader = make_loader(build_dataset(cfg, split, "test", img_size), cfg, cfg.recipe.batch_size)
    return sum(images.shape[0] for images, _ in loader)


def pool_decode(paths, img_size: int) -> int:
    import functools
    import multiprocessing

    from core.hardware import usable_cpus
    from data.images import load_gray

    with multiprocessing.Pool(usable_cpus()) as pool:
        load = functools.partial(load_gray, size=img_size)
        return sum(1 for _ in pool.imap_unordered(load, paths, chunksize=16))


def bare_decode(path, img_size: int):
    """The reference: full PIL decode, grayscale, resize with the toolkit's filter."""
    from PIL import Image

    from data.images import RESAMPLE

    with Image.open(path) as img:
        return np.asarray(img.convert("L").resize((img_size, img_size), RESAMPLE, reducing_gap=None))


def timed_rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def child(args) -> dict:
    """One task in this process; prints its rates and peak memory as JSON."""
    from PIL import Image

    from data.images import load_gray
    from data.manifest import prepare_split
    from data.normalization import compute_stats

    Image.init()  # PIL imports its format plugins on the first open (~8 ms): a process cost, not a per-image one
    cfg = data_config(args.root, args.work, args.img_size, args.workers)
    split = prepare_split(cfg, log=lambda *_: None)
    paths = split.samples("train")[0]
    n_test = split.sizes()["test"]
    out = {"task": args.child, "n_train": len(paths), "n_test": n_test}
    if args.child == "decode":
        out["rate"] = timed_rate(lambda: all(bare_decode(p, args.img_size).size for p in paths), len(paths))
    elif args.child == "decode_toolkit":
        out["rate"] = timed_rate(lambda: all(load_gray(p, args.img_size).size for p in paths), len(paths))
    elif args.child == "decode_all_cores":
        out["rate"] = timed_rate(lambda: pool_decode(paths, args.img_size), len(paths))
    else:
        shutil.rmtree(cfg.dataset.cache_dir, ignore_errors=True)  # cold: the cache is built inside the timing
        if args.child == "stats":
            fn, n = (lambda: compute_stats(cfg, split, args.img_size, progress=False)), len(paths)
        else:
            fn, n = (lambda: evaluate_pass(cfg, split, args.img_size)), n_test
        out["rate_cold"] = timed_rate(fn, n)
        out["rate"] = timed_rate(fn, n)  # warm
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["workers_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def run_child(task: str, root, work, args) -> dict:
    cmd = [sys.executable, __file__, "--child", task, "--root", str(root), "--work", str(work),
           "--img-size", str(args.img_size), "--workers", str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=harness.ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{task} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(args, scale: int):
    """The scale's JPEG tree and its split manifest (made here, once, outside any timing)."""
    from data.manifest import prepare_split

    n = args.n_images * scale
    base = harness.Path(args.data_dir) / f"data_{args.jpeg_size}px_{n}"
    root = harness.make_jpegs(base / "images", n, args.jpeg_size)
    prepare_split(data_config(root, base / "work", args.img_size, args.workers), log=lambda *_: None)
    return root, base / "work"


def summarize(runs: dict) -> tuple[dict, list[list]]:
    results, rows = {}, []
    for scale in SCALES:
        decode = harness.spread([r["rate"] for r in runs[scale, "decode"]])["median"]
        toolkit = harness.spread([r["rate"] for r in runs[scale, "decode_toolkit"]])["median"]
        for task in TASKS:
            rs = runs[scale, task]
            res = {"rate": harness.spread([r["rate"] for r in rs]),
                   "peak_rss_mb": harness.spread([r["peak_rss_mb"] for r in rs]),
                   "workers_peak_rss_mb": harness.spread([r["workers_peak_rss_mb"] for r in rs]),
                   "n_images": rs[0]["n_test" if task == "evaluate" else "n_train"]}
            if "rate_cold" in rs[0]:
                res["rate_cold"] = harness.spread([r["rate_cold"] for r in rs])
                res["cold_vs_decode"] = res["rate_cold"]["median"] / decode
                # parallel efficiency alone: against the same loader on one core
                res["cold_vs_toolkit_decode"] = res["rate_cold"]["median"] / toolkit
            res["vs_decode"] = res["rate"]["median"] / decode
            results[f"{task}@{scale}x"] = res
            rows.append([f"{task} {scale}x", res["n_images"], res.get("rate_cold", {}).get("median", "-"),
                         res.get("cold_vs_decode", "-"), res.get("cold_vs_toolkit_decode", "-"),
                         res["rate"]["median"], res["vs_decode"],
                         res["peak_rss_mb"]["median"], res["workers_peak_rss_mb"]["median"]])
    for task in TASKS:
        results[f"{task}_memory_10x_vs_1x"] = (results[f"{task}@10x"]["peak_rss_mb"]["median"]
                                               / results[f"{task}@1x"]["peak_rss_mb"]["median"])
    return results, rows


def main(args) -> int:
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.smoke:
        args.n_images, args.img_size, args.jpeg_size, args.repeats = 30, 32, 64, 1
    trees = {scale: prepare(args, scale) for scale in SCALES}
    runs = {(s, t): [] for s in SCALES for t in TASKS}
    for _ in range(args.repeats):
        for scale in SCALES:
            for task in TASKS:
                runs[scale, task].append(run_child(task, *trees[scale], args))
    results, rows = summarize(runs)
    settings = {k: getattr(args, k) for k in ("n_images", "img_size", "jpeg_size", "workers", "repeats")}
    harness.report("bench_data", settings, ["task", "images", "cold img/s", "cold x decode",
                                           "cold x toolkit 1-core", "warm img/s",
                                           "warm x decode", "peak MB", "worker peak MB"], rows, results)
    return 0


if __name__ == "__main__":
    main(get_args_parser().parse_args())

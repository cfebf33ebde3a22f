"""score_archive.py (Ray Data) against the plain single-process loop over the same files, side by side in one run.

  ray      `python score_archive.py` as a user runs it (a local Ray on this machine): one model actor per thread,
           one ONNX Runtime thread each, decoding in parallel Ray tasks, Parquet out. Its rate past start-up comes
           from the output's own `scored_at` stamps (one per model batch): the rows after the first batch over the
           time from the first batch to the last. Its start-up cost (registry, Ray, actors, the first batch's wait)
           is the wall time the steady rate does not explain: wall - N / rate.
  loop     the same work in one process without Ray: archive.decode.decode_files then archive.scorer.Scorer over
           the files in order, one ONNX Runtime session with all the threads, the same batch size.

Both read the same N 512x512 JPEGs (synthetic phantoms) with the same registered model (random weights, resnet18 at
224 px). The two are run alternately, `--repeats` times each, and the medians compared.

    python benchmarks/bench_archive.py
    python benchmarks/bench_archive.py --images 2000 --repeats 3
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks import bench_serving, harness
except ImportError:  # run as a file
    import bench_serving
    import harness

import pyarrow as pa

from archive.decode import decode_files
from archive.scorer import Scorer, ScoringModel
from archive.table import read_output
from core.hardware import usable_cpus
from data.images import ImageLimits
from deploy.refer import ReferRule


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="score_archive.py on Ray Data vs the plain single-process loop")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--jpeg-size", type=int, default=512)
    p.add_argument("--images", type=int, default=1000, help="files scored per measurement")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads in all (default: cores)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--files-per-task", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=str(harness.DEFAULT_DATA_DIR))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs")
    return p


def plain_loop(onnx_path: Path, files: list[str], args, threads: int) -> dict:
    """The single-process loop: decode a handful of files, score their slices in batches, in order."""
    identity = {"model_name": "bench", "model_version": "1", "flavor": "onnx", "run_id": "bench"}
    with harness.Stopwatch() as start:
        scorer = Scorer(ScoringModel(identity, ReferRule(0.6), threads), onnx_path.read_bytes())
    rows, decoding, scoring = 0, 0.0, 0.0
    with harness.Stopwatch() as sw:
        for i in range(0, len(files), args.files_per_task):
            t0 = time.perf_counter()
            decoded = decode_files(pa.table({"path": files[i:i + args.files_per_task]}), args.img_size,
                                   ImageLimits(), frozenset())
            t1 = time.perf_counter()
            for j in range(0, decoded.num_rows, args.batch_size):
                rows += scorer(decoded.slice(j, args.batch_size)).num_rows
            decoding, scoring = decoding + t1 - t0, scoring + time.perf_counter() - t1
    assert rows == len(files)
    return {"per_s": len(files) / sw.seconds, "seconds": sw.seconds, "startup_s": start.seconds,
            "decode_s": decoding, "model_s": scoring, "ceiling": ceiling(decoding, scoring, threads)}


def ceiling(decode_s: float, model_s: float, cores: int) -> float:
    """What spreading the loop's work over `cores` cores gains at most, from the loop's own split: it decodes on one
    core (D) while the model call uses them all (M); spread perfectly, D takes D / cores. So (D + M) / (D / cores + M),
    if the model's threads scale perfectly (where they do not, one-thread actors gain more). With D = M on 2 cores
    that is 1.33x: the ratio says as much about the machine's decode/model balance as about Ray."""
    return (decode_s + model_s) / (decode_s / cores + model_s)


def ray_run(store: Path, root: Path, out: Path, args, threads: int) -> dict:
    """One score_archive.py run into a fresh output folder (nothing skipped): its wall time, its steady rate."""
    argv = [sys.executable, str(harness.ROOT / "score_archive.py"), "--model", f"brain-cancer-{args.model}",
            "--version", "1", "--root", str(root), "--out", str(out), "--database", f"sqlite:///{out}.db",
            "--set", f"monitoring.mlflow.tracking_uri={bench_serving.tracking_uri(store)}",
            "--set", f"monitoring.mlflow.artifact_location={store / 'mlartifacts'}",
            "--cpus", str(threads), "--actors", str(threads), "--threads", "1", "--batch-size", str(args.batch_size)]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"score_archive.py failed:\n{done.stderr[-3000:]}")
    stamps = read_output(out, ["scored_at"])["scored_at"].cast("int64").to_numpy() / 1e6  # microseconds -> s
    first, last = stamps.min(), stamps.max()
    steady = float(last - first)
    per_s = int((stamps > first).sum()) / steady if steady > 0 else float("nan")
    return {"wall_s": wall, "per_s": per_s, "startup_s": wall - len(stamps) / per_s, "rows": len(stamps)}


def run(args) -> dict:
    data_dir = Path(args.data_dir)
    threads = args.threads or usable_cpus()
    store = bench_serving.registered_store(args, data_dir)
    onnx_path = next((store / "mlartifacts").rglob("*.onnx"))
    root = harness.make_jpegs(data_dir / f"archive_{args.jpeg_size}px_{args.images}" / "images", args.images,
                              args.jpeg_size, 2)
    jpegs = harness.list_images(root)[0]
    files = [str(p) for p in jpegs]
    loops, rays = [], []
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        for k in range(args.repeats):
            loops.append(plain_loop(onnx_path, files, args, threads))
            rays.append(ray_run(store, root, Path(tmp) / f"run{k}.parquet", args, threads))
    loop = harness.spread([r["per_s"] for r in loops])
    past, wall = harness.spread([r["per_s"] for r in rays]), harness.spread([r["wall_s"] for r in rays])
    return {"threads": threads, "loop": {"per_s": loop, "runs": loops},
            "ray": {"per_s_past_startup": past, "startup_s": harness.spread([r["startup_s"] for r in rays]),
                    "wall_s": wall, "per_s_end_to_end": args.images / wall["median"], "runs": rays},
            "ratios": {"ray_past_startup/loop": past["median"] / loop["median"],
                       "ray_end_to_end/loop": args.images / wall["median"] / loop["median"],
                       "per_run_past_startup/loop": [r["per_s"] / lp["per_s"] for r, lp in zip(rays, loops)],
                       "ceiling_from_loop_split": harness.spread([r["ceiling"] for r in loops])["median"]}}


def main(args) -> int:
    if args.smoke:
        args.img_size, args.jpeg_size, args.images, args.repeats, args.batch_size = 32, 64, 48, 1, 4
    results = run(args)
    settings = {k: getattr(args, k) for k in ("model", "img_size", "jpeg_size", "images", "batch_size", "repeats")}
    settings["threads"] = results["threads"]
    loop, ray = results["loop"], results["ray"]
    ratio = results["ratios"]
    rows = [["loop: one process, one session", loop["per_s"]["median"], f"{loop['runs'][0]['startup_s']:.1f}", 1.0],
            [f"score_archive.py: Ray, {results['threads']} actors, past start-up", ray["per_s_past_startup"]["median"],
             f"{ray['startup_s']['median']:.1f}", ratio["ray_past_startup/loop"]],
            ["score_archive.py: Ray, end to end", ray["per_s_end_to_end"], "", ratio["ray_end_to_end/loop"]]]
    first = loop["runs"][0]
    print(f"the loop's time: decoding {first['decode_s']:.1f} s, model {first['model_s']:.1f} s; spread over "
          f"{results['threads']} cores that work gains at most {ratio['ceiling_from_loop_split']:.2f}x "
          "(benchmarks/bench_archive.py: ceiling)")
    harness.report("bench_archive", settings, ["path", "images/s", "start-up s", "x loop"], rows, results)
    return 0


if __name__ == "__main__":
    main(get_args_parser().parse_args())

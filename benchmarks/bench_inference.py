"""Single-image latency (ms, median and p95) for a 512x512 JPEG, end to end.

  onnx_e2e     the toolkit's ONNX Runtime path: OnnxPredictor.predict_path (decode, numpy preprocessing, run)
  torch_eager  the same model in PyTorch eager: load_gray + Preprocessor + model + softmax
  onnx_limit   ONNX Runtime alone on an already-preprocessed tensor: the limit

Same weights, image and threads; the three alternate call by call in one process.

    python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --model efficientnet_b0 --runs 200
"""
from __future__ import annotations

import argparse

try:
    from benchmarks import harness
except ImportError:  # run as a file
    import harness

import numpy as np
import torch

from core.contract import Contract
from data.cache import usable_cpus
from data.images import load_gray
from data.preprocess import Preprocessor
from deploy.export import export_onnx
from deploy.predictors import OnnxPredictor
from models.zoo import build_model

VARIANTS = ("onnx_e2e", "torch_eager", "onnx_limit")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Inference latency: ONNX Runtime end to end vs PyTorch eager vs ONNX "
                                            "Runtime alone")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--jpeg-size", type=int, default=512)
    p.add_argument("--runs", type=int, default=60, help="timed calls per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: usable cores)")
    p.add_argument("--data-dir", default=str(harness.DEFAULT_DATA_DIR))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs")
    return p


def exported_model(args, out_dir) -> tuple[torch.nn.Module, object, Contract]:
    """A seeded random model and its ONNX export (reused from an earlier run when present)."""
    torch.manual_seed(0)
    model = build_model(args.model, 3).eval()
    contract = Contract(args.model, ("glioma", "meningioma", "pituitary"), args.img_size, (0.2,) * 3, (0.25,) * 3)
    path = out_dir / f"{args.model}_{args.img_size}px_torch{torch.__version__}.onnx"
    if not path.is_file():
        export_onnx(model, contract, path)
    return model, path, contract


def variants(args, model, onnx_path, contract, image_path) -> dict:
    """Each variant as a no-argument callable returning class probabilities."""
    threads = args.threads or usable_cpus()
    predictor = OnnxPredictor(onnx_path, threads=threads)
    pre = Preprocessor(contract.mean, contract.std).eval()
    x = predictor.preprocess(image_path)

    @torch.inference_mode()
    def torch_eager():
        gray = torch.from_numpy(load_gray(image_path, args.img_size))[None, None]
        return torch.softmax(model(pre(gray)), 1).numpy()

    return {"onnx_e2e": lambda: predictor.predict_path(image_path)["probabilities"],
            "torch_eager": torch_eager,
            "onnx_limit": lambda: predictor.predict_array(x)}


def run(args) -> dict:
    torch.set_num_threads(args.threads or usable_cpus())
    data_dir = harness.Path(args.data_dir)
    root = harness.make_jpegs(data_dir / f"infer_{args.jpeg_size}px" / "images", 3, args.jpeg_size, 1)
    image_path = harness.list_images(root)[0][0]
    with harness.Stopwatch() as export:
        model, onnx_path, contract = exported_model(args, data_dir / "onnx")
    calls = variants(args, model, onnx_path, contract, image_path)
    e2e = np.asarray(list(calls["onnx_e2e"]().values()))
    assert np.allclose(e2e, calls["torch_eager"]()[0], atol=1e-3), "ONNX and PyTorch disagree"
    times = {v: [] for v in VARIANTS}
    for i in range(args.warmup + args.runs):
        for v in VARIANTS[i % 3:] + VARIANTS[:i % 3]:  # rotate the order: no variant always follows another
            with harness.Stopwatch() as sw:
                calls[v]()
            if i >= args.warmup:
                times[v].append(sw.seconds)
    stats = {v: harness.latency_stats(t) for v, t in times.items()}
    med = {v: s["median_ms"] for v, s in stats.items()}
    ratios = {"onnx_e2e/onnx_limit": med["onnx_e2e"] / med["onnx_limit"],
              "onnx_e2e/torch_eager": med["onnx_e2e"] / med["torch_eager"]}
    return {"latency": stats, "ratios": ratios, "export_s": export.seconds, "image": str(image_path)}


def main(args) -> int:
    if args.smoke:
        args.img_size, args.jpeg_size, args.runs, args.warmup = 32, 64, 2, 1
    results = run(args)
    settings = {k: getattr(args, k) for k in ("model", "img_size", "jpeg_size", "runs", "warmup")}
    settings["threads"] = args.threads or usable_cpus()
    lat, limit = results["latency"], results["latency"]["onnx_limit"]["median_ms"]
    rows = [[v, lat[v]["median_ms"], lat[v]["p95_ms"], lat[v]["median_ms"] / limit] for v in VARIANTS]
    harness.report("bench_inference", settings, ["path", "median ms", "p95 ms", "x limit"], rows, results)
    return 0


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""Single-image latency (ms, median and p95) for a 512x512 JPEG, end to end.

  onnx_e2e     the toolkit's ONNX Runtime path: OnnxPredictor.predict_path (decode, numpy preprocessing, run)
  torch_eager  the same model in PyTorch eager: load_gray + Preprocessor + model + softmax
  onnx_limit   ONNX Runtime alone on an already-preprocessed tensor: the fp32 limit
  int8_e2e     the int8 model (deploy/quantize.py: static QDQ, per-channel weights) end to end, as onnx_e2e
  int8_limit   the int8 model alone on the preprocessed tensor
  ood_limit    the fp32 model with its out-of-distribution output (models.features.ScoredModel: a middle stage
               pooled, and the Mahalanobis distance beside the logits) alone on the preprocessed tensor: what the
               answer checks cost (docs/ood.md)

Same weights, image and threads; the variants alternate call by call in one process. The int8 model is
calibrated on generated phantoms: its speed is what counts here (its agreement with fp32 is the export gate's
job, on a trained model and real test images).

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

from core.contract import DECODE_RULE, Contract
from core.hardware import usable_cpus
from data.images import load_gray
from data.preprocess import Preprocessor
from deploy.export import export_onnx
from deploy.predictors import OnnxPredictor
from deploy.quantize import calibration_reader, quantize_file
from models.zoo import build_model

VARIANTS = ("onnx_e2e", "torch_eager", "onnx_limit", "int8_e2e", "int8_limit", "ood_limit")


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


def artifact_key(args) -> str:
    """What a reused artifact depends on: a file from another torch or decode rule is made again."""
    return f"{args.model}_{args.img_size}px_torch{torch.__version__}_{DECODE_RULE}"


def exported_model(args, out_dir) -> tuple[torch.nn.Module, object, Contract]:
    """A seeded random model and its ONNX export (reused from an earlier run when present)."""
    torch.manual_seed(0)
    model = build_model(args.model, 3).eval()
    contract = Contract(args.model, ("glioma", "meningioma", "pituitary"), args.img_size, (0.2,) * 3, (0.25,) * 3)
    path = out_dir / f"{artifact_key(args)}.onnx"
    if not path.is_file():
        export_onnx(model, contract, path)
    return model, path, contract


def scored_file(model: torch.nn.Module, onnx_path, contract: Contract, args) -> object:
    """The model with the distance output, exported as training does (reused when present). The buffers are the
    shapes a fitted check has (identity whitening): the cost does not depend on their values."""
    from models.features import MIDDLE_LAYERS, FeatureModel, ScoredModel

    path = onnx_path.with_name(f"{onnx_path.stem}_ood.onnx")
    if not path.is_file():
        middle = MIDDLE_LAYERS.get(args.model)
        with torch.no_grad():
            d = FeatureModel(model, middle)(torch.zeros(1, 3, args.img_size, args.img_size))[1].shape[1]
        scored = ScoredModel(model, middle, torch.zeros(3, d), torch.eye(d), torch.zeros(d)).eval()
        export_onnx(scored, contract, path)
    return path


def int8_model(onnx_path, contract: Contract, calibration: list) -> object:
    """The fp32 file quantized as export_model.py --format onnx-int8 does (reused when present)."""
    import onnxruntime

    path = onnx_path.with_name(f"{onnx_path.stem}_int8_ort{onnxruntime.__version__}.onnx")
    if not path.is_file():
        quantize_file(onnx_path, path, calibration_reader(calibration, contract))
    return path


def variants(args, model, paths: tuple, contract, image_path) -> dict:
    """Each variant as a no-argument callable returning class probabilities."""
    threads = args.threads or usable_cpus()
    predictor = OnnxPredictor(paths[0], contract, providers=["CPUExecutionProvider"], threads=threads)
    int8 = OnnxPredictor(paths[1], contract, providers=["CPUExecutionProvider"], threads=threads)
    scored = OnnxPredictor(paths[2], contract, providers=["CPUExecutionProvider"], threads=threads)
    pre = Preprocessor(contract.mean, contract.std).eval()
    x = predictor.preprocess(image_path)

    @torch.inference_mode()
    def torch_eager():
        gray = torch.from_numpy(load_gray(image_path, args.img_size))[None, None]
        return torch.softmax(model(pre(gray)), 1).numpy()

    return {"onnx_e2e": lambda: predictor.predict_path(image_path)["probabilities"],
            "torch_eager": torch_eager,
            "onnx_limit": lambda: predictor.predict_array(x),
            "int8_e2e": lambda: int8.predict_path(image_path)["probabilities"],
            "int8_limit": lambda: int8.predict_array(x),
            "ood_limit": lambda: scored.infer(x).probs}


def run(args) -> dict:
    torch.set_num_threads(args.threads or usable_cpus())
    data_dir = harness.Path(args.data_dir)
    root = harness.make_jpegs(data_dir / f"infer_{args.jpeg_size}px" / "images", 24, args.jpeg_size, 8)
    images = harness.list_images(root)[0]
    image_path = images[0]
    with harness.Stopwatch() as export:
        model, onnx_path, contract = exported_model(args, data_dir / "onnx")
        int8_path = int8_model(onnx_path, contract, images[1:])  # calibrated on the other images
        ood_path = scored_file(model, onnx_path, contract, args)
    calls = variants(args, model, (onnx_path, int8_path, ood_path), contract, image_path)
    e2e = np.asarray(list(calls["onnx_e2e"]().values()))
    assert np.allclose(e2e, calls["torch_eager"]()[0], atol=1e-3), "ONNX and PyTorch disagree"
    times = {v: [] for v in VARIANTS}
    k = len(VARIANTS)
    for i in range(args.warmup + args.runs):
        for v in VARIANTS[i % k:] + VARIANTS[:i % k]:  # rotate the order: no variant always follows another
            with harness.Stopwatch() as sw:
                calls[v]()
            if i >= args.warmup:
                times[v].append(sw.seconds)
    stats = {v: harness.latency_stats(t) for v, t in times.items()}
    med = {v: s["median_ms"] for v, s in stats.items()}
    ratios = {"onnx_e2e/onnx_limit": med["onnx_e2e"] / med["onnx_limit"],
              "onnx_e2e/torch_eager": med["onnx_e2e"] / med["torch_eager"],
              "int8_e2e/onnx_limit": med["int8_e2e"] / med["onnx_limit"],  # the int8 target
              "int8_limit/onnx_limit": med["int8_limit"] / med["onnx_limit"],
              "int8_e2e/int8_limit": med["int8_e2e"] / med["int8_limit"],
              "ood_limit/onnx_limit": med["ood_limit"] / med["onnx_limit"]}  # what the answer checks cost
    return {"latency": stats, "ratios": ratios, "export_s": export.seconds, "image": str(image_path)}


def main(args) -> int:
    if args.smoke:
        args.img_size, args.jpeg_size, args.runs, args.warmup = 32, 64, 2, 1
    results = run(args)
    settings = {k: getattr(args, k) for k in ("model", "img_size", "jpeg_size", "runs", "warmup")}
    settings["threads"] = args.threads or usable_cpus()
    lat, limit = results["latency"], results["latency"]["onnx_limit"]["median_ms"]
    rows = [[v, lat[v]["median_ms"], lat[v]["p95_ms"], lat[v]["median_ms"] / limit] for v in VARIANTS]
    harness.report("bench_inference", settings, ["path", "median ms", "p95 ms", "x fp32 limit"], rows, results)
    return 0


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""Export a trained model for deployment (ONNX, TorchScript, torch.export .pt2) and prove each artifact
predicts what the PyTorch model predicts.

Every artifact carries the preprocessing contract (class names, image size, mean, std): in the ONNX
metadata properties, as an extra file inside the TorchScript and .pt2 archives, and as a JSON beside them.
The artifacts take the normalized float input (N, 3, S, S) and return logits; softmax gives probabilities.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utils.errors import UserError
from utils.onnx_inference import preprocess_path, softmax

FORMATS = {"onnx": ("onnx",), "torchscript": ("torchscript",), "pt2": ("pt2",),
           "both": ("torchscript", "onnx"), "all": ("onnx", "torchscript", "pt2")}
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
LABELS = {"onnx": "ONNX", "torchscript": "TorchScript", "pt2": "torch.export (.pt2)"}
# Parity tolerance on softmax probabilities: float32 kernels in another runtime reorder sums
# (differences ~1e-6 here); 1e-4 is below the 0.01 % a printed confidence can show, while a wrong
# graph, missing normalization or a baked-in batch size moves probabilities by far more.
PROB_TOLERANCE = 1e-4
CONTRACT_FILE = "contract.json"  # its name inside the TorchScript / .pt2 archives
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass
class ParityResult:
    fmt: str
    n_images: int
    max_abs_logit: float
    max_abs_prob: float
    same_argmax: bool

    @property
    def passed(self) -> bool:
        return self.max_abs_prob <= PROB_TOLERANCE and self.same_argmax


def contract_from_checkpoint(ckpt: dict) -> dict:
    """The preprocessing contract of a checkpoint, plus provenance that helps an auditor."""
    contract = {
        "model_name": ckpt["model_name"], "class_names": list(ckpt["class_names"]),
        "img_size": int(ckpt["img_size"]), "mean": [float(v) for v in ckpt["mean"]],
        "std": [float(v) for v in ckpt["std"]],
    }
    contract.update(input={"name": INPUT_NAME, "shape": ["batch", 3, contract["img_size"], contract["img_size"]],
                           "dtype": "float32", "layout": "NCHW"},
                    output={"name": OUTPUT_NAME, "kind": "logits (apply softmax for probabilities)"},
                    preprocessing=("8-bit grayscale (DICOM: window center/width, else robust min-max; JPEG: "
                                   "decoded by libjpeg at the smallest DCT scale >= img_size), bilinear resize "
                                   "to img_size x img_size, /255, (x - mean) / std, replicated to 3 channels "
                                   "(data.images.load_gray)"),
                    checkpoint_epoch=ckpt.get("epoch"), split_manifest=ckpt.get("split_manifest"),
                    data_fingerprint=ckpt.get("data_fingerprint"))
    return contract


def example_input(img_size: int, batch: int = 2) -> torch.Tensor:
    # batch 2, not 1: exporters specialize a dimension of size 1 to a constant
    return torch.randn(batch, 3, img_size, img_size)


def batch_dim():
    return torch.export.Dim("batch", min=1, max=4096)


def export_onnx(model: torch.nn.Module, contract: dict, out_path, img_size: int) -> Path:
    """One self-contained .onnx file (weights embedded), dynamic batch, contract in metadata_props, checked."""
    import onnx

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(model.eval(), (example_input(img_size),), None, dynamo=True,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: batch_dim()},), external_data=False,
                                verbose=False)
    for key, value in contract.items():
        program.model.metadata_props[key] = json.dumps(value)
    try:
        # external_data=False: one file a hospital system can copy; fails beyond protobuf's 2 GB limit
        program.save(str(out_path), external_data=False)
    except ValueError as exc:
        raise UserError(f"cannot write {out_path} as one file: {exc}") from None
    onnx.checker.check_model(str(out_path), full_check=True)
    return out_path


def export_torchscript(model: torch.nn.Module, contract: dict, out_path, img_size: int) -> Path:
    """Traced TorchScript (deprecated upstream, kept for users who ask for it); contract as an extra file."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example_input(img_size))
    torch.jit.save(traced, str(out_path), _extra_files={CONTRACT_FILE: json.dumps(contract)})
    return out_path


def export_pt2(model: torch.nn.Module, contract: dict, out_path, img_size: int) -> Path:
    """torch.export program with a dynamic batch; contract as an extra file of the archive."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.export.export(model.eval(), (example_input(img_size),), dynamic_shapes=({0: batch_dim()},))
    torch.export.save(program, str(out_path), extra_files={CONTRACT_FILE: json.dumps(contract)})
    return out_path


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript, "pt2": export_pt2}


def artifact_path(out_dir, model_name: str, fmt: str) -> Path:
    return Path(out_dir) / f"{model_name}_model{SUFFIXES[fmt]}"


def write_contract_json(contract: dict, out_dir, model_name: str) -> Path:
    path = Path(out_dir) / f"{model_name}_contract.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(contract, indent=2) + "\n")
    return path


def load_runner(fmt: str, path) -> Callable[[np.ndarray], np.ndarray]:
    """The exported artifact as a function: float32 (N, 3, S, S) -> logits (N, C)."""
    if fmt == "onnx":
        from utils.onnx_inference import OnnxPredictor

        return OnnxPredictor(path, providers=["CPUExecutionProvider"]).logits
    module = torch.jit.load(str(path), map_location="cpu") if fmt == "torchscript" else \
        torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()
    return run


def parity_inputs(paths: list, contract: dict, n: int = 8) -> np.ndarray:
    """Real images through the deployed preprocessing: float32 (n, 3, S, S)."""
    if not paths:
        raise UserError("no test images for the parity check (is the split's test part empty?)")
    return np.concatenate([preprocess_path(p, contract) for p in list(paths)[:n]], axis=0)


def check_parity(fmt: str, model: torch.nn.Module, runner, x: np.ndarray) -> ParityResult:
    """Artifact vs PyTorch on the whole batch and on one image alone (proves the batch is dynamic)."""
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    got = np.concatenate([runner(x), runner(x[:1])], axis=0)
    ref = np.concatenate([ref, ref[:1]], axis=0)
    p_ref, p_got = softmax(ref.astype(np.float64)), softmax(got.astype(np.float64))
    return ParityResult(fmt, len(x), float(np.abs(got - ref).max()), float(np.abs(p_got - p_ref).max()),
                        bool((p_got.argmax(1) == p_ref.argmax(1)).all()))


def format_size(n_bytes: int) -> str:
    return f"{n_bytes / 1024 ** 2:.1f} MB"


def export_checked(fmt: str, model: torch.nn.Module, contract: dict, path, x: np.ndarray) -> tuple[Path, ParityResult]:
    """Export one format and compare it with PyTorch on the inputs x."""
    path = EXPORTERS[fmt](model, contract, path, contract["img_size"])
    return path, check_parity(fmt, model, load_runner(fmt, path), x)


def parity_line(result: ParityResult) -> str:
    return (f"parity vs PyTorch on {result.n_images} images (+ batch of 1): max |Δlogit| {result.max_abs_logit:.2e}, "
            f"max |Δprob| {result.max_abs_prob:.2e} (tolerance {PROB_TOLERANCE:.0e}), "
            f"same predicted class: {'yes' if result.same_argmax else 'NO'}")


@dataclass
class ExportSource:
    """A checkpoint ready to export: the model on CPU, its contract, and real inputs for the parity checks."""
    ckpt_path: Path
    ckpt: dict
    model: torch.nn.Module
    contract: dict
    x: np.ndarray


def load_export_source(cfg, checkpoint, model_flag: str | None, resplit: bool = False, n_images: int = 8,
                       log=print) -> ExportSource:
    from data.manifest import prepare_split
    from models.loading import model_from_checkpoint
    from utils.checkpoint import default_checkpoint, load_checkpoint

    ckpt_path = Path(checkpoint or default_checkpoint(cfg))
    ckpt = load_checkpoint(ckpt_path)
    if model_flag and ckpt["model_name"] != model_flag:
        raise UserError(f"{ckpt_path} holds a {ckpt['model_name']} model, not {model_flag}")
    contract = contract_from_checkpoint(ckpt)
    split = prepare_split(cfg, resplit, log=log)
    x = parity_inputs(split.samples("test")[0], contract, n_images)
    log(f"🔍 Parity inputs: {len(x)} test images of {split.manifest_path}, preprocessed with the checkpoint's contract")
    if ckpt.get("data_fingerprint") not in (None, split.fingerprint):
        log(f"   note: the checkpoint was trained on data {ckpt['data_fingerprint']}, these images are from "
            f"{split.fingerprint}; the parity check is still valid")
    return ExportSource(ckpt_path, ckpt, model_from_checkpoint(ckpt, "cpu"), contract, x)

"""Export a trained model for deployment (ONNX, TorchScript, torch.export .pt2) and prove each artifact
predicts what the PyTorch model predicts.

Every artifact carries the preprocessing contract (class names, image size, mean, std): in the ONNX
metadata properties, as an extra file inside the TorchScript and .pt2 archives, and as a JSON beside them.
The artifacts take the normalized float input (N, 3, S, S) and return logits; softmax gives probabilities.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.contract import INPUT_NAME, OUTPUT_NAME, Contract
from core.errors import UserError
from core.fileio import publish, temporary_path, write_text_atomic
from deploy.predictors import preprocess_path, softmax
from deploy.registry import INT8_FLAVOR
from evaluation.source import OpenedCheckpoint

if TYPE_CHECKING:
    pass

INT8 = INT8_FLAVOR  # made by deploy/quantize.py from the fp32 ONNX model, with its own gate instead of parity
FORMATS = {"onnx": ("onnx",), "torchscript": ("torchscript",), "pt2": ("pt2",), INT8: (INT8,),
           "both": ("torchscript", "onnx"), "all": ("onnx", "torchscript", "pt2", INT8)}
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2", INT8: "_int8.onnx"}
LABELS = {"onnx": "ONNX", "torchscript": "TorchScript", "pt2": "torch.export (.pt2)", INT8: "ONNX int8"}
# Parity tolerance on softmax probabilities: float32 kernels in another runtime reorder sums
# (differences ~1e-6 here); 1e-4 is below the 0.01 % a printed confidence can show, while a wrong
# graph, missing normalization or a baked-in batch size moves probabilities by far more.
PROB_TOLERANCE = 1e-4
CONTRACT_FILE = "contract.json"  # its name inside the TorchScript / .pt2 archives


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


def example_input(img_size: int, batch: int = 2) -> torch.Tensor:
    # batch 2, not 1: exporters specialize a dimension of size 1 to a constant
    return torch.randn(batch, 3, img_size, img_size)


def batch_dim():
    return torch.export.Dim("batch", min=1, max=4096)


def export_onnx(model: torch.nn.Module, contract: Contract, out_path) -> Path:
    """One self-contained .onnx file (weights embedded), dynamic batch, contract in metadata_props, checked."""
    import onnx

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(model.eval(), (example_input(contract.img_size),), None, dynamo=True,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: batch_dim()},), external_data=False,
                                verbose=False)
    program.model.metadata_props.update(contract.to_onnx_metadata())
    try:
        # external_data=False: one file a hospital system can copy; fails beyond protobuf's 2 GB limit
        program.save(str(out_path), external_data=False)
    except ValueError as exc:
        raise UserError(f"cannot write {out_path} as one file: {exc}") from None
    onnx.checker.check_model(str(out_path), full_check=True)
    return out_path


def export_torchscript(model: torch.nn.Module, contract: Contract, out_path) -> Path:
    """Traced TorchScript (deprecated upstream, kept for users who ask for it); contract as an extra file."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example_input(contract.img_size))
    torch.jit.save(traced, str(out_path), _extra_files={CONTRACT_FILE: contract.to_json()})
    return out_path


def export_pt2(model: torch.nn.Module, contract: Contract, out_path) -> Path:
    """torch.export program with a dynamic batch; contract as an extra file of the archive."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.export.export(model.eval(), (example_input(contract.img_size),),
                                  dynamic_shapes=({0: batch_dim()},))
    torch.export.save(program, str(out_path), extra_files={CONTRACT_FILE: contract.to_json()})
    return out_path


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript, "pt2": export_pt2}


def artifact_path(out_dir, model_name: str, fmt: str) -> Path:
    return Path(out_dir) / f"{model_name}_model{SUFFIXES[fmt]}"


def write_contract_json(contract: Contract, out_dir) -> Path:
    path = Path(out_dir) / f"{contract.model_name}_contract.json"
    write_text_atomic(path, contract.to_json())
    return path


def load_runner(fmt: str, path) -> Callable[[np.ndarray], np.ndarray]:
    """The exported artifact as a function: float32 (N, 3, S, S) -> logits (N, C)."""
    if fmt == "onnx":
        from deploy.predictors import OnnxPredictor

        return OnnxPredictor(path, providers=["CPUExecutionProvider"]).logits
    module = torch.jit.load(str(path), map_location="cpu") if fmt == "torchscript" else \
        torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()
    return run


def parity_inputs(paths: list, contract: Contract, n: int = 8) -> np.ndarray:
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
    return f"{n_bytes / 1024 ** 2:.2f} MB"


def export_checked(fmt: str, model: torch.nn.Module, contract: Contract, path,
                   x: np.ndarray) -> tuple[Path, ParityResult]:
    """Export one format under a temporary name beside `path`, compare it with PyTorch on the inputs x, and
    rename it to `path` only when it matches: an artifact that failed (or whose export broke) never appears."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        EXPORTERS[fmt](model, contract, tmp)
        result = check_parity(fmt, model, load_runner(fmt, tmp), x)
        if result.passed:
            publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path, result


def parity_line(result: ParityResult) -> str:
    return (f"parity vs PyTorch on {result.n_images} images (+ batch of 1): max |Δlogit| {result.max_abs_logit:.2e}, "
            f"max |Δprob| {result.max_abs_prob:.2e} (tolerance {PROB_TOLERANCE:.0e}), "
            f"same predicted class: {'yes' if result.same_argmax else 'NO'}")


@dataclass
class ExportSource:
    """A checkpoint ready to export: the opened checkpoint, its model on CPU, real inputs for the parity checks."""
    opened: OpenedCheckpoint
    model: torch.nn.Module
    x: np.ndarray

    @property
    def contract(self) -> Contract:
        return self.opened.contract


def export_source(opened: OpenedCheckpoint, n_images: int = 8, log=print) -> ExportSource:
    """The opened checkpoint (evaluation.source.open_checkpoint: read once, its split checked) ready to export."""
    from models.loading import model_from_checkpoint

    x = parity_inputs(opened.split.samples("test")[0], opened.contract, n_images)
    log(f"🔍 Parity inputs: {len(x)} test images of {opened.split.manifest_path}, preprocessed with the "
        "checkpoint's contract")
    return ExportSource(opened, model_from_checkpoint(opened.ckpt, "cpu"), x)

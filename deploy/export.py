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
from core.feature_ood import OOD_OUTPUT
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
# Parity tolerance on the feature-space distance, relative: float32 sums over hundreds of features reorder too
# (~1e-6 here); a missing whitening or a wrong class mean moves it by tens of percent.
OOD_TOLERANCE = 1e-3
CONTRACT_FILE = "contract.json"  # its name inside the TorchScript / .pt2 archives


@dataclass
class ParityResult:
    fmt: str
    n_images: int
    max_abs_logit: float
    max_abs_prob: float
    same_argmax: bool
    max_rel_ood: float | None = None  # the feature-space distance (None: the model has no such output)

    @property
    def passed(self) -> bool:
        ood_ok = self.max_rel_ood is None or self.max_rel_ood <= OOD_TOLERANCE
        return self.max_abs_prob <= PROB_TOLERANCE and self.same_argmax and ood_ok


def split_outputs(out) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, distances or None) of a model or artifact that returns logits alone or (logits, ood_distance)."""
    if isinstance(out, (tuple, list)):
        logits, distance = (t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in out)
        return logits, distance.reshape(-1)
    return (out.detach().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)), None


def output_names(model: torch.nn.Module) -> list[str]:
    """The artifact's outputs: logits, and the feature-space distance when the model computes it."""
    from models.features import ScoredModel

    return [OUTPUT_NAME, OOD_OUTPUT] if isinstance(model, ScoredModel) else [OUTPUT_NAME]


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
                                input_names=[INPUT_NAME], output_names=output_names(model),
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


def load_runner(fmt: str, path) -> Callable[[np.ndarray], tuple]:
    """The exported artifact as a function: float32 (N, 3, S, S) -> (logits (N, C), distances (N,) or None)."""
    if fmt == "onnx":
        from deploy.predictors import OnnxPredictor

        return OnnxPredictor(path, providers=["CPUExecutionProvider"]).outputs
    module = torch.jit.load(str(path), map_location="cpu") if fmt == "torchscript" else \
        torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> tuple:
        with torch.no_grad():
            return split_outputs(module(torch.from_numpy(x)))
    return run


def parity_inputs(paths: list, contract: Contract, n: int = 8) -> np.ndarray:
    """Real images through the deployed preprocessing: float32 (n, 3, S, S)."""
    if not paths:
        raise UserError("no test images for the parity check (is the split's test part empty?)")
    return np.concatenate([preprocess_path(p, contract) for p in list(paths)[:n]], axis=0)


def check_parity(fmt: str, model: torch.nn.Module, runner, x: np.ndarray) -> ParityResult:
    """Artifact vs PyTorch on the whole batch and on one image alone (proves the batch is dynamic)."""
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(x))
    ref, ref_ood = split_outputs(out)
    (whole, whole_ood), (one, one_ood) = split_outputs(runner(x)), split_outputs(runner(x[:1]))
    got = np.concatenate([whole, one], axis=0)
    ref = np.concatenate([ref, ref[:1]], axis=0)
    p_ref, p_got = softmax(ref.astype(np.float64)), softmax(got.astype(np.float64))
    rel_ood = None
    if ref_ood is not None:
        got_ood = np.concatenate([whole_ood, one_ood]) if whole_ood is not None else np.full(len(ref), np.inf)
        ref_ood = np.concatenate([ref_ood, ref_ood[:1]]).astype(np.float64)
        rel_ood = float((np.abs(got_ood - ref_ood) / np.maximum(np.abs(ref_ood), 1e-6)).max())
    return ParityResult(fmt, len(x), float(np.abs(got - ref).max()), float(np.abs(p_got - p_ref).max()),
                        bool((p_got.argmax(1) == p_ref.argmax(1)).all()), rel_ood)


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
            f"same predicted class: {'yes' if result.same_argmax else 'NO'}"
            + ("" if result.max_rel_ood is None else
               f", max relative Δ{OOD_OUTPUT} {result.max_rel_ood:.2e} (tolerance {OOD_TOLERANCE:.0e})"))


@dataclass
class ExportSource:
    """A checkpoint ready to export: the opened checkpoint, its model on CPU (answering (logits, ood_distance) when
    the checkpoint has the check), real inputs for the parity checks, and the model's logits alone (`plain`)."""
    opened: OpenedCheckpoint
    model: torch.nn.Module
    x: np.ndarray
    plain: torch.nn.Module | None = None  # None: `model` gives logits alone already

    @property
    def contract(self) -> Contract:
        return self.opened.contract


def export_source(opened: OpenedCheckpoint, n_images: int = 8, log=print) -> ExportSource:
    """The opened checkpoint (evaluation.source.open_checkpoint: read once, its split checked) ready to export."""
    from models.features import answering_model
    from models.loading import model_from_checkpoint

    x = parity_inputs(opened.split.samples("test")[0], opened.contract, n_images)
    log(f"🔍 Parity inputs: {len(x)} test images of {opened.split.manifest_path}, preprocessed with the "
        "checkpoint's contract")
    plain = model_from_checkpoint(opened.ckpt, "cpu")
    return ExportSource(opened, answering_model(plain, opened.ckpt), x, plain)

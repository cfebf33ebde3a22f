"""int8 inference: static quantization of the fp32 ONNX model in ONNX Runtime (QDQ), calibrated on a sample of
the training split through the toolkit's own preprocessing, and the gate it must pass before it is written.

Weights are int8 per output channel, activations uint8 per tensor (MinMax ranges over the calibration images).
The weights use 7 of their 8 bits (reduce_range): x86 CPUs without VNNI multiply u8 x s8 with an instruction
that can saturate at full range, and the file may be served on another machine than the one that made it.
The int8 file is accepted only when, on the test split, its top-1 answers agree with the fp32 model's on at
least INT8_MIN_AGREEMENT of the images and its accuracy lies inside the fp32 model's bootstrap confidence
interval; it carries the contract (precision "int8", how it was calibrated, the gate's figures) in its metadata.
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.contract import INPUT_NAME, OUTPUT_NAME, Contract
from core.errors import UserError
from core.feature_ood import FEATURE_OOD_KEY, OOD_OUTPUT, feature_limit
from core.fileio import publish
from data.images import ImageReadError
from data.preprocess import Preprocessor
from deploy.onnx_module import open_onnx
from deploy.predictors import preprocess_path
from evaluation.prediction import predict_split
from evaluation.uncertainty import bootstrap_intervals

if TYPE_CHECKING:
    from core.config import Config
    from deploy.export import ExportSource

INT8_MIN_AGREEMENT = 0.99  # top-1 answers the int8 model must share with fp32 on the test split
CALIBRATION_IMAGES = 200  # default sample of the training split; MinMax ranges settle well before that
CALIBRATION_SEED = 0


def calibration_sample(paths: list, n: int, seed: int = CALIBRATION_SEED) -> list:
    """A seeded random sample of n training images (all of them when there are fewer)."""
    order = np.random.default_rng(seed).permutation(len(paths))[:n]
    return [paths[i] for i in sorted(order)]


def calibration_reader(paths: list, contract: Contract, batch: int = 16):
    """ONNX Runtime's calibration reader over real images, preprocessed as at inference (preprocess_path);
    an unreadable image is reported by path and skipped."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(paths), batch))
            self.used = 0

        def get_next(self):
            for start in self.batches:
                arrays = []
                for p in paths[start:start + batch]:
                    try:
                        arrays.append(preprocess_path(p, contract))
                    except ImageReadError as exc:
                        print(f"   skipped for calibration: {exc}", file=sys.stderr)
                if arrays:
                    self.used += len(arrays)
                    return {INPUT_NAME: np.concatenate(arrays)}
            return None
    return Reader()


def quantize_file(fp32_path: Path, out_path: Path, reader) -> Path:
    """Static QDQ quantization of an fp32 ONNX file (ONNX Runtime's shape inference and graph clean-up first)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_path.with_name(out_path.stem + ".prepared.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=distance_nodes(prepared))
    finally:
        prepared.unlink(missing_ok=True)
    return out_path


def distance_nodes(onnx_path: Path) -> list[str]:
    """The nodes that compute only the feature-space distance (past the features the classifier shares): kept in
    float, since a per-tensor uint8 range over a squared distance would swamp the small ones that matter."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    outputs = [o.name for o in graph.output]
    if OOD_OUTPUT not in outputs:
        return []
    producer = {out: node for node in graph.node for out in node.output}

    def ancestors(name: str) -> set[str]:
        seen, todo = set(), [name]
        while todo:
            node = producer.get(todo.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                todo.extend(node.input)
        return seen

    return sorted(ancestors(OOD_OUTPUT) - ancestors(OUTPUT_NAME))


# ---- the gate ------------------------------------------------------------------------------------
@dataclass
class Int8Verdict:
    """How the int8 model answers the test split, against the fp32 model."""
    n_test: int
    agreement: float  # share of test images where both give the same top-1 class
    fp32_accuracy: float
    ci: tuple[float, float]  # fp32 accuracy's bootstrap interval
    int8_accuracy: float
    confidence: float
    min_agreement: float = INT8_MIN_AGREEMENT
    ood_rel_error: float | None = None  # median relative difference of the feature-space distance from fp32's
    ood_flag_agreement: float | None = None  # share of test images both call in or out of distribution alike

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement and self.ci[0] <= self.int8_accuracy <= self.ci[1]

    def problems(self) -> list[str]:
        """What failed, each saying by how much."""
        out = []
        if self.agreement < self.min_agreement:
            out.append(f"its top-1 answers agree with fp32 on {self.agreement:.1%} of {self.n_test} test images, "
                       f"{(self.min_agreement - self.agreement) * 100:.1f} points short of {self.min_agreement:.0%}")
        low, high = self.ci
        if not low <= self.int8_accuracy <= high:
            gap, side = (low - self.int8_accuracy, "below") if self.int8_accuracy < low else \
                (self.int8_accuracy - high, "above")
            out.append(f"its accuracy {self.int8_accuracy:.1%} lies {gap * 100:.1f} points {side} fp32's "
                       f"{self.confidence:.0%} CI ({low:.1%}-{high:.1%})")
        return out

    def summary(self) -> str:
        low, high = self.ci
        ood = "" if self.ood_rel_error is None else (
            f"; feature distance: median relative difference {self.ood_rel_error:.2%}, the same out-of-distribution "
            f"call on {self.ood_flag_agreement:.2%}")
        return (f"int8 vs fp32 on {self.n_test} test images: top-1 agreement {self.agreement:.2%} (needs "
                f"{self.min_agreement:.0%}); accuracy int8 {self.int8_accuracy:.2%}, fp32 {self.fp32_accuracy:.2%} "
                f"({self.confidence:.0%} CI {low:.2%}-{high:.2%})" + ood)

    def to_dict(self) -> dict:
        return {"n_test": self.n_test, "agreement": self.agreement, "min_agreement": self.min_agreement,
                "int8_accuracy": self.int8_accuracy, "fp32_accuracy": self.fp32_accuracy,
                "fp32_ci": list(self.ci), "confidence": self.confidence,
                "ood_rel_error": self.ood_rel_error, "ood_flag_agreement": self.ood_flag_agreement}

    def compare_distances(self, fp32: np.ndarray | None, int8: np.ndarray | None, limit: float | None) -> None:
        """The int8 file's feature-space distances against fp32's on the same test images (reported, not gated:
        the distance is computed in float in both files, only the features it starts from are int8)."""
        if fp32 is None or int8 is None or limit is None:
            return
        self.ood_rel_error = float(np.median(np.abs(int8 - fp32) / np.maximum(np.abs(fp32), 1e-6)))
        self.ood_flag_agreement = float(((int8 > limit) == (fp32 > limit)).mean())


def judge_int8(y_true, fp32_pred, int8_pred, n_classes: int, ev) -> Int8Verdict:
    """The gate's figures; ev is the config's evaluation section (bootstrap resamples, confidence, seed)."""
    y_true, fp32_pred, int8_pred = (np.asarray(a) for a in (y_true, fp32_pred, int8_pred))
    ci = bootstrap_intervals(y_true, fp32_pred, n_classes, ev.bootstrap_samples, ev.confidence,
                             ev.bootstrap_seed)["accuracy"]
    return Int8Verdict(n_test=len(y_true), agreement=float((fp32_pred == int8_pred).mean()),
                       fp32_accuracy=float((fp32_pred == y_true).mean()), ci=(float(ci[0]), float(ci[1])),
                       int8_accuracy=float((int8_pred == y_true).mean()), confidence=ev.confidence,
                       min_agreement=INT8_MIN_AGREEMENT)


def score_test_split(cfg: Config, src: ExportSource, onnx_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true labels, predicted classes, feature-space distances or None) of an ONNX file on the test split, through
    evaluate.py's own loop."""
    c = src.contract
    pre = Preprocessor(c.mean, c.std)
    scored = predict_split(cfg, src.opened.split, "test", open_onnx(onnx_path), pre, c.img_size, torch.device("cpu"))
    return scored.y_true, scored.y_prob.argmax(axis=1), scored.ood


# ---- the export ----------------------------------------------------------------------------------
def int8_contract(contract: Contract, n_calibration: int, verdict: Int8Verdict) -> Contract:
    """The fp32 model's contract (same preprocessing) plus what makes this file int8 and the gate it passed."""
    import onnxruntime

    quantization = {"method": "ONNX Runtime static quantization, QDQ", "onnxruntime": onnxruntime.__version__,
                    "weights": "int8, per output channel, 7-bit range", "activations": "uint8, per tensor",
                    "calibration": f"MinMax over {n_calibration} images of the training split (seed "
                                   f"{CALIBRATION_SEED}), preprocessed as at inference"}
    return replace(contract, extra={**contract.extra, "precision": "int8", "quantization": quantization,
                                    "int8_gate": verdict.to_dict()})


def write_metadata(onnx_path: Path, contract: Contract) -> None:
    import onnx

    model = onnx.load(str(onnx_path))
    del model.metadata_props[:]
    for key, value in contract.to_onnx_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(onnx_path))


def export_int8(cfg: Config, src: ExportSource, out_path, n_calibration: int = CALIBRATION_IMAGES,
                log=print, fp32_path: Path | None = None) -> tuple[Path, Int8Verdict]:
    """Quantize the fp32 ONNX model (`fp32_path`, parity-checked by the caller; else exported and checked here)
    and judge it on the test split; the int8 file appears at out_path only when it passes (else UserError saying
    by how much, and no file)."""
    from deploy.export import export_checked, parity_line

    if n_calibration < 1:
        raise UserError(f"--calibration-images must be at least 1, got {n_calibration}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".int8-") as tmp:
        if fp32_path is None:
            fp32_path, parity = export_checked("onnx", src.model, src.contract, Path(tmp) / "fp32.onnx", src.x)
            if not parity.passed:
                raise UserError(f"the fp32 ONNX model the int8 one is made from does not match PyTorch: "
                                f"{parity_line(parity)}")
        sample = calibration_sample(src.opened.split.samples("train")[0], n_calibration)
        if not sample:
            raise UserError(f"the training split of {src.opened.split.manifest_path} is empty: no images to "
                            "calibrate the int8 ranges on")
        log(f"🔧 Calibrating int8 ranges on {len(sample)} training images")
        reader = calibration_reader(sample, src.contract)
        int8_path = quantize_file(fp32_path, Path(tmp) / "int8.onnx", reader)
        y, fp32_pred, fp32_ood = score_test_split(cfg, src, fp32_path)
        _, int8_pred, int8_ood = score_test_split(cfg, src, int8_path)
        verdict = judge_int8(y, fp32_pred, int8_pred, len(src.contract.class_names), cfg.evaluation)
        verdict.compare_distances(fp32_ood, int8_ood, feature_limit(src.contract.extra.get(FEATURE_OOD_KEY)))
        log(f"   {verdict.summary()}")
        if not verdict.passed:
            stale = " (the earlier int8 file there, made from another model, was removed)" if out_path.exists() else ""
            out_path.unlink(missing_ok=True)
            raise UserError(f"int8 export refused{stale}: " + "; ".join(verdict.problems()))
        write_metadata(int8_path, int8_contract(src.contract, reader.used, verdict))
        publish(int8_path, out_path)  # same folder: an atomic rename, the file appears whole or not at all
    return out_path, verdict

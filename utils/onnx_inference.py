"""Predict from an exported ONNX model alone: numpy, Pillow and ONNX Runtime, no PyTorch.

The preprocessing contract (class names, image size, mean, std) travels inside the .onnx file as
metadata properties (written by utils/export.py), so the file is enough to predict correctly.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data.images import load_gray
from data.preprocess_numpy import preprocess_numpy

CONTRACT_KEYS = ("model_name", "class_names", "img_size", "mean", "std")
# Tried in this order; an execution provider that ONNX Runtime lacks here is skipped.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class ContractError(ValueError):
    """An ONNX file without a complete preprocessing contract in its metadata."""


def contract_from_props(props: dict[str, str], source: str = "model") -> dict:
    """Decode the JSON-valued metadata properties into the contract dict."""
    missing = [k for k in CONTRACT_KEYS if k not in props]
    if missing:
        raise ContractError(f"{source}: no preprocessing contract in its metadata (missing {', '.join(missing)}); "
                            "export it with export_model.py")
    contract = {k: json.loads(props[k]) for k in CONTRACT_KEYS}
    contract["img_size"] = int(contract["img_size"])
    return contract


def read_contract(onnx_path: str | Path) -> dict:
    """{"model_name","class_names","img_size","mean","std"} from the ONNX file's metadata_props."""
    import onnx  # only the metadata is read; weights stay on disk when stored externally

    model = onnx.load(str(onnx_path), load_external_data=False)
    return contract_from_props({p.key: p.value for p in model.metadata_props}, str(onnx_path))


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)  # shift: exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def preprocess_path(path, contract: dict) -> np.ndarray:
    """One image through the contract's preprocessing: float32 (1, 3, S, S); raises ImageReadError."""
    return preprocess_numpy(load_gray(path, int(contract["img_size"])), contract["mean"], contract["std"])


class Predictor:
    """What every predictor shares: the contract's preprocessing and the output record.
    Subclasses set `self.contract` and implement `predict_array`."""

    contract: dict

    @property
    def class_names(self) -> list[str]:
        return list(self.contract["class_names"])

    def preprocess(self, path) -> np.ndarray:
        """(1, 3, S, S) float32, the training preprocessing; raises data.images.ImageReadError."""
        return preprocess_path(path, self.contract)

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_path(self, path) -> dict:
        return prediction_record(path, self.predict_array(self.preprocess(path))[0], self.class_names)


class OnnxPredictor(Predictor):
    """One ONNX Runtime session, created once and reused for every prediction."""

    def __init__(self, onnx_path: str | Path, contract: dict | None = None,
                 providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.onnx_path = Path(onnx_path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(self.onnx_path), sess_options=options,
                                            providers=providers or default_providers())
        if contract is None:
            props = self.session.get_modelmeta().custom_metadata_map
            contract = contract_from_props(props, str(self.onnx_path))
        self.contract = contract
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw model outputs (N, C) for preprocessed inputs (N, 3, S, S)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, C) for preprocessed inputs (N, 3, S, S)."""
        return softmax(self.logits(x).astype(np.float64)).astype(np.float32)


def prediction_record(path, probs: np.ndarray, class_names: list[str]) -> dict:
    """The one output record of every predictor (ONNX here, PyTorch in inference_with_mlflow.py)."""
    index = int(np.argmax(probs))
    return {
        "path": str(path),
        "predicted_class": class_names[index],
        "class_index": index,
        "confidence": float(probs[index]),
        "probabilities": {name: float(p) for name, p in zip(class_names, probs)},
    }

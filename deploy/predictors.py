"""Predictors: one base (the contract's preprocessing and the output record), two runtimes.

OnnxPredictor needs numpy, Pillow and ONNX Runtime only: the contract travels inside the .onnx file,
so the file is enough to predict correctly. TorchPredictor rebuilds the checkpoint's nn.Module (loaded
with weights_only=True) and adds Grad-CAM, which needs the real module. torch is imported only there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.conformal import CONFORMAL_KEY, prediction_set
from core.contract import Contract
from core.feature_ood import FEATURE_OOD_KEY, OOD_OUTPUT, feature_limit
from data.images import frame_name, load_gray, read_frames
from data.preprocess_numpy import preprocess_numpy

# Tried in this order; an execution provider that ONNX Runtime lacks here is skipped.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def read_contract(onnx_path: str | Path) -> Contract:
    """The contract in an ONNX file's metadata_props (the weights are not loaded)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return Contract.from_onnx_metadata({p.key: p.value for p in model.metadata_props}, str(onnx_path))


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)  # shift: exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def preprocess_path(path, contract: Contract) -> np.ndarray:
    """One image through the contract's preprocessing: float32 (1, 3, S, S); raises ImageReadError."""
    return preprocess_numpy(load_gray(path, contract.img_size), contract.mean, contract.std)


def prediction_record(path, probs: np.ndarray, class_names: list[str]) -> dict:
    """The one output record of every predictor."""
    index = int(np.argmax(probs))
    return {
        "path": str(path),
        "predicted_class": class_names[index],
        "class_index": index,
        "confidence": float(probs[index]),
        "probabilities": {name: float(p) for name, p in zip(class_names, probs)},
    }


ANSWER_CHECKS = ("ood_distance", "ood_limit", "out_of_distribution", "prediction_set")  # answer_checks' fields


def answer_checks(probs: np.ndarray, distance: float | None, contract: Contract) -> dict:
    """The record's fields that say whether to trust the answer: the feature-space distance and whether it is past
    the model's limit (out of distribution), and the conformal prediction set; None where the model has no such
    check (trained before they existed)."""
    limit = feature_limit(contract.extra.get(FEATURE_OOD_KEY))
    spec = contract.extra.get(CONFORMAL_KEY)
    return {"ood_distance": None if distance is None else round(float(distance), 4),
            "ood_limit": limit,
            "out_of_distribution": None if distance is None or limit is None else bool(distance > limit),
            "prediction_set": None if spec is None else prediction_set(probs, spec, list(contract.class_names))}


@dataclass
class Outputs:
    """A batch's answers: softmax probabilities (N, C) and feature-space distances (N,) or None. Sliced as one
    (the serving micro-batcher hands each request its rows)."""
    probs: np.ndarray
    ood: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.probs)

    def __getitem__(self, rows: slice) -> Outputs:
        return Outputs(self.probs[rows], None if self.ood is None else self.ood[rows])


@dataclass(frozen=True)
class ModelInput:
    """One image as the model is given it: the file it came from, its frame (1-based; None for a single image),
    the 8-bit slice at the model's size (what the refer rule's intensity check reads) and the preprocessed input."""
    source: str
    frame: int | None
    gray: np.ndarray  # uint8 (S, S)
    x: np.ndarray     # float32 (1, 3, S, S)

    @property
    def name(self) -> str:
        """The record name: the file, or file#frame=K for one frame of several."""
        return frame_name(self.source, self.frame)


class Predictor:
    """What every predictor shares: the contract's preprocessing, the one inference call (`infer`) and the output
    record. Subclasses set `self.contract` and implement `logits` (and `outputs` when they give the distance)."""

    contract: Contract

    @property
    def class_names(self) -> list[str]:
        return list(self.contract.class_names)

    def preprocess(self, path) -> np.ndarray:
        """(1, 3, S, S) float32, the training preprocessing; raises data.images.ImageReadError."""
        return preprocess_path(path, self.contract)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw model outputs (N, C) for preprocessed inputs (N, 3, S, S)."""
        raise NotImplementedError

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (N, C), feature-space distances (N,) or None) for preprocessed inputs (N, 3, S, S)."""
        return self.logits(x), None

    def infer(self, x: np.ndarray) -> Outputs:
        """The one inference call every entry point makes: probabilities and distances of a preprocessed batch."""
        logits, distance = self.outputs(x)
        probs = softmax(np.asarray(logits, dtype=np.float64)).astype(np.float32)
        return Outputs(probs, None if distance is None else np.asarray(distance, dtype=np.float64).reshape(-1))

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, C) for preprocessed inputs (N, 3, S, S)."""
        return self.infer(x).probs

    def record(self, name, out: Outputs, row: int) -> dict:
        """The output record of one row of a batch: the prediction and its checks."""
        distance = None if out.ood is None else out.ood[row]
        return {**prediction_record(name, out.probs[row], self.class_names),
                **answer_checks(out.probs[row], distance, self.contract)}

    def predict_path(self, path) -> dict:
        """One record: an image, or one frame named path#frame=K."""
        return self.record(path, self.infer(self.preprocess(path)), 0)

    def decode(self, path) -> list[ModelInput]:
        """Every image in a file as the model is given it: one, or one per frame of a multi-frame DICOM; raises
        data.images.ImageReadError."""
        c = self.contract
        return [ModelInput(str(path), frame, gray, preprocess_numpy(gray, c.mean, c.std))
                for frame, gray in read_frames(path, c.img_size)]

    def predict_file(self, path) -> list[dict]:
        """One record per image in the file (a multi-frame DICOM gives one per frame, path#frame=K)."""
        inputs = self.decode(path)
        out = self.infer(np.concatenate([i.x for i in inputs]))
        return [self.record(i.name, out, k) for k, i in enumerate(inputs)]


class OnnxPredictor(Predictor):
    """One ONNX Runtime session, created once and reused for every prediction."""

    def __init__(self, onnx_path: str | Path, contract: Contract | None = None,
                 providers: list[str] | None = None, threads: int | None = None,
                 session_config: dict[str, str] | None = None):
        import onnxruntime as ort

        self.onnx_path = Path(onnx_path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        for key, value in (session_config or {}).items():  # e.g. {"session.intra_op.allow_spinning": "0"}
            options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(self.onnx_path), sess_options=options,
                                            providers=providers or default_providers())
        if contract is None:
            props = self.session.get_modelmeta().custom_metadata_map
            contract = Contract.from_onnx_metadata(props, str(self.onnx_path))
        contract.check_decode(str(self.onnx_path))
        self.contract = contract
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        self.ood_name = OOD_OUTPUT if OOD_OUTPUT in names else None  # files exported before it lack it

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.ood_name is None:
            return self.logits(x), None
        x = np.ascontiguousarray(x, dtype=np.float32)
        logits, distance = self.session.run([self.output_name, self.ood_name], {self.input_name: x})
        return logits, distance


class TorchPredictor(Predictor):
    """The PyTorch model of a toolkit checkpoint, plus Grad-CAM overlays."""

    def __init__(self, checkpoint_path: str | Path, contract: Contract | None = None, device: str = "cpu"):
        import torch

        from core.checkpoint import load_checkpoint
        from models.features import answering_model
        from models.loading import model_from_checkpoint

        ckpt = load_checkpoint(checkpoint_path)  # weights_only=True: nothing is unpickled
        self.contract = contract or Contract.from_checkpoint(ckpt)
        self.device = torch.device(device)
        self.model = model_from_checkpoint(ckpt, self.device)  # the plain module: Grad-CAM hooks into it
        self.answering = answering_model(self.model, ckpt)  # with its feature distance when the check was fitted

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x)[0]

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            out = self.answering(x)
        if not isinstance(out, tuple):
            return out.float().cpu().numpy(), None
        return out[0].float().cpu().numpy(), out[1].float().cpu().numpy()

    def _cam_model(self):
        from data.preprocess import Preprocessor
        from evaluation.explain import CamModel

        c = self.contract
        return CamModel(self.model, c.model_name, Preprocessor(c.mean, c.std).to(self.device).eval(), self.device)

    def cam_maps(self, grays: list[np.ndarray], classes: list[int]) -> list[np.ndarray]:
        """The Grad-CAM of each 8-bit image (S x S, as the model sees it) for its class: S x S, 0..1."""
        import torch

        from evaluation.explain import gradcam_maps

        return list(gradcam_maps(self._cam_model(), torch.from_numpy(np.stack(grays))[:, None], classes))

    def cam_grid(self) -> tuple[int, int]:
        """The resolution of the feature map behind cam_maps (rows, columns) at the contract's input size."""
        from evaluation.explain import feature_grid

        return feature_grid(self._cam_model(), self.contract.img_size)

    def gradcam(self, paths: list, predicted: list[int], out_dir) -> list[Path]:
        """One overlay PNG per image (Grad-CAM of its predicted class), named after the image."""
        import torch

        from evaluation.explain import gradcam_gallery

        images = [(torch.from_numpy(load_gray(p, self.contract.img_size))[None], -1) for p in paths]
        files = gradcam_gallery(self._cam_model(), images, list(range(len(images))), predicted, out_dir)
        return [f.replace(f.with_name(f"{i:03d}_{Path(p).stem}_gradcam.png"))
                for i, (f, p) in enumerate(zip(files, paths))]

"""The preprocessing contract: what every stage after training needs to feed a model correctly.

Training writes it into the checkpoint; evaluation, export and every predictor read it back. The same
object travels in the ONNX metadata, inside the TorchScript/.pt2 archives and as {model}_contract.json,
so a deployed file alone is enough to preprocess an image the way the model was trained.
Torch-free and ONNX-free: plain values in, plain values out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

# How pixels are decoded. Bumped whenever data.images changes the pixels it produces; a predictor refuses
# an artifact whose rule it does not implement (its predictions would come from other pixels).
DECODE_RULE = "gray8-v4"  # v4: >8-bit images resized before their min-max stretch; DICOM MONOCHROME1 inverted
DECODE_DESCRIPTION = (
    "8-bit grayscale (DICOM: window center/width, else robust min-max, MONOCHROME1 inverted; 16-bit images: "
    "full-range min-max after the resize; JPEG: decoded by libjpeg at the smallest DCT scale >= img_size), "
    "bilinear resize to img_size x img_size, /255, "
    "(x - mean) / std, replicated to 3 channels (data.images.load_gray)")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# The fields that must be present for a contract to be usable (older artifacts lack the optional ones).
REQUIRED = ("model_name", "class_names", "img_size", "mean", "std")


class ContractError(ValueError):
    """An artifact or checkpoint without a complete preprocessing contract."""


@dataclass(frozen=True)
class Contract:
    model_name: str
    class_names: tuple[str, ...]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    decode: str = DECODE_RULE
    data_fingerprint: str | None = None
    split_manifest: str | None = None
    checkpoint_epoch: int | None = None
    # Optional per-artifact facts (e.g. a quantized variant) carried beside the preprocessing.
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "img_size", int(self.img_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.img_size < 1 or not self.class_names or len(self.mean) != 3 or len(self.std) != 3:
            raise ContractError(f"invalid contract: img_size {self.img_size}, {len(self.class_names)} classes, "
                                f"mean {self.mean}, std {self.std}")

    # ---- checkpoints ----------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> Contract:
        missing = [k for k in REQUIRED if k not in ckpt]
        if missing:
            raise ContractError(f"checkpoint has no preprocessing contract (missing {', '.join(missing)})")
        return cls(model_name=ckpt["model_name"], class_names=ckpt["class_names"], img_size=ckpt["img_size"],
                   mean=ckpt["mean"], std=ckpt["std"], decode=ckpt.get("decode", DECODE_RULE),
                   data_fingerprint=ckpt.get("data_fingerprint"), split_manifest=ckpt.get("split_manifest"),
                   checkpoint_epoch=ckpt.get("epoch"), extra=dict(ckpt.get("contract_extra") or {}))

    def checkpoint_fields(self) -> dict:
        """The contract's keys as a checkpoint stores them (plain lists, for torch.load(weights_only=True))."""
        return {"model_name": self.model_name, "class_names": list(self.class_names), "img_size": self.img_size,
                "mean": list(self.mean), "std": list(self.std), "decode": self.decode,
                "split_manifest": self.split_manifest, "data_fingerprint": self.data_fingerprint,
                "contract_extra": dict(self.extra)}

    # ---- JSON (contract.json, the API) ----------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON form: the fields, plus the input/output description an auditor or integrator reads."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d.update(class_names=list(self.class_names), mean=list(self.mean), std=list(self.std),
                 preprocessing=DECODE_DESCRIPTION if self.decode == DECODE_RULE else self.decode,
                 input={"name": INPUT_NAME, "shape": ["batch", 3, self.img_size, self.img_size],
                        "dtype": "float32", "layout": "NCHW"},
                 output={"name": OUTPUT_NAME, "kind": "logits (apply softmax for probabilities)"})
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, data: dict, source: str = "contract") -> Contract:
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ContractError(f"{source}: no preprocessing contract (missing {', '.join(missing)}); "
                                "export it with export_model.py")
        known = {f.name for f in fields(cls)} - {"extra"}
        derived = {"preprocessing", "input", "output"}
        extra = {k: v for k, v in data.items() if k not in known and k not in derived}
        return cls(**{k: data[k] for k in known if k in data}, extra=extra)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "contract") -> Contract:
        try:
            return cls.from_dict(json.loads(text), source)
        except json.JSONDecodeError as exc:
            raise ContractError(f"{source}: not valid JSON ({exc})") from None

    # ---- ONNX metadata_props (string values, each JSON-encoded) ---------------------------------------
    def to_onnx_metadata(self) -> dict[str, str]:
        return {k: json.dumps(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_onnx_metadata(cls, props: dict[str, str], source: str = "model") -> Contract:
        decoded = {}
        for key, value in props.items():
            try:
                decoded[key] = json.loads(value)
            except (TypeError, json.JSONDecodeError):
                continue  # a property another tool added: not ours
        return cls.from_dict(decoded, source)

    # ---- checks ---------------------------------------------------------------------------------------
    def check_decode(self, source: str = "model") -> None:
        if self.decode != DECODE_RULE:
            raise ContractError(f"{source} was made with decode rule {self.decode!r}; this toolkit decodes with "
                                f"{DECODE_RULE!r}: re-export it from its checkpoint with this version")

"""The model stage (a Ray actor each): one ONNX Runtime session per actor, built once from the registered ONNX file
and the contract inside it; each batch of decoded slices becomes output rows with the class, every probability and
the refer flag. Error rows pass through with their error."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from archive.table import OUTPUT
from core.fileio import process_temp_dir
from data.preprocess_numpy import preprocess_numpy
from deploy.refer import ReferRule
from deploy.registry import onnx_predictor

MODEL_PREFIX = "brain-mri-scorer-"  # a scorer's copy of the model while its session is built
# ONNX Runtime's threads spin after each call by default, taking the cores the decoding tasks need
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}


@dataclass(frozen=True)
class ScoringModel:
    """What an actor needs besides the ONNX file: the rows' model columns, the refer rule, its session's threads."""
    identity: dict  # model_name, model_version, flavor, run_id
    rule: ReferRule
    threads: int = 1


class Scorer:
    """Called with a DECODED batch, returns OUTPUT rows."""

    def __init__(self, model: ScoringModel, onnx_bytes: bytes):
        what = f"{model.identity['model_name']} v{model.identity['model_version']}"
        # the session reads the file once, at creation; an actor Ray stops while it starts leaves its folder, which
        # the next scorer to start removes
        folder = process_temp_dir(MODEL_PREFIX)
        try:
            (folder / "model.onnx").write_bytes(onnx_bytes)
            self.predictor = onnx_predictor(folder / "model.onnx", model.identity["flavor"], what, SESSION_CONFIG,
                                            model.threads)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.model = model

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        ok = [r for r in rows if r["error"] is None]
        c = self.predictor.contract
        grays = [np.frombuffer(r["pixels"], dtype=np.uint8).reshape(c.img_size, c.img_size) for r in ok]
        answers = self.predictor.infer(np.concatenate([preprocess_numpy(g, c.mean, c.std) for g in grays])) if ok \
            else None
        stamp = {**self.model.identity, "kind": "image", "scored_at": datetime.now(timezone.utc)}
        out = [self.judged(r, g, self.predictor.record(r["path"], answers, i)) | stamp
               for i, (r, g) in enumerate(zip(ok, grays))]
        out += [{k: r[k] for k in OUTPUT.names if k in r} | stamp for r in rows if r["error"] is not None]
        return pa.Table.from_pylist(out, schema=OUTPUT)

    def judged(self, row: dict, gray: np.ndarray, record: dict) -> dict:
        verdict = self.model.rule.assess(record, gray)
        return {k: row[k] for k in OUTPUT.names if k in row} | {
            "predicted_class": record["predicted_class"], "class_index": record["class_index"],
            "confidence": record["confidence"], "probabilities": json.dumps(record["probabilities"]),
            "refer": verdict.refer, "refer_reasons": "; ".join(verdict.reason_texts) or None,
            "ood_distance": record.get("ood_distance"), "out_of_distribution": record.get("out_of_distribution"),
            "prediction_set": None if record.get("prediction_set") is None else json.dumps(record["prediction_set"])}

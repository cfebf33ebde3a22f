"""From a received instance to results in the spool: classify every frame, let the server record the
predictions, make the SR and the secondary captures, queue them for the destination.

What the toolkit's server adds comes in as callables (`ServerHooks`): the refer rule of the review station,
Grad-CAM heat maps from the PyTorch model, and `on_predictions`, which writes the audit record and puts the
case on the worklist before the sender of the image gets its C-STORE answer.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from core.config import PacsSection
from data.images import read_dicom
from deploy.predictors import Predictor
from pacs.capture import make_capture
from pacs.classify import classify_instance, instance_file
from pacs.report import ModelInfo, make_report
from pacs.spool import Spool

LOG = logging.getLogger(__name__)

# refer(record, gray) -> True when a radiologist must look first; gray: the frame as the model saw it (uint8 S x S).
Refer = Callable[[dict, np.ndarray], bool]
# heatmaps(grays, class indices) -> one map (any size, 0..1) per frame, e.g. pacs.heatmap.gradcam_heatmaps.
HeatMaps = Callable[[list[np.ndarray], list[int]], list[np.ndarray]]
# on_predictions(records, dataset, calling_ae, peer): the server's audit record and worklist entry.
OnPredictions = Callable[[list[dict], Dataset, str, str], object]


def confidence_refer(threshold: float) -> Refer:
    """The plain rule: refer when the top probability is below `threshold`."""
    return lambda record, gray: record["confidence"] < threshold


@dataclass
class ServerHooks:
    refer: Refer | None = None  # None: confidence_refer(pacs.refer_below)
    heatmaps: HeatMaps | None = None  # None: the prediction alone is burned into the secondary capture
    on_predictions: OnPredictions | None = None


def make_results(ds: Dataset, path: Path, records: list[dict], model: ModelInfo,
                 heat: list[np.ndarray | None] | None = None) -> list[Dataset]:
    """The SR of the instance and one secondary capture per frame (records carry their refer flag)."""
    frames = read_dicom(path)  # the 8-bit slices at their own size, for display
    heat = heat or [None] * len(records)
    return [make_report(ds, records, model)] + [make_capture(ds, r, f, h, model)
                                                for r, f, h in zip(records, frames, heat)]


class InstancePipeline:
    """The receiver's on_instance: (dataset, calling_ae, peer) -> the instance's prediction records."""

    def __init__(self, predictor: Predictor, model: ModelInfo, settings: PacsSection, spool: Spool | None = None,
                 hooks: ServerHooks | None = None, on_spooled: Callable[[], object] | None = None):
        self.predictor, self.model, self.settings, self.spool = predictor, model, settings, spool
        self.hooks = hooks or ServerHooks()
        self.refer = self.hooks.refer or confidence_refer(settings.refer_below)
        self.on_spooled = on_spooled
        self._heat_lock = threading.Lock()  # Grad-CAM hooks the model: one map at a time

    def __call__(self, ds: Dataset, calling_ae: str, peer: str) -> list[dict]:
        work = Path(self.settings.spool_dir) / "work"
        with instance_file(ds, work) as path:
            records, grays = classify_instance(self.predictor, path, ds)
            for record, gray in zip(records, grays):
                record.update(refer=bool(self.refer(record, gray)), model=self.model.name,
                              version=str(self.model.version))
            if self.hooks.on_predictions:
                self.hooks.on_predictions(records, ds, calling_ae, peer)
            if self.spool is None:
                return records
            results = make_results(ds, path, records, self.model, self.heat(records, grays))
        queued = sum(self.spool.put(result) for result in results)
        LOG.info("instance %s: %d frame(s) classified, %d result(s) queued for %s", ds.SOPInstanceUID,
                 len(records), queued, self.spool.destination)
        if self.on_spooled:
            self.on_spooled()
        return records

    def heat(self, records: list[dict], grays: list[np.ndarray]) -> list[np.ndarray | None] | None:
        if self.hooks.heatmaps is None:
            return None
        try:
            with self._heat_lock:
                return list(self.hooks.heatmaps(grays, [r["class_index"] for r in records]))
        except Exception:  # noqa: BLE001 - without a heat map the prediction is still burned in
            LOG.exception("heat map failed for %s; the secondary capture shows the prediction alone",
                          records[0]["sop_instance_uid"])
            return None

"""From a received instance to results in the spool: leave out the node's own results and the series the selection
rules skip, classify every frame, let the server record the predictions, and keep the instance: in its series
(`pacs.results: series`, the default; pacs.series_reader makes one result per series once it is complete) or as a
job of its own (`slice`: the ResultWorker makes an SR and the secondary captures of each instance).

What the toolkit's server adds comes in as callables (`ServerHooks`): the refer rule of the review station,
Grad-CAM heat maps from the PyTorch model, and `on_predictions`, which writes the audit record and puts the
case on the worklist before the sender of the image gets its C-STORE answer.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

from core.config import PacsSection
from data.images import DicomFile, resize_gray
from deploy.predictors import Predictor
from deploy.refer import ReferRule
from pacs.assembly import Arrival, SeriesStore
from pacs.capture import bounded, make_capture
from pacs.classify import classify_instance, instance_file
from pacs.report import ModelInfo, make_report
from pacs.selection import is_own_output, skip_reason
from pacs.spool import Spool
from pacs.worker import Worker
from series.slices import slices_of

LOG = logging.getLogger(__name__)

# heatmaps(grays, class indices) -> one map (any size, 0..1) per frame, e.g. TorchPredictor.cam_maps.
HeatMaps = Callable[[list[np.ndarray], list[int]], list[np.ndarray]]
# on_predictions(records, dataset, calling_ae, peer, grays): the server's audit record and worklist entry; grays:
# each frame as the model saw it (uint8 S x S), so that nothing decodes the instance again.
OnPredictions = Callable[[list[dict], Dataset, str, str, list[np.ndarray]], object]
# on_series(event): the server's audit row of a series read, amended or skipped (pacs.series_reader.series_event).
OnSeries = Callable[[dict], object]


@dataclass
class ServerHooks:
    refer: ReferRule | None = None  # None: the top probability alone, against pacs.refer_below
    heatmaps: HeatMaps | None = None  # None: the prediction alone is burned into the secondary capture
    on_predictions: OnPredictions | None = None
    on_series: OnSeries | None = None


def make_results(ds: Dataset, frames: list[np.ndarray], records: list[dict], model: ModelInfo,
                 heat: list[np.ndarray | None] | None = None) -> list[Dataset]:
    """The SR of the instance and one secondary capture per frame (frames: the 8-bit slices at their own size,
    data.images.read_dicom; records carry their refer flag)."""
    heat = heat or [None] * len(records)
    return [make_report(ds, records, model)] + [make_capture(ds, r, f, h, model)
                                                for r, f, h in zip(records, frames, heat)]


class InstancePipeline:
    """The receiver's on_instance: (dataset, calling_ae, peer) -> the instance's prediction records.

    Before it returns (and so before the sender's C-STORE is answered) the frames are classified, the server
    has recorded them, and the instance waits in the spool for its results; making them (Grad-CAM, SR,
    secondary captures) is the ResultWorker's job, so a long series never holds the association up."""

    def __init__(self, predictor: Predictor, model: ModelInfo, settings: PacsSection, spool: Spool | None = None,
                 hooks: ServerHooks | None = None, on_queued: Callable[[], object] | None = None,
                 store: SeriesStore | None = None):
        self.settings, self.spool, self.on_queued = settings, spool, on_queued
        self.store = store or SeriesStore(series_root(settings, spool))
        self.hooks = hooks or ServerHooks()
        # swapped as one: a prediction never names another model's version, nor is judged by its refer rule
        self.in_use = (predictor, model, self.hooks.refer or ReferRule(settings.refer_below))

    def use_model(self, predictor: Predictor, model: ModelInfo, refer: ReferRule | None = None) -> None:
        """Classify the next instances with another model (the one in flight finishes on its own); `refer`: the
        new model's refer rule (None: the rule in use)."""
        self.in_use = (predictor, model, refer or self.in_use[2])

    @property
    def per_series(self) -> bool:
        return self.settings.results == "series"

    def __call__(self, ds: Dataset, calling_ae: str, peer: str) -> list[dict]:
        """The instance's records; [] for an instance that is taken but not read (own result, skipped series)."""
        if is_own_output(ds, self.spool.known if self.spool else None):
            LOG.info("instance %s is a result of this node: taken, not read again", ds.SOPInstanceUID)
            return []
        reason = skip_reason(ds, self.settings.select)
        if reason:
            self.skip(ds, reason, f"{calling_ae}@{peer}")
            return []
        slices = slices_of(ds) if self.per_series else []
        folder = self.store.root if self.per_series else (
            self.spool.incoming_dir if self.spool else Path(self.settings.spool_dir) / "work")
        with instance_file(ds, folder) as path:
            records = self.classify(path, ds, calling_ae, peer)
            if self.per_series:
                arrival = Arrival(str(ds.SOPInstanceUID), records, slices, time.time(), f"{calling_ae}@{peer}")
                self.store.add(path, arrival, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
            elif self.spool is not None:
                self.spool.add_job(path, records)
        if self.on_queued:
            self.on_queued()
        return records

    def classify(self, path: Path, ds: Dataset, calling_ae: str, peer: str) -> list[dict]:
        """The records of the instance at `path` by the model in use (refer flag, model and version set), recorded
        by the server's on_predictions."""
        predictor, model, refer = self.in_use
        records, grays = classify_instance(predictor, path, ds)
        for record, gray in zip(records, grays):
            judged = refer.assess(record, gray)
            record.update(refer=judged.refer, refer_reasons=judged.reason_texts, model=model.name,
                          version=str(model.version))
        if self.hooks.on_predictions:
            self.hooks.on_predictions(records, ds, calling_ae, peer, grays)
        return records

    def skip(self, ds: Dataset, reason: str, client: str, instances: int | None = None) -> None:
        """A series the selection rules leave out: one audit row (the first time its instances arrive);
        `instances`: too few of them, so it is read when more arrive (pacs.assembly.SeriesStore.skip)."""
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        if self.store.skip(study, series, reason, instances):
            LOG.info("series %s skipped: %s", series, reason)
            if self.hooks.on_series:
                self.hooks.on_series({"outcome": "skipped", "study_uid": study, "series_uid": series,
                                      "client": client, "reason": reason, "n_slices": None, "revision": None,
                                      "model": None, "version": None, "result": None})

    def released(self, keys: list[tuple[str, str]]) -> None:
        """The receiver's on_release: the sender released the association that delivered these series."""
        for study, series in keys:
            self.store.release(study, series)
        if self.on_queued:
            self.on_queued()


def series_root(settings: PacsSection, spool: Spool | None) -> Path:
    """Where series are assembled: beside the destination's spool, else in the spool folder's `local/`."""
    return (spool.dir if spool is not None else Path(settings.spool_dir) / "local") / "series"


class ResultWorker(Worker):
    """Makes the results of each classified instance waiting in the spool, oldest first, and queues them.
    They name the model of the records; `img_size` is the size the heat-map hook expects its frames at."""

    name = "pacs-results"

    def __init__(self, spool: Spool, img_size: int, hooks: ServerHooks | None = None,
                 on_queued: Callable[[], object] | None = None):
        super().__init__()
        self.spool, self.img_size = spool, img_size
        self.hooks = hooks or ServerHooks()
        self.on_queued = on_queued

    def step(self) -> None:
        for name in self.spool.jobs():
            if self.stopping:
                break
            self.make(name)
        return None

    def make(self, name: str) -> None:
        path, records = self.spool.job(name)
        try:
            ds = dcmread(path, stop_before_pixels=True)  # the header: the pixels are decoded a frame at a time
            model = ModelInfo(records[0]["model"], records[0]["version"])
            dicom = DicomFile(path)
            queued = int(self.spool.put(make_report(ds, records, model)))
            for record in records:  # one decoded frame and one capture in memory at a time
                frame = bounded(dicom.frame(record["frame"] or 1))
                heat = self.heat([frame], [record])
                queued += self.spool.put(make_capture(ds, record, frame, heat[0] if heat else None, model))
        except Exception as exc:  # noqa: BLE001 - one instance's failure must not stop the others
            LOG.exception("results of %s could not be made", records[0]["sop_instance_uid"])
            kept = self.spool.fail_job(name, f"{type(exc).__name__}: {exc}")
            LOG.error("instance kept in %s", kept)
            return
        self.spool.finish_job(name)
        LOG.info("instance %s: %d result(s) queued for %s", records[0]["sop_instance_uid"], queued,
                 self.spool.destination)
        if self.on_queued:
            self.on_queued()

    def heat(self, frames: list[np.ndarray], records: list[dict]) -> list[np.ndarray | None] | None:
        if self.hooks.heatmaps is None:
            return None
        try:
            grays = [resize_gray(Image.fromarray(frame), self.img_size) for frame in frames]  # as load_frames
            return list(self.hooks.heatmaps(grays, [r["class_index"] for r in records]))
        except Exception:  # noqa: BLE001 - without a heat map the prediction is still burned in
            LOG.exception("heat map failed for %s; the secondary capture shows the prediction alone",
                          records[0]["sop_instance_uid"])
            return None

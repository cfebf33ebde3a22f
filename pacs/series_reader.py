"""One result per series: once a series is complete, the series rule reads its slices' records and one SR, one Key
Object Selection and one secondary capture of its key slices go into the spool for the destination.

A series is complete when no instance has come for `pacs.series_stable_seconds` or, with `pacs.series_complete:
association`, when the sender released the association after its last instance. Its results are made once per set
of instances: a late instance makes revision 1 (then 2 ...), whose SR names the earlier one as its predecessor.
Result UIDs follow from (study, series, model version, revision), so results made again after a crash are known to
the spool and never sent twice; the audit row's id follows from them too (one row however often it is offered).
A series whose instances were classified by several model versions (a model update in the middle of it) is read by
the version in use, its older instances classified again.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

from data.images import read_dicom, resize_gray
from pacs.assembly import SeriesState
from pacs.capture import make_series_capture
from pacs.keyobjects import make_key_objects
from pacs.report import ModelInfo, SeriesOutput, make_series_report
from pacs.selection import too_few_slices
from pacs.spool import Spool
from pacs.worker import Worker
from series.rule import SeriesResult, SeriesRule, SliceCheck, read_series
from series.slices import group_series

LOG = logging.getLogger(__name__)
IDLE_CHECK_S = 600.0  # with no series open: how often old series are looked at for removal


def series_records(state: SeriesState) -> list[dict]:
    """The series' slice records in reading order (series.slices.group_series), each with its `slice_index`."""
    by_name, slices = {}, []
    for arrival in state.arrivals:
        for ref, record in zip(arrival.slices, arrival.records):
            by_name[ref.name] = record
            slices.append(ref)
    ordered = group_series(slices)[0].slices
    return [{**by_name[ref.name], "slice_index": i} for i, ref in enumerate(ordered)]


def read_records(records: list[dict], rule: SeriesRule) -> SeriesResult:
    """The series rule on slice records in reading order (each with `probabilities` and its `refer` flag)."""
    class_names = list(records[0]["probabilities"])
    probs = np.array([[r["probabilities"][c] for c in class_names] for r in records], dtype=np.float64)
    checks = [SliceCheck(refer=bool(r.get("refer")), reasons=tuple(r.get("refer_reasons") or ())) for r in records]
    return read_series(probs, class_names, rule, checks)


def event_id(output: SeriesOutput) -> str:
    return hashlib.sha256(output.uid("SR").encode()).hexdigest()[:32]


def series_event(state: SeriesState, result: SeriesResult, key: list[dict], output: SeriesOutput,
                 uids: dict[str, str]) -> dict:
    """What the audit row of a series result holds (ServerHooks.on_series)."""
    return {"id": event_id(output), "outcome": "amended" if output.revision else "read",
            "study_uid": state.study_uid, "series_uid": state.series_uid,
            "client": state.arrivals[-1].client, "revision": output.revision, "n_slices": result.n_slices,
            "model": output.model.name, "version": str(output.model.version), "reason": "; ".join(result.reasons),
            "result": {**result.as_dict(), "key_slice_refs": [(r["sop_instance_uid"], r["frame"]) for r in key],
                       "instances": state.instances, "result_uids": uids}}


class SeriesReader(Worker):
    """Reads each complete series in the store and queues its results (when there is a spool)."""

    name = "pacs-series"
    kick_ends_wait = True  # an arrival or a release may complete a series before the next scheduled look

    def __init__(self, pipeline, spool: Spool | None, rule: SeriesRule, on_queued: Callable[[], object] | None = None):
        super().__init__()
        self.pipeline, self.store, self.settings = pipeline, pipeline.store, pipeline.settings
        self.spool, self.rule, self.on_queued = spool, rule, on_queued
        self._settled: dict = {}  # series folder -> (its mtime, its last instance) while it has nothing to do
        self._retry_at: dict = {}  # series folder -> when to try again after its reading failed

    @property
    def hooks(self):
        return self.pipeline.hooks

    def complete_at(self, state: SeriesState) -> float:
        """When the series counts as complete (its last instance + the quiet period, or its release)."""
        if (self.settings.series_complete == "association" and state.released is not None
                and state.released >= state.last_arrival):
            return state.released
        return state.last_arrival + self.settings.series_stable_seconds

    def step(self) -> float | None:
        now, wait, keep_s = time.time(), IDLE_CHECK_S, self.settings.series_keep_hours * 3600
        for folder in self.store.folders():
            if self.stopping:
                break
            try:
                stamp = folder.stat().st_mtime_ns  # a new instance, release or skip changes it
            except OSError:
                continue
            settled = self._settled.get(folder)
            if settled and settled[0] == stamp and now - settled[1] <= keep_s:
                continue  # nothing new since it was last settled: not parsed again at every arrival elsewhere
            state = self.store.load(folder)
            if self.store.expire(state, keep_s, now):
                self._settled.pop(folder, None)
                continue
            if (state.skipped and not state.regrown) or not state.arrivals or (state.results and
                                                      state.results[-1]["instances"] == state.instances):
                if not (state.skipped or {}).get("reason", "").startswith("unreadable"):
                    self._settled[folder] = (stamp, max(state.last_arrival, (state.skipped or {}).get("time", 0.0)))
                continue
            due = max(self.complete_at(state), self._retry_at.get(folder, 0.0))
            if due > now:
                wait = min(wait, due - now)
                continue
            try:
                self.read(state)
                self._retry_at.pop(folder, None)
            except Exception:  # noqa: BLE001 - one series' failure must not stop the others
                LOG.exception("series %s could not be read; tried again in %.0f s", state.series_uid, IDLE_CHECK_S)
                self._retry_at[folder] = now + IDLE_CHECK_S
        return max(wait, 0.05)

    def current(self, state: SeriesState) -> ModelInfo:
        """The model that reads the series: the one in use; instances classified by another are classified again."""
        model = self.pipeline.in_use[1]
        for arrival in state.arrivals:
            if arrival.records[0]["version"] != str(model.version) or arrival.records[0]["model"] != model.name:
                path = state.instance_path(arrival.sop_instance_uid)
                calling_ae, _, peer = arrival.client.partition("@")
                arrival.records = self.pipeline.classify(path, dcmread(path), calling_ae, peer)
                self.store.update(state, arrival)
        return model

    def read(self, state: SeriesState) -> None:
        model = self.current(state)
        records = series_records(state)
        few = too_few_slices(len(records), self.settings.select)
        if few:
            self.pipeline.skip(state.header(records[0]["sop_instance_uid"]), few, state.arrivals[-1].client,
                               len(state.arrivals))
            return
        result = read_records(records, self.rule)
        key = [records[i] for i in result.key_slices]
        output = SeriesOutput(state.study_uid, state.series_uid, model, len(state.results))
        made = self.make(state, result, key, output)
        queued = sum(self.spool.put(ds) for ds in made) if self.spool is not None else 0
        uids = dict(zip(("SR", "KO", "SC"), (str(ds.SOPInstanceUID) for ds in made)))
        if self.hooks.on_series:
            self.hooks.on_series(series_event(state, result, key, output, uids))
        self.store.record_results(state, {"revision": output.revision, "instances": state.instances,
                                          "model": model.name, "version": str(model.version), "uids": uids,
                                          "result": result.as_dict(), "time": time.time()}, made[0])
        if state.skipped:  # it was too small before: read now, and amended like any other from here on
            self.store.unskip(state)
        LOG.info("series %s (%d slices): %s %.0f%%%s, revision %d, %d result(s) queued", state.series_uid,
                 result.n_slices, result.predicted_class, 100 * result.confidence, ", refer" if result.refer else "",
                 output.revision, queued)
        if queued and self.on_queued:
            self.on_queued()

    def make(self, state: SeriesState, result: SeriesResult, key: list[dict], output: SeriesOutput) -> list[Dataset]:
        """[SR, KOS, SC] of one series result."""
        headers = {r["sop_instance_uid"]: state.header(r["sop_instance_uid"]) for r in key}
        first = headers[key[0]["sop_instance_uid"]]
        frames = [read_dicom(state.instance_path(r["sop_instance_uid"]), r["frame"])[0] for r in key]
        report = make_series_report(list(headers.values()), result.as_dict(), key, output.model, output,
                                    state.previous_report())
        kos = make_key_objects(headers, key, result.as_dict(), output.model, output)
        capture = make_series_capture(first, key, frames, self.heat(frames, result.class_index), result.as_dict(),
                                      output.model, output)
        return [report, kos, capture]

    def heat(self, frames: list[np.ndarray], class_index: int) -> list[np.ndarray | None] | None:
        if self.hooks.heatmaps is None:
            return None
        try:
            size = self.pipeline.in_use[0].contract.img_size  # the size the heat-map hook's model expects
            grays = [resize_gray(Image.fromarray(frame), size) for frame in frames]  # as load_frames
            return list(self.hooks.heatmaps(grays, [class_index] * len(grays)))
        except Exception:  # noqa: BLE001 - without a heat map the series' reading is still burned in
            LOG.exception("heat map failed; the secondary capture shows the series' reading alone")
            return None

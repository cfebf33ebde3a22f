"""The review station inside one server process: cases in (page uploads, predictions made elsewhere), the refer
rule of the served version, and the pictures of the case view.

The DICOM receiver is handed `add_case` when serve.py builds the extensions, and puts each classified instance on
the worklist with it (from any thread); its refer flag
comes from the same rule (serving.service.Service.refer_rule), so the flag in its report and on the page is the
same.
"""
from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from core.config import ReviewSection
from core.fileio import atomic_file, atomic_write, private_dir
from data.images import frame_name, load_gray
from deploy.refer import Assessment, ReferRule
from deploy.registry import load_predictor
from review import worklist
from review.auth import reviewer_count
from review.cases import (
    CaseFiles,
    CaseOrigin,
    case_row,
    display_frame,
    item_rows,
    new_case_id,
    without_identity,
    write_case,
)
from review.intake import NO_TUMOUR, readable
from review.render import compare_heatmaps, heat_facts, heatmap_png, slice_png
from series.rule import SeriesRule
from serving.audit import Received, Stamp, prediction_entry
from serving.service import NotReady, RequestContext, Service
from serving.uploads import DecodedFile, Upload, UploadError, display_name, is_dicom_upload

log = logging.getLogger("review")


@dataclass
class Intake:
    """One uploaded file: the case it became, or why it could not."""
    filename: str
    case_id: str | None
    error: str | None = None
    refer: bool = False


class ReviewStation:
    def __init__(self, settings: ReviewSection, series_rule: SeriesRule | None = None, keep_identity: bool = False):
        self.settings = settings
        self.keep_identity = keep_identity  # pacs.keep_patient_identity: patient name and birth date may be shown
        self.series_rule = series_rule or SeriesRule()  # the config's series: section, as the API reads series
        self.files = CaseFiles(settings.store_dir)
        self.service: Service | None = None
        self._kept: dict[str, str] = {}  # case id -> kept file, between the pixel store hook and the case's row
        self._heat_pool = ThreadPoolExecutor(1, "review-heatmap")  # Grad-CAM uses every core: one at a time
        self._torch: dict[tuple[str, str], object] = {}
        self._torch_lock = threading.Lock()
        self._grids: dict[tuple[str, str], tuple[int, int]] = {}  # (model, version) -> its Grad-CAM resolution

    # ---- lifecycle (serving.app.Extension hooks) -------------------------------------------------------
    def attach(self, service: Service) -> None:
        private_dir(self.files.root)
        self.service = service
        where, n = f"http://{service.settings.host}:{service.settings.port}/", reviewer_count(self.engine)
        if n:
            log.info("review page at %s (%d reviewer(s) may log in)", where, n)
        else:  # a page nobody can log in to: say how to fix it where the user is looking
            log.warning("review page at %s, but no reviewer can log in yet: python serve.py add-reviewer NAME "
                        "(with this server's --database)", where)

    def close(self, service: Service | None = None) -> None:
        self._heat_pool.shutdown(wait=True, cancel_futures=True)

    @property
    def engine(self):
        return self.service.audit.engine

    # ---- the served version's facts ---------------------------------------------------------------------
    def model_facts(self, version: str | None = None) -> tuple[dict, dict, dict | None]:
        """(identity, contract as a dict, evaluation figures) of the served version; the evaluation only when
        `version` is that version (None otherwise: a case predicted by an older version gets no temperature)."""
        model = self.service.model if self.service else None
        if model is None:
            raise NotReady(self.service.failure if self.service else "loading")
        same = version is None or str(version) == model.version
        return model.identity(), model.predictor.contract.to_dict(), (model.evidence.get("evaluation") if same
                                                                      else None)

    def model_about(self) -> dict:
        """What the page says about the served model on every page: its classes (and whether one means "no
        tumour"), and whether it was trained on the synthetic demo data (its registry tag, or its model card)."""
        model = self.service.model if self.service else None
        if model is None:
            return {"classes": [], "no_tumour_class": False, "synthetic": False}
        classes = list(model.predictor.contract.class_names)
        card = (model.evidence or {}).get("model_card") or ""
        return {"classes": classes, "no_tumour_class": any(NO_TUMOUR.search(c) for c in classes),
                "synthetic": model.tags.get("demo_data") == "true" or "SYNTHETIC" in card}

    def rule(self, contract: dict, evaluation: dict | None) -> ReferRule:
        return ReferRule.for_version(contract, evaluation, self.settings)

    def current_rule(self) -> ReferRule:
        """The refer rule of the version served now (the page's, the DICOM receiver's and the worklist's)."""
        _, contract, evaluation = self.model_facts()
        return self.rule(contract, evaluation)

    # ---- cases in -----------------------------------------------------------------------------------------
    def keep_upload(self, decoded: DecodedFile, data: bytes, ctx: RequestContext) -> str | None:
        """serving's pixel store: keep the files uploaded on the review page (never the API's)."""
        if ctx.source != "review" or not ctx.case_id:
            return None
        dicom = is_dicom_upload(data, decoded.filename)
        if dicom and not self.service.options.cfg.pacs.keep_patient_identity:  # the receiver's rule, at this door too
            data = without_identity(data)
        ref = self.files.keep(ctx.case_id, data, dicom)
        self._kept[ctx.case_id] = ref
        return ref

    async def upload(self, uploads: list[Upload], reviewer: str, address: str | None) -> list[Intake]:
        """Each file becomes a case: predicted (and audited, with the browser's address) by the service, and
        judged by the refer rule."""
        batch = new_case_id()  # the files of one upload: a series of their own unless DICOM says otherwise
        return list(await asyncio.gather(*(self._upload_one(u, reviewer, address, batch) for u in uploads)))

    async def _upload_one(self, upload: Upload, reviewer: str, address: str | None, batch: str) -> Intake:
        case_id, name = new_case_id(), display_name(upload.filename)
        try:
            answer = await self.service.predict([upload], RequestContext(address, "review", case_id,
                                                                         time.perf_counter()))
        except UploadError as exc:
            return Intake(name, None, readable(exc.reason, name))
        finally:
            ref = self._kept.pop(case_id, None)
        if answer.status != 200 or ref is None:
            return Intake(name, None, readable(answer.body.get("detail", "not predicted"), name))
        identity = {k: answer.body[k] for k in ("model", "version", "alias", "flavor")}
        origin = CaseOrigin("review", reviewer, answer.records[0]["file"], identity, batch)
        refer = await asyncio.to_thread(self._enter, case_id, origin, ref, answer.records, answer.judged,
                                        answer.rows[0]["study_uid"])
        return Intake(name, case_id, None, refer)

    def _enter(self, case_id: str, origin: CaseOrigin, ref: str, records: list[dict], judged: list[Assessment],
               study_uid: str | None, audited: list[dict] = ()) -> bool:
        now = datetime.now(timezone.utc)
        write_case(self.engine, case_row(case_id, origin, ref, len(records), study_uid, now),
                   item_rows(case_id, records, judged, origin.model["version"], now), audited)
        return any(a.refer for a in judged)

    def add_case(self, data: bytes, received: Received, stamp: Stamp, predictions: list[dict],
                 grays: list[np.ndarray]) -> str:
        """Put predictions made elsewhere (the DICOM receiver's) on the worklist, blocking, from any thread: one per
        frame of the DICOM file `data` (deploy.predictors.prediction_record fields plus `frame` and `refer`), with
        `grays`, the frames as the model saw them. Their audit rows are written here, in the case's transaction.
        Returns the case id."""
        case_id = new_case_id()
        ref = self.files.keep(case_id, data, dicom=True)
        received = replace(received, case_id=case_id, pixels_ref=ref)
        entries = [prediction_entry(stamp, received, p, p.get("frame"), p.get("refer"), p.get("refer_reasons", ()))
                   for p in predictions]
        _, contract, evaluation = self.model_facts(stamp.model["version"])
        rule = self.rule(contract, evaluation)
        judged = [rule.assess(p, gray) for p, gray in zip(predictions, grays)]
        origin = CaseOrigin(received.source, received.client, received.filename, stamp.model)
        try:
            self._enter(case_id, origin, ref, [record for record, _ in entries], judged, received.uids.get("study_uid"),
                        [row for _, row in entries])
        except BaseException:
            self.files.path(ref).unlink(missing_ok=True)
            raise
        return case_id

    # ---- pictures -----------------------------------------------------------------------------------------
    def slice_png(self, ref: str, frame: int | None) -> bytes:
        return slice_png(display_frame(self.files.path(ref), frame))

    async def heatmap_png(self, prediction_id: str) -> bytes | None:
        """The Grad-CAM layer of one prediction, drawn by the version that made it (kept once drawn)."""
        path = self.files.heat_path(prediction_id)
        if path.is_file():
            return await asyncio.to_thread(path.read_bytes)
        facts = await asyncio.to_thread(worklist.heat_facts, self.engine, prediction_id)
        if facts is None or not facts["file_ref"]:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._heat_pool, self._draw_heatmap, facts, path)

    def _draw_heatmap(self, facts: dict, path: Path) -> bytes:
        source = self.files.path(facts["file_ref"])
        predictor = self._torch_predictor(facts["model"], str(facts["version"]))
        one = frame_name(source, facts["frame"]) if facts["frame"] else source  # only the frame it judged
        [cam] = predictor.cam_maps([load_gray(one, predictor.contract.img_size)], [facts["class_index"]])
        shown = display_frame(source, facts["frame"])
        data = heatmap_png(cam, (shown.shape[1], shown.shape[0]))
        about = heat_facts(cam, self._cam_grid(predictor, facts), predictor.contract.img_size, facts)
        atomic_write(private_dir(path.parent) / f"{path.stem}.json", lambda fh: json.dump(about, fh), "w", private=True)
        with atomic_file(path, private=True) as fh:  # the picture last: it says the facts are there
            fh.write(data)
        return data

    def _cam_grid(self, predictor, facts: dict) -> tuple[int, int]:
        key = (facts["model"], str(facts["version"]))
        if key not in self._grids:
            self._grids[key] = predictor.cam_grid()
        return self._grids[key]

    async def heatmap_facts(self, prediction_id: str) -> dict | None:
        """What the page says about a heat map: the feature map's resolution, and whether maps of other images
        drawn by the same version barely differ from it (then it says little about this image)."""
        if await self.heatmap_png(prediction_id) is None:
            return None
        return await asyncio.to_thread(compare_heatmaps, self.files.heat_path(prediction_id))

    def _torch_predictor(self, name: str, version: str):
        """The PyTorch flavor of the version that made a prediction: the served one's, or loaded from the
        registry once (a case predicted before a version change keeps its own model's heat map)."""
        model = self.service.model
        if model is not None and model.mv.name == name and model.version == version:
            return model.torch_predictor(self.service.client)
        with self._torch_lock:
            if (name, version) not in self._torch:
                mv = self.service.client.get_model_version(name, version)
                workdir = Path(tempfile.mkdtemp(prefix=f"review-v{version}-", dir=self.service.root))
                self._torch[(name, version)] = load_predictor(self.service.client, mv, workdir, "pytorch")[0]
            return self._torch[(name, version)]

"""The prediction service behind every entry point (the HTTP API, the review page, the DICOM receiver).

One model version is current. A request binds to it when it starts and is answered by it, even when a new
version is swapped in meanwhile (the old one is released once its last request is answered). Files are
decoded on a thread pool, their images join a micro-batch, and every prediction is committed to the audit
database before the answer is returned.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from core.fileio import process_temp_dir
from core.hardware import usable_cpus
from data.images import frame_name
from deploy.predictors import Outputs
from deploy.refer import Assessment, ReferRule
from deploy.registry import connect, resolve_version
from series.rule import SeriesRule
from serving.audit import AuditLog, AuditUnavailable, Received, Stamp, prediction_entry, series_results
from serving.batcher import MicroBatcher
from serving.guard import Admission
from serving.metrics import Metrics
from serving.model import ServedModel, load_served_model
from serving.options import ServeOptions
from serving.series_api import read_answer, series_audit_row, series_of, unzip
from serving.uploads import DecodedFile, Upload, UploadError, decode_upload

log = logging.getLogger("serving")


@dataclass
class RequestContext:
    """Who asked, through which door, for which case (the review page and the DICOM receiver set the last)."""
    client: str | None
    source: str = "api"
    case_id: str | None = None
    started: float | None = None  # perf_counter() when the request arrived


@dataclass
class Answer:
    status: int
    body: dict
    records: list[dict]
    judged: list[Assessment] = field(default_factory=list)  # the refer rule's verdict on each record
    rows: list[dict] = field(default_factory=list)          # the audit rows committed for them


SERVICE_PREFIX = "brain-mri-serve-"  # the folder of a server process's uploads and model files


class NotReady(Exception):
    """No model is loaded yet (or loading failed): 503 until one is."""


# A storage hook: (decoded file, its bytes, the request) -> a reference kept in the audit row, or None.
PixelStore = Callable[[DecodedFile, bytes, RequestContext], "str | None"]


class Service:
    def __init__(self, options: ServeOptions, audit: AuditLog, metrics: Metrics, pixel_store: PixelStore | None = None):
        self.options, self.cfg = options, options.cfg
        self.settings, self.spec = self.cfg.serving, options.spec
        self.audit, self.metrics, self.pixel_store = audit, metrics, pixel_store
        self.client = connect(self.cfg.monitoring.mlflow)
        self.root = process_temp_dir(SERVICE_PREFIX)  # 0700: uploads and model files
        (self.root / "uploads").mkdir()
        self.decode_pool = ThreadPoolExecutor(self.settings.decode_threads or usable_cpus(), "decode")
        self.model_pool = ThreadPoolExecutor(1, "model")      # one batch at a time: the runtime uses every core
        self.explain_pool = ThreadPoolExecutor(1, "gradcam")
        self.model: ServedModel | None = None
        self.failure: str | None = "loading"
        self.in_flight = self.decoding = 0
        self.seconds_per_image = 0.05  # running estimate for Retry-After
        self._reload_lock: asyncio.Lock | None = None
        self._watcher: asyncio.Task | None = None
        # called on the event loop with each version swapped in (the first included), e.g. by the DICOM receiver
        self.model_listeners: list[Callable[[ServedModel], object]] = []

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._reload_lock = asyncio.Lock()
        self._watcher = asyncio.get_running_loop().create_task(self._keep_current())

    async def stop(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.model and self.model.batcher:
            await self.model.batcher.close()
        for pool in (self.decode_pool, self.model_pool, self.explain_pool):
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.root, ignore_errors=True)

    async def _keep_current(self) -> None:
        """Load the model, then follow the alias: every poll_seconds, a new version is loaded and swapped in."""
        poll = self.settings.poll_seconds
        while True:
            try:
                await self.reload()
            except Exception as exc:  # the registry is unreachable or the version cannot load: keep serving
                self.failure = str(exc).splitlines()[0] if self.model is None else None
                log.error("cannot load %s: %s", self.spec.name, str(exc).splitlines()[0])
            if self.model is not None and (poll == 0 or self.spec.version is not None):
                return
            await asyncio.sleep(poll or 10.0)

    async def reload(self) -> tuple[dict, bool]:
        """(identity of the version now served, whether it changed): resolve the alias, load, warm up, swap."""
        async with self._reload_lock:
            mv = await asyncio.to_thread(resolve_version, self.client, self.spec.name, self.spec.alias,
                                         self.spec.version)
            if self.model is not None and str(mv.version) == self.model.version:
                return self.model.identity(), False
            new = await asyncio.to_thread(load_served_model, self.client, self.spec, mv, self.root / "models",
                                          self.cfg.monitoring.mlflow.tracking_uri, self.settings.max_batch)
            self._install(new)
            return new.identity(), True

    def refer_rule(self, model: ServedModel) -> ReferRule:
        """The refer rule of one version (review.refer_below, review.drift_limit, the version's own temperature and
        intensity reference): every door judges its predictions with it."""
        return ReferRule.for_version(model.predictor.contract.to_dict(), model.evidence.get("evaluation"),
                                     self.cfg.review)

    def _install(self, new: ServedModel) -> None:
        new.rule = self.refer_rule(new)
        new.batcher = MicroBatcher(new.predictor.infer, self.model_pool, self.settings.max_batch,
                                   self.settings.max_wait_ms / 1000, lambda: self.decoding, self._on_batch)
        old, self.model, self.failure = self.model, new, None
        self.metrics.set_model(new.identity(), old.identity() if old else None)
        for listener in self.model_listeners:
            try:
                listener(new)
            except Exception:  # a listener's failure is its own: the version is served all the same
                log.exception("a model listener failed on v%s", new.version)
        if old is not None:
            self.metrics.reloads.inc()
            log.info("now serving %s v%s (was v%s)", new.mv.name, new.version, old.version)
            old.retired = True
            if old.users == 0:
                asyncio.get_running_loop().create_task(self._release(old))

    async def _release(self, model: ServedModel) -> None:
        await model.batcher.close()
        await asyncio.to_thread(model.discard)

    @contextlib.contextmanager
    def _using(self):
        """The current version, held until the request is answered."""
        model = self.model
        if model is None:
            raise NotReady(self.failure or "loading")
        model.users += 1
        try:
            yield model
        finally:
            model.users -= 1
            if model.users == 0 and model.retired:
                asyncio.get_running_loop().create_task(self._release(model))

    def _on_batch(self, images: int, seconds: float) -> None:
        self.metrics.batch_size.observe(images)
        self.metrics.inference.observe(seconds)
        self.seconds_per_image = 0.9 * self.seconds_per_image + 0.1 * seconds / max(images, 1)

    # ---- admission (asked by serving.guard before the body is read) --------------------------------
    def admission(self) -> Admission:
        return Admission(self._enter, self._leave, lambda: self.in_flight * self.seconds_per_image,
                         lambda kind: self.metrics.errors.labels(kind).inc())

    def _enter(self) -> bool:
        if self.in_flight >= self.settings.queue_size:
            return False
        self.in_flight += 1
        self.metrics.in_flight.inc()
        return True

    def _leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()

    def status(self) -> dict:
        if self.model is None:
            return {"ready": False, "reason": self.failure or "loading"}
        return {"ready": True, **self.model.identity()}

    # ---- prediction --------------------------------------------------------------------------------
    def _decode(self, upload: Upload, model: ServedModel, ctx: RequestContext, keep: bool = False) -> DecodedFile:
        decoded = decode_upload(upload, model.predictor, self.root / "uploads", self.settings.max_images, keep,
                                int(self.settings.max_upload_mb * 2**20))
        decoded.pixels_ref = self.pixel_store(decoded, upload.data, ctx) if self.pixel_store else None
        return decoded

    async def _decode_all(self, uploads: list[Upload], model: ServedModel, ctx: RequestContext,
                          keep: bool = False) -> tuple[list[DecodedFile], list[UploadError]]:
        loop = asyncio.get_running_loop()
        self.decoding += 1
        try:
            results = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, self._decode, u, model, ctx, keep)
                                             for u in uploads), return_exceptions=True)
        finally:
            self.decoding -= 1
        for r in results:
            if not isinstance(r, (DecodedFile, UploadError)):
                raise r
        good = [r for r in results if isinstance(r, DecodedFile)]
        errors = [r for r in results if isinstance(r, UploadError)]
        for e in errors:
            self.metrics.errors.labels(e.kind).inc()
        n_images = sum(len(d.x) for d in good)
        if n_images > self.settings.max_images:
            self.metrics.errors.labels("too_many_images").inc()
            raise UploadError(413, "too_many_images", f"{n_images} images in one request, over the limit of "
                                                      f"{self.settings.max_images}")
        return good, errors

    async def predict(self, uploads: list[Upload], ctx: RequestContext) -> Answer:
        """Decode, batch, record, answer: 200 with a record per image (and any per-file errors), or the
        first file's 4xx when no file could be read."""
        started = ctx.started or time.perf_counter()
        request_id = uuid.uuid4().hex
        with self._using() as model:
            good, errors = await self._decode_all(uploads, model, ctx)
            head = {"request_id": request_id, **model.identity()}
            problems = [{"file": e.reason.split(": ", 1)[0], "error": e.reason, "status": e.status} for e in errors]
            if not good:
                return Answer(errors[0].status, {**head, "detail": errors[0].reason, "errors": problems}, [])
            out = await model.batcher.submit(np.concatenate([d.x for d in good]))
            answer = self._judge(good, out, model, ctx, request_id, started)
            await self._commit(answer.rows)
        # the contract (with its 256-bin intensity histogram) is GET /v1/model's: the answer names the version
        answer.body = {**head, "predictions": answer.records, "errors": problems}
        return answer

    def _judge(self, good: list[DecodedFile], out: Outputs, model: ServedModel, ctx: RequestContext,
               request_id: str, started: float) -> Answer:
        """The answer's records, the refer rule's verdicts and the audit rows, one per image."""
        stamp = Stamp(request_id, datetime.now(timezone.utc), (time.perf_counter() - started) * 1000,
                      model.identity())
        answer = Answer(200, {}, [])
        inputs = [(d, i) for d in good for i in d.inputs]
        for k, (d, i) in enumerate(inputs):
            prediction = model.predictor.record(d.filename, out, k)
            judged = model.rule.assess(prediction, i.gray)
            received = Received(ctx.source, ctx.client, d.filename, d.sha256, d.dicom, ctx.case_id, d.pixels_ref)
            record, row = prediction_entry(stamp, received, prediction, i.frame, judged.refer,
                                           judged.reason_texts)
            answer.records.append(record)
            answer.judged.append(judged)
            answer.rows.append(row)
            self.metrics.predictions.labels(record["predicted_class"]).inc()
        return answer

    async def predict_series(self, uploads: list[Upload], ctx: RequestContext) -> Answer:
        """The files of one series (parts or one zip): every slice predicted and audited as predict() does, then
        read by the series rule; the series row is committed before the answer (serving/series_api.py)."""
        uploads = unzip(uploads, self.settings.max_files, int(self.settings.max_upload_mb * 2**20) * 8)
        series, sop_of = series_of(uploads)
        answer = await self.predict(uploads, ctx)
        if answer.status != 200:
            return answer
        part, ordered = read_answer(answer.body, series, sop_of, SeriesRule.from_config(self.cfg.series))
        await self._commit([series_audit_row(part, answer.body, ctx.client)], series_results)
        body = {**{k: v for k, v in answer.body.items() if k != "predictions"}, "series": part, "predictions": ordered}
        return Answer(200, body, ordered)

    async def _commit(self, rows: list[dict], table=None) -> None:
        try:
            await self.audit.write(rows, table)
        except AuditUnavailable:
            self.metrics.errors.labels("audit_unavailable").inc()
            raise

    # ---- Grad-CAM ----------------------------------------------------------------------------------
    async def explain(self, upload: Upload, frame: int, ctx: RequestContext) -> tuple[bytes, dict]:
        """(PNG of the Grad-CAM overlay of the predicted class, the audited record) for one image or frame."""
        if importlib.util.find_spec("torch") is None:  # an ONNX-only install, such as the container image
            raise UploadError(501, "explain_unavailable", "Grad-CAM needs PyTorch, which this server does not have "
                              "(an ONNX-only install); /v1/predict answers without it")
        started = ctx.started or time.perf_counter()
        request_id = uuid.uuid4().hex
        with self._using() as model:
            good, errors = await self._decode_all([upload], model, ctx, keep=True)
            if errors:
                raise errors[0]
            d = good[0]
            try:
                frames = [i.frame or 1 for i in d.inputs]
                if frame not in frames:
                    raise UploadError(422, "bad_frame", f"{d.filename}: has {len(frames)} frame(s), no frame {frame}")
                d.inputs = [d.inputs[frames.index(frame)]]
                probs = await model.batcher.submit(d.x)
                answer = self._judge([d], probs, model, ctx, request_id, started)
                await self._commit(answer.rows)
                records = answer.records
                png = await asyncio.get_running_loop().run_in_executor(
                    self.explain_pool, self._gradcam, model, d, records[0]["class_index"])
            finally:
                d.path.unlink(missing_ok=True)
        return png, {"request_id": request_id, **model.identity(), **records[0]}

    def _gradcam(self, model: ServedModel, d: DecodedFile, class_index: int) -> bytes:
        torch_predictor = model.torch_predictor(self.client)
        name = frame_name(d.path, d.inputs[0].frame)
        with tempfile.TemporaryDirectory(dir=self.root) as out:
            [png] = torch_predictor.gradcam([name], [class_index], Path(out))
            return png.read_bytes()

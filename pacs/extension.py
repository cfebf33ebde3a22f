"""serve.py --dicom-port: the DICOM node inside the HTTP server, as a serving.app.Extension.

The node starts when the server's first model version is loaded and follows every version swapped in after it
(`node.use_model`): it classifies with the served model (the API's own ONNX session), draws Grad-CAM with the
same version's PyTorch flavor, records every frame in the server's audit database (source "dicom") and, with
--review, puts every instance on the worklist as a case (the `worklist` hook serve.py hands it), all before the
C-STORE is answered. Its refer flag is the service's rule (review.refer_below, review.drift_limit), the one the
page shows, and it goes into the SR. Each series result (and each series the selection rules leave out) gets its
row in the audit database's series_results table, once. The node runs in one process: with --workers > 1 the
server refuses to start.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select

from core.config import Config
from core.errors import UserError
from pacs.node import PacsNode, start_node
from pacs.pipeline import HeatMaps, ServerHooks
from pacs.report import ModelInfo
from pacs.spool import Spool
from series.rule import SeriesRule
from serving.app import Extension
from serving.audit import Received, Stamp, prediction_entry, series_results, series_row
from serving.model import ServedModel
from serving.service import Service

LOG = logging.getLogger(__name__)
# worklist(instance bytes, received, stamp, predictions, grays) -> case id: the review station's add_case
Worklist = Callable[[bytes, Received, Stamp, list[dict], list[np.ndarray]], str]


def dicom_extension(cfg: Config, worklist: Worklist | None = None) -> Extension:
    """The node of one server process; `worklist`: where each instance goes as a case (None: audit rows only)."""
    served = ServedNode(cfg, worklist)
    return Extension("dicom", on_startup=served.attach, on_shutdown=served.close, preflight=served.preflight)


def check_port(host: str, port: int) -> None:
    """Fail before the server starts when the DICOM port cannot be bound (in use, or not ours to take)."""
    if port == 0:
        return
    try:
        socket.create_server((host, port)).close()
    except OSError as exc:
        raise UserError(f"cannot listen for DICOM on {host}:{port} (--dicom-port, pacs.port): "
                        f"{exc.strerror or exc}") from None


def instance_bytes(ds: Dataset) -> bytes:
    """The received instance as a DICOM file (patient identity already removed unless kept on purpose)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class ServedNode:
    """The DICOM node of one server process, fed by the service's model swaps."""

    def __init__(self, cfg: Config, worklist: Worklist | None = None):
        self.cfg, self.settings, self.worklist = cfg, cfg.pacs, worklist
        self.service: Service | None = None
        self.node: PacsNode | None = None
        self.identities: dict[str, dict] = {}  # version -> the served identity (model, version, alias, flavor)

    def preflight(self) -> None:
        if self.cfg.serving.workers > 1:
            raise UserError(f"the DICOM receiver runs in one server process: --workers {self.cfg.serving.workers} "
                            "cannot be used with --dicom-port (run it with --workers 1, or in a second serve.py "
                            "--workers 1 on the same --database)")
        check_port(self.settings.host, self.settings.port)
        if self.settings.destination_peer is not None:  # another process sending from the same spool: refused now
            Spool(self.settings.spool_dir, self.settings.destination_peer).acquire().release()

    def attach(self, service: Service) -> None:
        self.service = service
        service.model_listeners.append(self.follow)
        if service.model is not None:
            self.follow(service.model)

    def follow(self, model: ServedModel) -> None:
        """A version was swapped in: the first one starts the node, the next ones classify the next instances."""
        self.identities[model.version] = model.identity()
        rule = self.service.refer_rule(model)
        info = ModelInfo(model.mv.name, model.version)
        if self.node is not None:
            self.node.use_model(model.predictor, info, self.heatmaps(model), rule)
            return
        hooks = ServerHooks(refer=rule, heatmaps=self.heatmaps(model), on_predictions=self.record,
                            on_series=self.record_series)
        self.node = start_node(self.settings, model.predictor, info, hooks, SeriesRule.from_config(self.cfg.series))
        where = f", results to {self.settings.destination}" if self.settings.destination else ", no destination"
        LOG.info("DICOM receiver %s on %s:%d%s", self.settings.ae_title, self.settings.host, self.node.port, where)

    async def close(self, service: Service | None = None) -> None:
        if self.node is not None:
            await asyncio.to_thread(self.node.stop)  # the results not sent yet stay in the spool
            self.node = None

    def heatmaps(self, model: ServedModel) -> HeatMaps:
        """Grad-CAM from the version's PyTorch flavor (loaded on first use), one at a time with the API's."""
        service = self.service

        def draw(grays: list[np.ndarray], classes: list[int]) -> list[np.ndarray]:
            torch_model = model.torch_predictor(service.client)
            return service.explain_pool.submit(torch_model.cam_maps, grays, classes).result()
        return draw

    def record(self, records: list[dict], ds: Dataset, calling_ae: str, peer: str, grays: list[np.ndarray]) -> None:
        """The receiver's on_predictions: the audit rows (and, with --review, the case on the worklist), committed
        before the sender gets its answer."""
        service, first, data = self.service, records[0], instance_bytes(ds)
        uids = {"study_uid": first["study_instance_uid"], "series_uid": first["series_instance_uid"],
                "sop_instance_uid": first["sop_instance_uid"]}
        sha256 = hashlib.sha256(data).hexdigest()
        received = Received("dicom", f"{calling_ae}@{peer}", first["sop_instance_uid"], sha256, uids)
        stamp = Stamp(uuid.uuid4().hex, datetime.now(timezone.utc), 0.0, self.identities[str(first["version"])])
        if self.worklist is not None:
            self.worklist(data, received, stamp, records, grays)
        else:
            service.audit.submit([prediction_entry(stamp, received, r, r["frame"], r["refer"], r["refer_reasons"])[1]
                                  for r in records]).result()
        for r in records:
            service.metrics.predictions.labels(r["predicted_class"]).inc()

    def record_series(self, event: dict) -> None:
        """The node's on_series: one series_results row per series result or skipped series; a result offered again
        after a crash (same id) is not written twice."""
        engine = self.service.audit.engine
        row_id = event.get("id") or uuid.uuid4().hex
        with engine.connect() as conn:
            if conn.execute(select(series_results.c.id).where(series_results.c.id == row_id)).first():
                return
        self.service.audit.submit([series_row(event, row_id, "dicom")], series_results).result()


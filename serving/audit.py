"""The audit database: every prediction the server answers is committed here first.

SQLAlchemy 2 on any database URL: sqlite (WAL, synchronous=FULL: a committed row survives a kill -9 and a
power cut) by default, PostgreSQL when several servers share one log. One writer thread commits the rows of
all requests waiting at that moment in one transaction (group commit), then releases their answers.

The schema has a version per component (`schema_versions`): serving owns `predictions`; the review page and
the DICOM receiver add their own tables and columns as migrations of their own components
(`migrate(engine, {"review": [...]})`), and a database newer than the code is refused.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError

from core.errors import UserError
from core.redaction import redact_text
from deploy.predictors import ANSWER_CHECKS

log = logging.getLogger("serving.audit")
metadata = MetaData()

schema_versions = Table(
    "schema_versions", metadata,
    Column("component", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

predictions = Table(
    "predictions", metadata,
    Column("id", String(32), primary_key=True),               # uuid4 hex: unique across servers
    Column("request_id", String(32), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("source", String(32), nullable=False),             # api | review | dicom
    Column("client", String(255)),                            # address (or AE title) that sent the image
    Column("case_id", String(64), index=True),                # the review page's case, when there is one
    Column("study_uid", String(64), index=True),              # DICOM Study/Series/SOP Instance UIDs
    Column("series_uid", String(64)),
    Column("sop_instance_uid", String(64), index=True),
    Column("frame", Integer),                                 # 1-based frame of a multi-frame file
    Column("filename", String(255)),                          # the upload's own name, as sent (never a path here)
    Column("input_sha256", String(64), nullable=False, index=True),
    Column("model_name", String(255), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("model_alias", String(255)),
    Column("flavor", String(32), nullable=False),
    Column("predicted_class", String(255), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("output_json", Text, nullable=False),              # the answer's record: probabilities, class index ...
    Column("latency_ms", Float, nullable=False),
    Column("pixels_ref", String(512)),                        # where a storage hook kept the upload (default none)
)

# One row per series result (series/rule.read_series) and per series the DICOM node leaves out; its slices' own
# rows are in `predictions` (same study and series UIDs).
series_results = Table(
    "series_results", metadata,
    Column("id", String(32), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("source", String(32), nullable=False),             # api | dicom
    Column("client", String(255)),
    Column("study_uid", String(64), index=True),
    Column("series_uid", String(64), index=True),
    Column("outcome", String(16), nullable=False),            # read | amended (late instances) | skipped
    Column("revision", Integer),                              # 0 first, then 1, 2 ... (amended results)
    Column("n_slices", Integer),
    Column("model_name", String(255)),
    Column("model_version", String(32)),
    Column("predicted_class", String(255)),                   # none for a skipped series
    Column("confidence", Float),
    Column("refer", Boolean),
    Column("reason", Text),                                   # why it was skipped, or why it is referred
    Column("output_json", Text, nullable=False),              # the series result, its key slices, result UIDs
)


@dataclass(frozen=True)
class Received:
    """One file as a door of the server received it."""
    source: str                 # api | review | dicom
    client: str | None          # the sender's address (a DICOM peer: AE title@address)
    filename: str               # the upload's own name (a DICOM instance: its SOP Instance UID); never a path
    sha256: str                 # of the bytes received
    uids: dict = field(default_factory=dict)  # study_uid, series_uid, sop_instance_uid, those the file has
    case_id: str | None = None  # the review page's case
    pixels_ref: str | None = None  # where a storage hook kept the file


@dataclass(frozen=True)
class Stamp:
    """What the predictions of one request share: its id, its time, how long it took, the model that answered
    (serving.model.ServedModel.identity())."""
    request_id: str
    created_at: datetime
    latency_ms: float
    model: dict


ANSWERED = ("predicted_class", "class_index", "confidence", "probabilities")  # of deploy.predictors.prediction_record


def prediction_entry(stamp: Stamp, received: Received, prediction: dict, frame: int | None,
                     refer: bool | None, reasons: Sequence[str] = ()) -> tuple[dict, dict]:
    """(the answer's record, the audit row) of one image, whichever door it came in by: the one place the
    `predictions` columns are filled. `prediction`: deploy.predictors.Predictor.record's fields (the answer checks
    when the model has them); `frame`: 1-based, None for a single image; `refer` and `reasons`: the refer rule's
    flag and why (deploy.refer)."""
    record = {"record_id": uuid.uuid4().hex, "file": received.filename, "frame": frame, "sha256": received.sha256,
              **{k: prediction[k] for k in ANSWERED}, **{k: prediction.get(k) for k in ANSWER_CHECKS},
              "refer": refer, "refer_reasons": list(reasons)}
    model, uids = stamp.model, received.uids
    row = {"id": record["record_id"], "request_id": stamp.request_id, "created_at": stamp.created_at,
           "source": received.source, "client": received.client, "case_id": received.case_id,
           "study_uid": uids.get("study_uid"), "series_uid": uids.get("series_uid"),
           "sop_instance_uid": uids.get("sop_instance_uid"), "frame": frame, "filename": received.filename,
           "input_sha256": received.sha256, "model_name": model["model"], "model_version": str(model["version"]),
           "model_alias": model.get("alias"), "flavor": model["flavor"], "predicted_class": record["predicted_class"],
           "confidence": float(record["confidence"]),
           "output_json": json.dumps({**record, "medical_validation": model.get("medical_validation"),
                                      "forced": model.get("forced")}),
           "latency_ms": stamp.latency_ms, "pixels_ref": received.pixels_ref}
    return record, row


@dataclass(frozen=True)
class Migration:
    version: int
    describe: str
    apply: Callable[[Connection], None]


SERVING_MIGRATIONS = (Migration(1, "predictions", lambda conn: predictions.create(conn, checkfirst=True)),
                      Migration(2, "series_results", lambda conn: series_results.create(conn, checkfirst=True)))


def _sqlite_pragmas(fsync: bool):
    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        # FULL: the WAL is fsynced at each commit (a power cut loses nothing acknowledged); NORMAL: the commit
        # is in the OS's hands (a killed process loses nothing, a power cut may lose the last commits)
        cursor.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        cursor.execute("PRAGMA busy_timeout=30000")  # several worker processes share the file
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
    return on_connect


def make_engine(url: str, fsync: bool = True) -> Engine:
    """An engine on the audit database; a sqlite file is created readable by its owner only."""
    try:
        parsed = make_url(url)
    except Exception:
        raise UserError(f"serving.database_url {redact_text(url)!r} is not a database URL "
                        "(e.g. sqlite:///audit.db)") from None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise UserError("the audit database must be a file (sqlite:///audit.db), not in memory")
        path = Path(parsed.database)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))  # file names and UIDs are patient data
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas(fsync))
        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except Exception as exc:  # e.g. a PostgreSQL URL without its driver installed
        raise UserError(f"cannot open the audit database: {type(exc).__name__}: {exc}") from None


def migrate(engine: Engine, components: dict[str, Iterable[Migration]] | None = None) -> dict[str, int]:
    """Bring each component's tables to its latest version; returns {component: version}."""
    wanted = {"serving": SERVING_MIGRATIONS, **(components or {})}
    try:
        with engine.begin() as conn:
            schema_versions.create(conn, checkfirst=True)
        return {name: _migrate_component(engine, name, tuple(steps)) for name, steps in wanted.items()}
    except SQLAlchemyError as exc:
        raise UserError(f"audit database {engine.url.render_as_string(hide_password=True)}: "
                        f"{str(exc).splitlines()[0]}") from None


def _migrate_component(engine: Engine, component: str, steps: tuple[Migration, ...]) -> int:
    latest = max(step.version for step in steps)
    with engine.begin() as conn:
        current = conn.execute(select(schema_versions.c.version)
                               .where(schema_versions.c.component == component)).scalar()
        if current is not None and current > latest:
            raise UserError(f"the audit database holds {component} schema v{current}, newer than this toolkit's "
                            f"v{latest}: upgrade the toolkit")
        for step in sorted(steps, key=lambda s: s.version):
            if step.version > (current or 0):
                log.info("audit database: %s v%d (%s)", component, step.version, step.describe)
                step.apply(conn)
        row = {"version": latest, "applied_at": datetime.now(timezone.utc)}
        if current is None:
            conn.execute(insert(schema_versions).values(component=component, **row))
        elif current < latest:
            conn.execute(update(schema_versions).where(schema_versions.c.component == component).values(**row))
    return latest


# What GET /v1/predictions may filter on: the query parameter -> its column.
FILTERS = {"study_uid": predictions.c.study_uid, "series_uid": predictions.c.series_uid,
           "sop_instance_uid": predictions.c.sop_instance_uid, "case_id": predictions.c.case_id}


def as_utc(stamp: datetime) -> datetime:
    """A stored time in UTC: sqlite gives back the UTC time it was given without its offset, PostgreSQL with it."""
    return stamp.replace(tzinfo=timezone.utc) if stamp.tzinfo is None else stamp.astimezone(timezone.utc)


def find_predictions(engine: Engine, filters: dict[str, str], limit: int = 1000) -> list[dict]:
    """The recorded predictions matching every filter (FILTERS keys), oldest first, as the API answers them:
    the row's facts and the record's probabilities (and refer flag, when the source set one)."""
    query = select(predictions)
    for key, value in filters.items():
        query = query.where(FILTERS[key] == value)
    query = query.order_by(predictions.c.created_at, predictions.c.sop_instance_uid, predictions.c.frame)
    with engine.connect() as conn:
        rows = conn.execute(query.limit(limit)).mappings().all()
    out = []
    for row in rows:
        record = json.loads(row["output_json"])
        out.append({"record_id": row["id"], "request_id": row["request_id"],
                    "created_at": as_utc(row["created_at"]).isoformat(),
                    "source": row["source"], "client": row["client"], "case_id": row["case_id"],
                    "study_uid": row["study_uid"], "series_uid": row["series_uid"],
                    "sop_instance_uid": row["sop_instance_uid"], "frame": row["frame"], "filename": row["filename"],
                    "sha256": row["input_sha256"], "model": row["model_name"], "version": row["model_version"],
                    "alias": row["model_alias"], "flavor": row["flavor"], "predicted_class": row["predicted_class"],
                    "class_index": record.get("class_index"), "confidence": row["confidence"],
                    "probabilities": record.get("probabilities"), "refer": record.get("refer")})
    return out


def find_series(engine: Engine, filters: dict[str, str], limit: int = 1000) -> list[dict]:
    """The recorded series results (and skipped series) matching every filter (study_uid, series_uid), oldest
    first: the row's facts and the stored result."""
    query = select(series_results)
    for key, value in filters.items():
        query = query.where(series_results.c[key] == value)
    query = query.order_by(series_results.c.created_at, series_results.c.revision)
    with engine.connect() as conn:
        rows = conn.execute(query.limit(limit)).mappings().all()
    return [{"record_id": row["id"], "created_at": as_utc(row["created_at"]).isoformat(),
             **{k: row[k] for k in ("source", "client", "study_uid", "series_uid", "outcome", "revision", "n_slices",
                                    "reason")},
             "model": row["model_name"], "version": row["model_version"], "refer": row["refer"],
             "result": json.loads(row["output_json"])} for row in rows]


def series_row(event: dict, row_id: str, source: str) -> dict:
    """A series_results row from a series event: the API's, or the DICOM node's (pacs.series_reader.series_event, or
    a skipped series)."""
    result = event.get("result") or {}
    return {"id": row_id, "created_at": datetime.now(timezone.utc), "source": source, "client": event.get("client"),
            "study_uid": event["study_uid"], "series_uid": event["series_uid"], "outcome": event["outcome"],
            "revision": event.get("revision"), "n_slices": event.get("n_slices"), "model_name": event.get("model"),
            "model_version": event.get("version"), "predicted_class": result.get("predicted_class"),
            "confidence": result.get("confidence"), "refer": result.get("refer"), "reason": event.get("reason"),
            "output_json": json.dumps(result, default=str)}


class AuditUnavailable(Exception):
    """The record could not be committed: the answer must not be sent as a success."""


class AuditLog:
    """Group commit on one writer thread: `await write(rows)` returns once the rows are committed."""

    def __init__(self, engine: Engine, table: Table = predictions, max_rows: int = 512):  # table: the default
        self.engine, self.table, self.max_rows = engine, table, max_rows
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def submit(self, rows: list[dict], table: Table | None = None) -> concurrent.futures.Future:
        """Queue rows (of `table`, default the log's own) for the next commit; the future resolves when they are
        on disk (from any thread)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(([(table if table is not None else self.table, row) for row in rows], future))
        return future

    async def write(self, rows: list[dict], table: Table | None = None) -> None:
        await asyncio.wrap_future(self.submit(rows, table))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            pending, stop = [first], False
            while sum(len(rows) for rows, _ in pending) < self.max_rows:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                pending.append(item)
            self._commit(pending)
            if stop:
                return

    def _commit(self, pending: list) -> None:
        try:
            by_table: dict[Table, list[dict]] = {}
            for batch, _ in pending:
                for table, row in batch:  # an executemany compiles from the first row's keys: give them all
                    by_table.setdefault(table, []).append({c.name: row.get(c.name) for c in table.columns})
            with self.engine.begin() as conn:  # one transaction: a series row never lands without its slices'
                for table, rows in by_table.items():
                    conn.execute(insert(table), rows)
        except Exception as exc:  # the database is down or full: no answer may claim a record
            log.error("audit database write failed: %s", str(exc).splitlines()[0])
            for _, future in pending:
                future.set_exception(AuditUnavailable(f"audit database unavailable ({type(exc).__name__})"))
            return
        for _, future in pending:
            future.set_result(None)

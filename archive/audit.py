"""An archive run in the audit database: one `archive_runs` row per run (who, when, which model, how many rows,
the output's hash), and on request one `predictions` row per scored slice (source "archive")."""
from __future__ import annotations

import getpass
import json
import socket
from dataclasses import asdict, dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Column, DateTime, Engine, Integer, String, Table, Text, insert

from serving.audit import Migration, Received, Stamp, metadata, prediction_entry, predictions

archive_runs = Table(
    "archive_runs", metadata,
    Column("id", String(32), primary_key=True),                # the run id, also in every row of the output
    Column("started_at", DateTime(timezone=True), nullable=False, index=True),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("user", String(255), nullable=False),
    Column("host", String(255), nullable=False),
    Column("model_name", String(255), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("model_alias", String(255)),
    Column("flavor", String(32), nullable=False),
    Column("inputs", Text, nullable=False),                    # JSON: the roots and manifest as given
    Column("output", Text, nullable=False),                    # the output folder
    Column("files", Integer, nullable=False),                  # files listed
    Column("files_skipped", Integer, nullable=False),          # already in the output for this model version
    Column("rows", Integer, nullable=False),                   # rows this run added
    Column("errors", Integer, nullable=False),                 # of which files that could not be read
    Column("output_sha256", String(64), nullable=False),       # archive.table.ArchiveOutput.digest after the run
    Column("engine", String(255), nullable=False),             # e.g. "ray 2.60.0, local, 2 CPUs"
)

MIGRATIONS = {"archive": (Migration(1, "archive_runs", lambda conn: archive_runs.create(conn, checkfirst=True)),)}


@dataclass
class RunRecord:
    id: str
    started_at: datetime
    finished_at: datetime
    model_name: str
    model_version: str
    model_alias: str | None
    flavor: str
    inputs: str
    output: str
    files: int
    files_skipped: int
    rows: int
    errors: int
    output_sha256: str
    engine: str


def record_run(engine: Engine, run: RunRecord) -> None:
    """The run's one record, committed (it survives a kill -9 once this returns)."""
    row = asdict(run) | {"user": getpass.getuser(), "host": socket.gethostname()}
    with engine.begin() as conn:
        conn.execute(insert(archive_runs).values(**row))


def record_predictions(engine: Engine, rows: pa.Table, alias: str | None) -> int:
    """One `predictions` row per scored slice of a run's output rows (error rows have no prediction); the count."""
    out = []
    for r in rows.filter(pc.is_null(rows["error"])).to_pylist():
        if r["kind"] != "image":
            continue
        model = {"model": r["model_name"], "version": r["model_version"], "alias": alias, "flavor": r["flavor"]}
        stamp = Stamp(r["run_id"], r["scored_at"], 0.0, model)  # batch scoring: no request to time
        uids = {k: r[k] for k in ("study_uid", "series_uid", "sop_instance_uid")}
        # the table keeps names, never paths
        received = Received("archive", None, r["path"].rsplit("/", 1)[-1][:255], r["sha256"], uids)
        prediction = {"predicted_class": r["predicted_class"], "class_index": r["class_index"],
                      "confidence": r["confidence"], "probabilities": json.loads(r["probabilities"]),
                      "ood_distance": r["ood_distance"], "out_of_distribution": r["out_of_distribution"],
                      "prediction_set": None if r["prediction_set"] is None else json.loads(r["prediction_set"])}
        reasons = r["refer_reasons"].split("; ") if r["refer_reasons"] else []
        out.append(prediction_entry(stamp, received, prediction, r["frame"], r["refer"], reasons)[1])
    if out:
        with engine.begin() as conn:
            conn.execute(insert(predictions), out)
    return len(out)

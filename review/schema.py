"""The review station's tables, in the audit database beside serving's `predictions` (component "review").

A verdict is a row that is never changed: a reviewer who changes their mind adds a row, and the latest row of a
prediction is its current verdict (on sqlite and PostgreSQL a trigger refuses UPDATE and DELETE on the table).
"""
from __future__ import annotations

from sqlalchemy import Boolean, Column, DateTime, Float, ForeignKey, Integer, String, Table, Text, inspect, text
from sqlalchemy.engine import Connection

from serving.audit import Migration, metadata

reviewers = Table(
    "reviewers", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),       # argon2id
    Column("created_at", DateTime(timezone=True), nullable=False),
)

sessions = Table(
    "review_sessions", metadata,
    Column("token_sha256", String(64), primary_key=True),      # the cookie's token is never stored itself
    Column("reviewer_id", Integer, ForeignKey("reviewers.id"), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
)

cases = Table(
    "review_cases", metadata,
    Column("id", String(32), primary_key=True),                # random hex: never derived from a name
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("source", String(32), nullable=False),              # review (an upload on the page) | dicom | ...
    Column("client", String(255)),                             # who sent it: a reviewer, an AE title
    Column("filename", String(255)),                           # the upload's own name, shown escaped
    Column("file_ref", String(64)),                            # the kept file in review.store_dir
    Column("frames", Integer, nullable=False),
    Column("study_uid", String(64)),
    Column("batch", String(32), index=True),                   # the upload it came in (its files form a series)
)

items = Table(  # one per prediction on the worklist (a frame of a case), with what the page showed
    "review_items", metadata,
    Column("prediction_id", String(32), ForeignKey("predictions.id"), primary_key=True),
    Column("case_id", String(32), ForeignKey("review_cases.id"), nullable=False, index=True),
    Column("frame", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("predicted_class", String(255), nullable=False),
    Column("probabilities_json", Text, nullable=False),        # as shown: calibrated when `temperature` is set
    Column("temperature", Float),
    Column("confidence", Float, nullable=False, index=True),   # the top shown probability
    Column("refer", Boolean, nullable=False, index=True),
    Column("reasons_json", Text, nullable=False),
    Column("drift_distance", Float),                           # None: the model has no intensity reference
    Column("drift_limit", Float),
    Column("model_version", String(32), nullable=False),
)

verdicts = Table(
    "review_verdicts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # the order verdicts were given in
    Column("prediction_id", String(32), ForeignKey("predictions.id"), nullable=False, index=True),
    Column("case_id", String(32), ForeignKey("review_cases.id"), nullable=False, index=True),
    Column("reviewer_id", Integer, ForeignKey("reviewers.id"), nullable=False),
    Column("reviewer", String(64), nullable=False),
    Column("agrees", Boolean, nullable=False),
    Column("predicted_class", String(255), nullable=False),
    Column("reviewer_class", String(255), nullable=False),     # the class the reviewer says it is
    Column("note", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    # None: reviewer_class is one of the model's classes; else what the reader found that is not a class
    # (review.verdicts.FINDINGS: no tumour / normal, non-diagnostic, other, a confirmed referral)
    Column("finding", String(32)),
)

withdrawn = Table(  # a verdict undone by its reviewer within review.undo_seconds: the one before it is current again
    "review_withdrawn", metadata,
    Column("verdict_id", Integer, ForeignKey("review_verdicts.id"), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

flags = Table(  # the slices a reader flagged while giving a verdict (recorded with it, never changed)
    "review_flags", metadata,
    Column("verdict_id", Integer, ForeignKey("review_verdicts.id"), primary_key=True),
    Column("prediction_id", String(32), ForeignKey("predictions.id"), primary_key=True),
)

login_failures = Table(  # every refused login, for the site's audit (the access log alone saw them)
    "review_login_failures", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("name", String(64), nullable=False),                 # as typed, cut to 64 characters
    Column("client", String(255)),
    Column("throttled", Boolean, nullable=False),               # refused unchecked: too many failures just before
)

TABLES = (reviewers, sessions, cases, items, verdicts, withdrawn, flags)


def _create(conn: Connection) -> None:
    metadata.create_all(conn, tables=list(TABLES), checkfirst=True)
    if conn.dialect.name == "sqlite":  # a verdict, once committed, stays as it was
        for action in ("UPDATE", "DELETE"):
            conn.execute(text(f"CREATE TRIGGER IF NOT EXISTS review_verdicts_no_{action.lower()} BEFORE {action} "
                              "ON review_verdicts BEGIN SELECT RAISE(ABORT, 'verdicts are never changed: "
                              "record a new one'); END"))


def _reading(conn: Connection) -> None:
    """Findings that are not a class, undone verdicts, flagged slices and upload batches (on a database made
    before them)."""
    if "finding" not in {c["name"] for c in inspect(conn).get_columns("review_verdicts")}:
        conn.execute(text("ALTER TABLE review_verdicts ADD COLUMN finding VARCHAR(32)"))
    if "batch" not in {c["name"] for c in inspect(conn).get_columns("review_cases")}:
        conn.execute(text("ALTER TABLE review_cases ADD COLUMN batch VARCHAR(32)"))
    metadata.create_all(conn, tables=[withdrawn, flags], checkfirst=True)


def _freeze_verdicts_on_postgresql(conn: Connection) -> None:
    """PostgreSQL refuses UPDATE and DELETE on verdicts as sqlite's triggers do (v1 made those)."""
    if conn.dialect.name != "postgresql":
        return
    conn.execute(text("CREATE OR REPLACE FUNCTION review_verdicts_never_change() RETURNS trigger LANGUAGE plpgsql "
                      "AS $$ BEGIN RAISE EXCEPTION 'verdicts are never changed: record a new one'; END $$"))
    conn.execute(text("CREATE TRIGGER review_verdicts_no_change BEFORE UPDATE OR DELETE ON review_verdicts "
                      "FOR EACH ROW EXECUTE FUNCTION review_verdicts_never_change()"))


MIGRATIONS = {"review": (Migration(1, "reviewers, sessions, cases, worklist items, verdicts", _create),
                         Migration(2, "verdicts never change on PostgreSQL too", _freeze_verdicts_on_postgresql)),
              "review_reading": (Migration(1, "verdict findings, undone verdicts, flagged slices, upload batches",
                                           _reading),),
              "review_logins": (Migration(1, "failed logins", lambda conn: metadata.create_all(
                  conn, tables=[login_failures], checkfirst=True)),)}

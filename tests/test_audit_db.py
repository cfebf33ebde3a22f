"""The audit database on sqlite and on a real PostgreSQL (a throwaway server on loopback, tests/postgres_server.py):
versioned migrations that keep old rows, group commit from many threads, the review station's verdicts that never
change, the archive's run records, and serve.py with two workers writing one PostgreSQL through a URL with a user
and password, killed with kill -9 under load."""
from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from postgres_server import PASSWORD, PostgresServer
from server_process import ServerProcess
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import DBAPIError

from core.errors import UserError
from serving.audit import AuditLog, Migration, find_predictions, make_engine, migrate, predictions
from tests.slowest import slow_setup

MODEL = "brain-cancer-resnet18"


@pytest.fixture(scope="module")
@slow_setup("initdb and pg_ctl start a throwaway PostgreSQL cluster")
def postgres():
    pytest.importorskip("psycopg", reason="PostgreSQL's driver: pip install -r requirements.txt")
    try:
        server = PostgresServer().start()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def prediction_row(**overrides) -> dict:
    row = {"id": uuid.uuid4().hex, "request_id": uuid.uuid4().hex, "created_at": datetime.now(timezone.utc),
           "source": "api", "client": "127.0.0.1", "filename": "scan.jpg", "input_sha256": "ab" * 32,
           "model_name": MODEL, "model_version": "1", "model_alias": "staging", "flavor": "onnx",
           "predicted_class": "glioma", "confidence": 0.9, "latency_ms": 12.5,
           "output_json": '{"class_index": 0, "probabilities": {"glioma": 0.9, "meningioma": 0.05, "pituitary": 0.05}}'}
    return row | overrides


def test_an_upgrade_keeps_old_rows_and_a_newer_database_is_refused(engine):
    v1 = Migration(1, "probe table", lambda conn: conn.execute(text("CREATE TABLE probe (id INTEGER, name TEXT)")))
    v2 = Migration(2, "probe.note", lambda conn: conn.execute(text("ALTER TABLE probe ADD COLUMN note TEXT")))
    assert migrate(engine, {"probe": [v1]}) == {"serving": 2, "probe": 1}
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO probe (id, name) VALUES (1, 'old row')"))
        conn.execute(predictions.insert(), [prediction_row()])
    assert migrate(engine, {"probe": [v1, v2]}) == {"serving": 2, "probe": 2}
    assert migrate(engine, {"probe": [v1, v2]}) == {"serving": 2, "probe": 2}  # applied once
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id, name, note FROM probe")).all() == [(1, "old row", None)]
        assert conn.execute(select(func.count()).select_from(predictions)).scalar() == 1
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_versions SET version = 7 WHERE component = 'serving'"))
    with pytest.raises(UserError, match="serving schema v7, newer than this toolkit"):
        migrate(engine)


def test_group_commit_from_many_threads_and_the_query_filters(engine):
    migrate(engine)
    log = AuditLog(engine)
    start = datetime.now(timezone.utc)
    try:
        def write(k: int) -> None:
            rows = [prediction_row(study_uid=f"1.2.{k % 3}", frame=f, created_at=start + timedelta(seconds=k))
                    for f in (1, 2)]
            log.submit(rows).result(timeout=60)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(write, range(60)))
    finally:
        log.close()
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(predictions)).scalar() == 120
    found = find_predictions(engine, {"study_uid": "1.2.1"})
    assert len(found) == 40 and {r["study_uid"] for r in found} == {"1.2.1"}
    times = [datetime.fromisoformat(r["created_at"]) for r in found]
    assert times == sorted(times) and times[0] == start + timedelta(seconds=1)  # oldest first, to the microsecond
    assert found[0]["probabilities"]["glioma"] == 0.9


def test_review_verdicts_are_new_rows_and_never_change(engine):
    from review.auth import add_reviewer, log_in, reviewer_for
    from review.schema import MIGRATIONS
    from review.worklist import Query, Verdict, counts, list_items, record_verdict

    assert migrate(engine, MIGRATIONS)["review"] == 2
    assert add_reviewer(engine, "alice", "a long enough password")
    reviewer = reviewer_for(engine, log_in(engine, "alice", "a long enough password", 8))
    now = datetime.now(timezone.utc)
    pred = prediction_row(case_id="c1")
    with engine.begin() as conn:
        conn.execute(predictions.insert(), [pred])
        conn.execute(text("INSERT INTO review_cases (id, created_at, source, frames) VALUES ('c1', :t, 'api', 1)"),
                     {"t": now})
        conn.execute(text("INSERT INTO review_items (prediction_id, case_id, created_at, predicted_class, "
                          "probabilities_json, confidence, refer, reasons_json, model_version) VALUES "
                          "(:p, 'c1', :t, 'glioma', :probs, 0.9, false, '{}', '1')"),
                     {"p": pred["id"], "t": now, "probs": '{"glioma": 0.9, "meningioma": 0.05, "pituitary": 0.05}'})
    assert counts(engine)["pending"] == 1
    record_verdict(engine, Verdict(pred["id"], True, None), reviewer.id, reviewer.name)
    record_verdict(engine, Verdict(pred["id"], False, "meningioma", "second look"), reviewer.id, reviewer.name)
    [item] = list_items(engine, Query(status="reviewed"))
    assert (item["agrees"], item["reviewer_class"]) == (False, "meningioma")  # the latest verdict counts
    for statement in ("UPDATE review_verdicts SET reviewer_class = 'glioma'", "DELETE FROM review_verdicts"):
        with pytest.raises(DBAPIError, match="never changed"), engine.begin() as conn:
            conn.execute(text(statement))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM review_verdicts")).scalar() == 2


def test_an_archive_run_is_one_record(engine):
    from archive.audit import MIGRATIONS, RunRecord, archive_runs, record_run

    migrate(engine, MIGRATIONS)
    now = datetime.now(timezone.utc)
    run = RunRecord(uuid.uuid4().hex, now, now + timedelta(minutes=3), MODEL, "2", "production", "onnx",
                    '{"roots": ["/archive"]}', "/out/preds.parquet", 1000, 10, 1003, 2, "cd" * 32, "ray 2.60.0, local")
    record_run(engine, run)
    with engine.connect() as conn:
        [row] = conn.execute(select(archive_runs)).mappings().all()
    assert (row["files"], row["rows"], row["output_sha256"], row["user"]) == (1000, 1003, "cd" * 32, row["user"])
    assert row["user"] and row["host"] and row["finished_at"] - row["started_at"] == timedelta(minutes=3)


# ---- serve.py on PostgreSQL -------------------------------------------------------------------------------------

def test_the_server_processes_get_the_url_with_its_password_and_errors_do_not_show_it():
    import serve

    url = "postgresql+psycopg://mri:s3cret%40pw@db.hospital.example:5432/audit"
    args = serve.get_args_parser().parse_args(["--model", MODEL, "--database", url])
    options = serve.options_from_args(args)
    assert options.cfg.serving.database_url == url  # what each worker connects with
    with pytest.raises(UserError) as bad:
        make_engine("postgresql+psycopg://mri:s3cret@db:port/audit")
    assert "s3cret" not in str(bad.value) and "***@db:port" in str(bad.value)


def test_two_workers_write_one_postgresql_with_credentials_in_the_url_and_kill_9_loses_nothing(
        registered, tiny_data, postgres, tmp_path):
    url = postgres.new_database()
    jpegs = [p.read_bytes() for p in sorted(tiny_data.rglob("*.jpg"))[:6]]
    srv = ServerProcess([*registered, "--model", MODEL, "--alias", "staging", "--workers", "2",
                         "--poll-seconds", "0", "--database", url], tmp_path)
    acknowledged, stop = [], threading.Event()

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        with contextlib.suppress(httpx.TransportError), srv.client() as c:
            while not stop.is_set():
                r = c.post("/v1/predict", files={"files": ("slice.jpg", rng.choice(jpegs))})
                if r.status_code == 200:
                    acknowledged.extend(p["record_id"] for p in r.json()["predictions"])

    try:
        srv.wait_ready(300)
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client_loop, seed) for seed in range(8)]
            deadline = time.monotonic() + 120
            while len(acknowledged) < 60 and time.monotonic() < deadline:
                time.sleep(0.2)
            srv.kill9()  # mid-load: requests are in flight in both workers
            stop.set()
            for f in futures:
                f.result(timeout=60)
    finally:
        if srv.alive():
            srv.stop()
    assert PASSWORD not in srv.log()  # the log names the database without its password
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            stored = {row[0] for row in conn.execute(select(predictions.c.id))}
    finally:
        engine.dispose()
    missing = set(acknowledged) - stored
    assert len(acknowledged) >= 60 and not missing, f"{len(missing)} acknowledged records lost"

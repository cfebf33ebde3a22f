"""Score a whole archive with a registered model: every image and DICOM frame under one or more folders, or listed
in a manifest (CSV), into a Parquet table, on Ray Data (a local Ray by default, a cluster with --address).

    python score_archive.py --model brain-cancer-resnet18 --root /archive/2025 --out preds.parquet
    python score_archive.py --model brain-cancer-resnet18 --version 3 --manifest cohort.csv --out v3.parquet
    python score_archive.py --model brain-cancer-resnet18 --root /shared/archive --out /shared/preds.parquet \\
        --address ray://ray-head:10001

A rerun skips every file the output already holds for the same model version (same path, same sha256); a file
that cannot be read is a row with its error. Each run is one record of the audit database (archive_runs).
Needs Ray: pip install -r requirements-scale.txt.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from archive.audit import MIGRATIONS
from archive.engine import EngineSettings
from archive.inputs import list_inputs
from archive.run import ArchiveRequest, new_run_id, prepare_job, run_archive
from core.cli import add_common_args, add_registered_model_args, config_from_args, run
from core.errors import UserError
from core.redaction import redact_text
from data.images import configure_limits
from deploy.policy import serving_warning
from deploy.registry import INT8_FLAVOR, connect, registered_name, resolve_version
from serving.audit import make_engine, migrate


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score every image and DICOM frame of an archive with a registered "
                                            "model into a Parquet table (Ray Data)")
    add_common_args(p, model=False)
    add_registered_model_args(p)
    p.add_argument("--flavor", choices=["auto", "onnx", INT8_FLAVOR], default="auto",
                   help="the registered ONNX model (auto, onnx) or its int8 twin (onnx-int8)")
    p.add_argument("--root", action="append", default=[], metavar="DIR",
                   help="a folder (searched recursively) or file to score; repeatable")
    p.add_argument("--manifest", default=None, metavar="CSV", help="a CSV whose `path` column lists the files")
    p.add_argument("--manifest-root", default=None, metavar="DIR",
                   help="where the manifest's relative paths start (default: the CSV's folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="the output: a folder of Parquet part files")
    p.add_argument("--database", default=None, metavar="URL",
                   help="the audit database (default: serving.database_url, sqlite:///audit.db)")
    p.add_argument("--audit-each", action="store_true",
                   help="also record every slice's prediction in the audit database (default: one record per run)")
    engine = p.add_argument_group("Ray")
    engine.add_argument("--address", default=None,
                        help="a running Ray cluster: auto (this node's) or ray://HEAD:10001; default: a local Ray")
    engine.add_argument("--cpus", type=int, default=None, help="the local Ray's CPUs (default: all)")
    engine.add_argument("--actors", type=int, default=None, help="model actors (default: one per CPU)")
    engine.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per actor")
    engine.add_argument("--batch-size", type=int, default=32, help="slices per model call")
    return p


def settings_from_args(args) -> EngineSettings:
    for flag in ("cpus", "actors", "threads", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    return EngineSettings(args.address, args.cpus, args.actors, args.threads, args.batch_size)


def main(args) -> int:
    cfg = config_from_args(args)
    configure_limits(cfg)  # this run's images: bounds on every decoder
    settings = settings_from_args(args)
    if not args.root and not args.manifest:
        raise UserError("nothing to score: give --root DIR (repeatable) or --manifest CSV")
    files = list_inputs(args.root, args.manifest, args.manifest_root)
    if not files:
        raise UserError(f"no image or DICOM files in {' '.join(args.root) or args.manifest}")
    client = connect(cfg.monitoring.mlflow)
    mv = resolve_version(client, registered_name(args.registered_model), args.alias, args.version)
    alias = args.alias or (None if args.version else "production")
    warning = serving_warning(mv)
    if warning:
        print(warning, file=sys.stderr)
    database = args.database or cfg.serving.database_url
    engine = make_engine(database, cfg.serving.audit_fsync)
    migrate(engine, MIGRATIONS)
    request = ArchiveRequest(files, {"roots": args.root, "manifest": args.manifest}, Path(args.out), alias,
                             args.audit_each)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            job = prepare_job(client, mv, args.flavor, cfg, Path(tmp), new_run_id(), settings.threads)
            record = run_archive(request, job, settings, engine)
    finally:
        engine.dispose()
    print(f"✅ {record.rows} row(s) written ({record.errors} unreadable file(s)), {record.files_skipped} file(s) "
          f"already scored; {args.out} sha256 {record.output_sha256[:16]}…")
    print(f"🗄️  Run {record.id} recorded in {redact_text(database)} (archive_runs)")
    return 0


if __name__ == "__main__":
    run(main, get_args_parser())

"""One archive run, start to end: the model from the registry, the file list, what the output already holds, the
pipeline on Ray, the part files put in place, the audit record."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from archive.audit import RunRecord, record_predictions, record_run
from archive.engine import ArchiveJob, EngineSettings, score_on_ray, start_ray, stop_ray
from archive.scorer import Scorer, ScoringModel
from archive.table import ArchiveOutput
from core.errors import UserError
from data.images import current_limits
from deploy.predictors import read_contract
from deploy.refer import ReferRule
from deploy.registry import onnx_artifact
from serving.model import read_evidence


@dataclass(frozen=True)
class ArchiveRequest:
    files: list[str]
    inputs: dict                 # the roots and manifest as given, for the audit record
    out: Path
    alias: str | None
    audit_each: bool = False     # also one `predictions` row per slice


def prepare_job(client, mv, flavor: str, cfg, workdir: Path, run_id: str, threads: int) -> ArchiveJob:
    """The registered ONNX file, its contract and the version's refer rule, checked here once by building a
    session (a bad artifact stops the run before Ray starts)."""
    found = onnx_artifact(client, mv, workdir, flavor)
    if found is None:
        raise UserError(f"{mv.name} v{mv.version} has no ONNX flavor; score_archive.py runs ONNX Runtime "
                        "(register_model.py registers both flavors)")
    path, _, used_flavor = found
    contract = read_contract(path)
    evidence = read_evidence(mv, workdir, cfg.monitoring.mlflow.tracking_uri)
    rule = ReferRule.for_version(contract.to_dict(), evidence.get("evaluation"), cfg.review)
    identity = {"model_name": mv.name, "model_version": str(mv.version), "flavor": used_flavor, "run_id": run_id}
    model = ScoringModel(identity, rule, threads)
    Scorer(model, path.read_bytes())
    return ArchiveJob(model, path.read_bytes(), contract.img_size, current_limits())


def run_archive(request: ArchiveRequest, job: ArchiveJob, settings: EngineSettings, engine) -> RunRecord:
    """Score what the output does not hold yet and record the run; the run's record."""
    identity = job.model.identity
    started = datetime.now(timezone.utc)
    with ArchiveOutput(request.out) as output:
        adopted = output.adopt_staged()
        if adopted:
            print(f"♻️  {adopted} part file(s) a stopped run had finished were kept")
        done = output.done(identity)
        where = start_ray(settings)
        print(f"🚀 {len(request.files)} file(s) on {where}; {len(done)} already scored by this model version")
        staging = output.staging(identity["run_id"])
        try:
            score_on_ray(request.files, done, job, settings, staging)
        finally:
            stop_ray()
        moved = output.publish(staging)
        new = pq.ParquetDataset([str(p) for p in moved]).read() if moved else None
        scored_files = len(set(new["path"].to_pylist())) if new is not None else 0
        run = RunRecord(identity["run_id"], started, datetime.now(timezone.utc), identity["model_name"],
                        identity["model_version"], request.alias, identity["flavor"], json.dumps(request.inputs),
                        str(request.out), len(request.files), len(request.files) - scored_files,
                        new.num_rows if new is not None else 0,
                        int(pc.sum(pc.is_valid(new["error"])).as_py() or 0) if new is not None else 0,
                        output.digest(), where)
        record_run(engine, run)
        if request.audit_each and new is not None:
            record_predictions(engine, new, request.alias)
    return run


def new_run_id() -> str:
    return uuid.uuid4().hex

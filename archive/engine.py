"""Ray: a local Ray on this machine (the default) or an existing cluster (`--address auto`, `ray://head:10001`),
and the archive pipeline on Ray Data: file list -> decoding tasks -> model actors -> Ray's Parquet writer."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from archive.decode import decode_files
from archive.scorer import Scorer, ScoringModel
from core.errors import UserError
from data.images import ImageLimits

ROOT = Path(__file__).resolve().parent.parent
# What a cluster does not need of the project folder (Ray also leaves out what .gitignore lists)
CLUSTER_EXCLUDES = [".git", ".venv", "data/demo", "checkpoints", "mlartifacts", "mlruns", "wandb", "runs", "*.db"]


@dataclass(frozen=True)
class EngineSettings:
    address: str | None = None   # None: a local Ray on this machine; "auto" or ray://host:10001: a running cluster
    cpus: int | None = None      # the local Ray's CPUs (default: this machine's)
    actors: int | None = None    # model actors (default: one per CPU)
    threads: int = 1             # ONNX Runtime threads per actor
    batch_size: int = 32         # slices per model call
    files_per_task: int = 16     # files per decoding task
    decode_cpus: float = 0.5     # Ray's logical CPUs a decoding task asks for (it mostly waits on the disk)
    object_store_mb: int = 512   # the local Ray's shared-memory store


@dataclass(frozen=True)
class ArchiveJob:
    model: ScoringModel
    onnx_bytes: bytes
    img_size: int
    limits: ImageLimits


def import_ray():
    """Ray, with its usage statistics off (set here, when Ray is first needed, not when this module is imported):
    nothing leaves the machine unless asked."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError("score_archive.py runs on Ray Data: pip install -r requirements-scale.txt") from None
    return ray


def start_ray(settings: EngineSettings) -> str:
    """Start (or join) Ray; returns what it runs on, for the console and the audit record."""
    ray = import_ray()
    if settings.address:
        try:  # the cluster's workers get this project's code; the files must be at the same paths on every node
            ray.init(address=settings.address, logging_level=logging.WARNING,
                     runtime_env={"working_dir": str(ROOT), "excludes": CLUSTER_EXCLUDES})
        except Exception as exc:  # unreachable, refused, another Ray version: one line, whichever
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"--address {settings.address}: cannot join the Ray cluster ({first})") from None
        where = f"cluster {settings.address}"
    else:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        ray.init(address="local", num_cpus=settings.cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=settings.object_store_mb << 20, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
        where = "local"
    return f"ray {ray.__version__}, {where}, {int(ray.cluster_resources().get('CPU', 0))} CPUs"


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def decode_task(batch, img_size: int, limits: ImageLimits, done_ref):
    import ray

    return decode_files(batch, img_size, limits, ray.get(done_ref))


class RayScorer(Scorer):
    """The scorer as a Ray actor: the ONNX file's bytes come once from the object store."""

    def __init__(self, model: ScoringModel, onnx_ref):
        import ray

        super().__init__(model, ray.get(onnx_ref))


def score_on_ray(files: list[str], done: frozenset, job: ArchiveJob, settings: EngineSettings, staging: Path) -> None:
    """Score `files` into Parquet part files under `staging` (Ray's writer: one file per finished block)."""
    ray = import_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    actors = settings.actors or max(1, cpus // settings.threads)
    ds = ray.data.from_items([{"path": p} for p in files],
                             override_num_blocks=max(1, math.ceil(len(files) / settings.files_per_task)))
    decoded = ds.map_batches(decode_task, batch_size=settings.files_per_task, batch_format="pyarrow",
                             num_cpus=settings.decode_cpus,
                             fn_kwargs={"img_size": job.img_size, "limits": job.limits, "done_ref": ray.put(done)})
    scored = decoded.map_batches(RayScorer, batch_size=settings.batch_size, batch_format="pyarrow",
                                 compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=actor_cpus(settings),
                                 fn_constructor_kwargs={"model": job.model, "onnx_ref": ray.put(job.onnx_bytes)})
    scored.write_parquet(str(staging))


def actor_cpus(settings: EngineSettings) -> float:
    """An actor's logical CPUs: its threads, less what the decoding tasks beside it take on average, so that
    one actor per CPU and the decoding tasks fit together (Ray schedules by these numbers)."""
    return max(0.1, settings.threads * (1 - settings.decode_cpus / 2))

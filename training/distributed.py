"""torchrun support: process group set-up, DDP wrapping, and the few collectives the loop needs.

`torchrun --nproc-per-node=N train.py ...` sets RANK / LOCAL_RANK / WORLD_SIZE; without them
everything here is a no-op and training runs in one process.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str | None = None) -> tuple[DistInfo, torch.device | None]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); (info, device or None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), None
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    cuda = torch.cuda.is_available() and (device_name is None or device_name.startswith("cuda"))
    device = torch.device(f"cuda:{info.local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return info, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum numbers over all processes (float64 so image counts stay exact)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process when it is True on one (e.g. a stop request seen by one rank only)."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def any_rank_on_device(flag: torch.Tensor) -> torch.Tensor:
    """any_rank for a 0-d bool tensor that stays on its device: the host never waits for it."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = flag.float()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value > 0


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process; [obj] without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def main_first(info: DistInfo, device: torch.device | None) -> Iterator[None]:
    """Rank 0 runs the block first (it writes the shared files: split manifest, statistics), then the others.

    The others wait in a collective that rank 0 joins whether the block passed or raised, so when rank 0
    fails every rank leaves at once with one line, instead of waiting at a barrier rank 0 never reaches."""
    if not info.enabled:
        yield
        return
    if not info.is_main:
        if any_rank(False, device):
            raise UserError(f"rank 0 failed while preparing the data (its error is above); rank {info.rank} stops too")
        yield
        return
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # a broken process group must not hide rank 0's own error
            any_rank(True, device)
        raise
    any_rank(False, device)

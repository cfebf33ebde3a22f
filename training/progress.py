"""Where a run stands, and the random number generators: what last_model.pth saves so that --resume
continues bit for bit. Everything survives torch.load(weights_only=True): no numpy arrays, no pickled classes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class Progress:
    """The run's position. state_dict() and from_state_dict() are mirror images (the checkpoint's "progress")."""
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps
    nonfinite: int = 0  # steps skipped for a non-finite loss or gradient
    batches_done: int = 0  # batches of the next epoch done before an interruption: where a resumed run starts
    partial: list | dict | None = None  # that epoch's running sums (saved: one per process; live: this process's)
    generator_state: torch.Tensor | None = None  # the shuffle generator at the start of that epoch
    world_size: int = 1

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict) -> Progress:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


def capture_rng() -> dict:
    """This process's RNG states: Python, NumPy, torch CPU and CUDA."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])

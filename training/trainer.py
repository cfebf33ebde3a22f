"""Everything one run trains with, in one object, and the checkpoint it writes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DistributedSampler, Subset

from core.contract import Contract
from core.errors import UserError
from data.dataset import build_dataset, make_loader
from data.intensity import REFERENCE_KEY
from data.preprocess import Preprocessor
from models.loading import unwrap
from training.distributed import DistInfo
from training.early_stopping import EarlyStopping
from training.progress import Progress
from training.recipe import (
    balanced_sampler,
    build_criterion,
    build_optimizer,
    build_scheduler,
    precision_for,
    precision_name,
    prepare_model,
    use_fused_optimizer,
)

if TYPE_CHECKING:
    from core.config import Config
    from data.manifest import Split


@dataclass
class Trainer:
    cfg: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    train_loader: object
    val_loader: object
    train_pre: torch.nn.Module
    val_pre: torch.nn.Module
    device: torch.device
    generator: torch.Generator
    class_names: list = field(default_factory=list)
    class_folders: list = field(default_factory=list)
    amp: torch.dtype | None = None
    precision_reason: str = ""  # why `amp` was chosen (the banner prints it)
    dist: DistInfo = field(default_factory=DistInfo)
    stopper: EarlyStopping = field(default_factory=EarlyStopping)
    progress: Progress = field(default_factory=Progress)
    pending_nonfinite: torch.Tensor | None = None  # steps a fused optimizer skipped on the device, not yet read
    epoch_generator_state: torch.Tensor | None = None  # the shuffle order of the epoch in progress
    contract: Contract | None = None  # what the checkpoint tells every later stage
    run_id: str | None = None  # the MLflow training run, so evaluation and the registry can link back to it

    def __post_init__(self):
        if self.pending_nonfinite is None:
            self.pending_nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)

    @property
    def fused(self) -> bool:
        """The optimizer skips non-finite steps on the device (build_optimizer(..., fused=True))."""
        return bool(self.optimizer.defaults.get("fused"))

    def payload(self, epoch: int, metrics: dict, **extra) -> dict:
        return checkpoint_payload(self.model, self.cfg, self.contract, epoch, metrics,
                                  class_folders=self.class_folders, mlflow_run_id=self.run_id,
                                  precision=precision_name(self.amp), **extra)


def build_trainer(cfg: Config, split: Split, contract: Contract, device: torch.device, info: DistInfo,
                  model: torch.nn.Module) -> Trainer:
    """Data, model wrappers, optimizer, scheduler, loss: everything one run trains with."""
    generator = torch.Generator().manual_seed(cfg.train.seed)  # shuffle order, saved in last_model.pth
    train_ds, val_ds = (build_dataset(cfg, split, name, cfg.img_size) for name in ("train", "val"))
    labels = split.samples("train")[1]
    sampler = None
    if cfg.train.class_balance == "sampler":
        if info.enabled:
            raise UserError("train.class_balance=sampler does not work with several processes; use weights")
        sampler = balanced_sampler(labels, generator)
    elif info.enabled:
        sampler = DistributedSampler(train_ds, info.world_size, info.rank, shuffle=True, seed=cfg.train.seed)
    if info.enabled:  # each process validates every world_size-th image; the results are gathered
        val_ds = Subset(val_ds, range(info.rank, len(val_ds), info.world_size))
    bs = cfg.recipe.batch_size
    per_process = math.ceil(len(train_ds) / info.world_size)
    # drop the ragged last batch (a batch of 1 breaks batch norm) unless the data set is smaller than a batch
    train_loader = make_loader(train_ds, cfg, bs, sampler=sampler, device=device, generator=generator,
                               drop_last=per_process > bs)
    val_loader = make_loader(val_ds, cfg, bs, device=device)
    wrapped = prepare_model(model, cfg, device, info)
    optimizer = build_optimizer(wrapped, cfg.recipe, use_fused_optimizer(cfg, device))
    steps = math.ceil(len(train_loader) / cfg.performance.gradient_accumulation)
    precision = precision_for(cfg, device)
    dtype = precision.dtype
    return Trainer(
        cfg=cfg, model=wrapped, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg, steps),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        criterion=build_criterion(cfg, labels, len(split.class_names), device),
        train_loader=train_loader, val_loader=val_loader,
        train_pre=Preprocessor.from_config(cfg, contract.mean, contract.std, train=True).to(device),
        val_pre=Preprocessor.from_config(cfg, contract.mean, contract.std, train=False).to(device),
        device=device, generator=generator, class_names=list(split.class_names), amp=dtype,
        precision_reason=precision.reason, dist=info,
        stopper=EarlyStopping(cfg.train.monitor, cfg.train.patience, cfg.train.min_delta),
        contract=contract, class_folders=list(split.class_folders))


def training_contract(cfg: Config, split: Split, mean, std, intensity: dict | None = None) -> Contract:
    """The contract a run trained on this split writes into every checkpoint; `intensity` is the training split's
    intensity reference (data.intensity), which the review station's out-of-distribution check compares with."""
    return Contract(model_name=cfg.model, class_names=split.class_names, img_size=cfg.img_size, mean=mean, std=std,
                    data_fingerprint=split.fingerprint, split_manifest=str(split.manifest_path),
                    extra={REFERENCE_KEY: intensity} if intensity else {})


def checkpoint_payload(model: torch.nn.Module, cfg: Config, contract: Contract, epoch: int, metrics: dict,
                       **extra) -> dict:
    """A checkpoint: weights, the contract every later stage preprocesses with, the epoch's metrics and the
    resolved config, as plain types that torch.load(weights_only=True) opens."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return {"model_state": state, **contract.checkpoint_fields(), "epoch": int(epoch), "metrics": metrics,
            "config": cfg.to_dict(), **extra}

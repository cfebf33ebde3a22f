"""Training options, each shown to take effect on CPU: schedules, loss, balancing, accumulation, clipping,
speed switches, the non-finite guard, early stopping and numbered checkpoints."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import build_with_training_hook, run_script, write_overlay
from core.checkpoint import load_checkpoint
from core.config import load_config
from core.errors import UserError
from training.early_stopping import EarlyStopping
from training.loop import train_one_epoch
from training.recipe import (
    amp_dtype,
    balanced_sampler,
    build_criterion,
    build_optimizer,
    build_scheduler,
    class_weights,
    prepare_model,
)
from training.step import clip_gradients
from training.trainer import Trainer


def cfg_with(*sets):
    return load_config(None, list(sets))


def lr_curve(cfg, steps_per_epoch: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg.train.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_schedule_warms_up_linearly_then_decays():
    lrs = lr_curve(cfg_with("train.epochs=4", "train.warmup_epochs=1", "train.scheduler=cosine"), 5)
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a > b for a, b in zip(lrs[5:], lrs[6:]))  # strictly decreasing after the warm-up
    assert lrs[-1] < 0.02


def test_onecycle_peaks_at_end_of_warmup_and_none_is_constant():
    lrs = lr_curve(cfg_with("train.epochs=4", "train.warmup_epochs=1", "train.scheduler=onecycle"), 5)
    assert max(range(len(lrs)), key=lrs.__getitem__) == 4 and lrs[4] == pytest.approx(1.0)
    assert lrs[0] < 0.1 and lrs[-1] < 1e-3
    assert set(lr_curve(cfg_with("train.epochs=2", "train.scheduler=none"), 3)) == {1.0}


def test_label_smoothing_changes_the_loss():
    logits, y = torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([0])
    plain = build_criterion(cfg_with("train.label_smoothing=0"), [0, 1, 2], 3, "cpu")(logits, y)
    smooth = build_criterion(cfg_with("train.label_smoothing=0.1"), [0, 1, 2], 3, "cpu")(logits, y)
    assert smooth > plain + 0.1  # a confident right answer is penalised under smoothing


def test_class_weights_come_from_counts_and_enter_the_loss():
    labels = [0] * 6 + [1] * 2 + [2] * 4
    assert class_weights(labels, 3).tolist() == pytest.approx([12 / 18, 12 / 6, 12 / 12])
    crit = build_criterion(cfg_with("train.class_balance=weights"), labels, 3, "cpu")
    assert crit.weight.tolist() == pytest.approx([12 / 18, 2.0, 1.0])
    assert build_criterion(cfg_with("train.class_balance=none"), labels, 3, "cpu").weight is None


def test_sampler_draws_classes_evenly():
    labels = [0] * 90 + [1] * 10
    sampler = balanced_sampler(labels, torch.Generator().manual_seed(0))
    drawn = [labels[i] for _ in range(20) for i in sampler]
    assert 0.45 < sum(drawn) / len(drawn) < 0.55  # 10 % of the data, about half of the draws


def tiny_trainer(cfg, batch_size: int) -> Trainer:
    """A linear model on 16 fixed samples (no batch norm, so accumulation can be compared exactly)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.randn(16, 1, 2, 2), torch.arange(16) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    return Trainer(cfg=cfg, model=model, optimizer=opt, scheduler=build_scheduler(opt, cfg, 8),
                   scaler=torch.amp.GradScaler("cpu", enabled=False), criterion=torch.nn.CrossEntropyLoss(),
                   train_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size), val_loader=None,
                   train_pre=torch.nn.Identity(), val_pre=torch.nn.Identity(), device=torch.device("cpu"),
                   generator=torch.Generator())


def test_gradient_accumulation_equals_the_larger_batch():
    base = ("train.scheduler=none", "performance.max_grad_norm=null", "performance.channels_last=false")
    big = tiny_trainer(cfg_with(*base, "performance.gradient_accumulation=1"), batch_size=8)
    accum = tiny_trainer(cfg_with(*base, "performance.gradient_accumulation=2"), batch_size=4)
    odd = tiny_trainer(cfg_with(*base, "performance.gradient_accumulation=3"), batch_size=4)
    for t in (big, accum, odd):
        train_one_epoch(t, 1)
    assert big.progress.step == accum.progress.step == 2 and odd.progress.step == 2  # 4 batches in windows of 3 + 1
    for a, b in zip(big.model.parameters(), accum.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_fused_step_under_gradscaler_skips_an_overflow_and_lowers_the_scale():
    """The fp16 route with the fused optimizer: GradScaler's own found_inf reaches the kernel (run on CPU)."""
    t = tiny_trainer(cfg_with("train.scheduler=none", "performance.channels_last=false"), batch_size=4)
    t.optimizer = build_optimizer(t.model, cfg_with().recipe, fused=True)
    t.scheduler = build_scheduler(t.optimizer, t.cfg, 4)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = t.train_loader.dataset.tensors
    x = x.clone()
    x[5] = float("inf")  # the second batch overflows
    t.train_loader = DataLoader(TensorDataset(x, y), batch_size=4)
    train_one_epoch(t, 1)
    assert t.progress.step == 4 and t.progress.nonfinite == 1
    assert t.scaler.get_scale() < 1024.0
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert int(t.optimizer.state[next(t.model.parameters())]["step"]) == 3  # the skipped step is not counted


def test_clipping_bounds_the_gradient_norm():
    t = tiny_trainer(cfg_with("performance.max_grad_norm=0.5"), batch_size=8)
    for p in t.model.parameters():
        p.grad = torch.full_like(p, 10.0)
    before = clip_gradients(t)
    after = torch.nn.utils.get_total_norm([p.grad for p in t.model.parameters()])
    assert before > 10 and after == pytest.approx(0.5, rel=1e-4)


def test_speed_options_are_harmless_on_cpu():
    """CUDA's mixed_precision does not reach the CPU (cpu_precision does); channels_last changes the weights'
    layout; torch.compile still runs (~5 s)."""
    from training.distributed import DistInfo

    cfg = cfg_with("performance.mixed_precision=true", "performance.cpu_precision=fp32",
                   "performance.channels_last=true")
    assert amp_dtype(cfg, torch.device("cpu")) is None
    conv = prepare_model(torch.nn.Conv2d(3, 4, 3), cfg, torch.device("cpu"), DistInfo())
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    compiled = prepare_model(torch.nn.Linear(4, 2), cfg_with("performance.compile_model=true"),
                             torch.device("cpu"), DistInfo())
    assert type(compiled).__name__ == "OptimizedModule" and compiled(torch.randn(3, 4)).shape == (3, 2)


def test_early_stopping_messages_match_the_original_readme():
    stop = EarlyStopping("val_acc", patience=10, min_delta=0.001)
    assert stop.step(0.8745, 1) == "New best model saved! Val Acc: 87.45%"
    assert stop.step(0.87684, 2) == "New best model saved! Val Acc: 87.68% (improvement: 0.234%)"
    assert [stop.step(0.87, e) for e in (3, 4, 5)][-1] == "No improvement for 3/10 epochs (best: 87.68%)"
    for e in range(6, 13):
        msg = stop.step(0.8775, e)  # +0.066 points: below min_delta, not an improvement
    assert msg == "Early stopping triggered! No improvement for 10 epochs." and stop.should_stop
    assert stop.summary() == "Best validation accuracy: 87.68% (epoch 2)"
    loss = EarlyStopping("val_loss", patience=2)
    assert loss.step(0.5, 1).startswith("New best") and loss.step(0.4, 2).endswith("(improvement: 0.1000)")


def test_early_stop_at_the_right_epoch_with_banner_and_numbered_checkpoints(tmp_path, tiny_data, capsys):
    overlay = write_overlay(tmp_path, tiny_data, **{"train.epochs": 6, "train.patience": 2, "train.min_delta": 1.0,
                                                    "train.save_every": 2,
                                                    "monitoring.mlflow.enabled": False})
    assert run_script("train", ["--config", overlay, "--model", "resnet18"]) == 0
    out = capsys.readouterr().out
    out_dir = tmp_path / "checkpoints" / "resnet18_outputs"
    # epoch 1 sets the best; nothing can beat it by min_delta=1.0, so epochs 2 and 3 use up patience 2.
    assert "Early stopping triggered! No improvement for 2 epochs." in out and "Epoch 4/6" not in out
    assert load_checkpoint(out_dir / "last_model.pth")["epoch"] == 3
    assert load_checkpoint(out_dir / "best_model.pth")["epoch"] == 1
    assert sorted(p.name for p in out_dir.glob("checkpoint_epoch_*.pth")) == ["checkpoint_epoch_002.pth"]
    for line in ("Dataset: ", "Model: resnet18 with 3 classes", "Batch size: 8", "Learning rate: 0.003", "Epochs: 6",
                 "Device: cpu", "CPU: ", "RAM: ", "GPU: no GPU", "Mixed Precision: Disabled", "Model Compilation: "
                                                                                              "Disabled",
                 "TensorBoard: ", "Epoch 1/6 Summary:", "Train Loss:", "Val Acc:", "Best validation accuracy"):
        assert line in out, line


def test_optimizer_state_covers_every_trainable_parameter(trained):
    _, tmp, best = trained
    last = torch.load(best.parent / "last_model.pth", weights_only=True)
    from models.zoo import build_model

    model = build_model("resnet18", 3, pretrained=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_state = last["optimizer_state"]
    indices = [i for g in opt_state["param_groups"] for i in g["params"]]
    assert sorted(indices) == list(range(len(trainable)))
    assert set(opt_state["state"]) == set(indices)  # every parameter has Adam moments: all of them trained
    for key in ("scheduler_state", "scaler_state", "early_stopping", "rng", "progress"):
        assert key in last
    ref = build_optimizer(model, load_config(None, []).recipe)
    assert len(ref.state_dict()["param_groups"][0]["params"]) == len(trainable)


def nan_on(calls: set[int]):
    """A build_model replacement whose model outputs NaN on the given training forward calls (1-based)."""
    return build_with_training_hook(lambda n, output: output * float("nan") if n in calls else None)


FUSED = pytest.mark.parametrize("fused", [False, True], ids=["host-checked", "fused-on-device"])


@FUSED
def test_one_nan_step_is_skipped_and_training_goes_on(tmp_path, tiny_data, monkeypatch, capsys, fused):
    monkeypatch.setattr("train.build_model", nan_on({2}))
    overlay = write_overlay(tmp_path, tiny_data, **{"train.max_nonfinite_steps": 5,
                                                    "performance.fused_optimizer": fused,
                                                    "monitoring.mlflow.enabled": False})
    assert run_script("train", ["--config", overlay, "--model", "resnet18"]) == 0
    err = capsys.readouterr().err
    assert err.count("non-finite loss or gradient") == 1 and "skipped (1/5)" in err
    state = load_checkpoint(tmp_path / "checkpoints" / "resnet18_outputs" / "last_model.pth")["model_state"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@FUSED
def test_a_skipped_step_leaves_the_weights_untouched(tmp_path, tiny_data, monkeypatch, fused):
    """Every step non-finite: the weights end as they started (the fused kernel skips on the device)."""
    built = {}

    def build(*args, **kwargs):
        model = nan_on(set(range(1, 1000)))(*args, **kwargs)
        built.update({k: v.detach().clone() for k, v in model.named_parameters()})
        return model
    monkeypatch.setattr("train.build_model", build)
    overlay = write_overlay(tmp_path, tiny_data, **{"train.max_nonfinite_steps": 1000, "train.epochs": 1,
                                                    "performance.fused_optimizer": fused,
                                                    "models.resnet18.batch_size": 4,
                                                    "monitoring.mlflow.enabled": False})
    assert run_script("train", ["--config", overlay, "--model", "resnet18"]) == 0
    last = load_checkpoint(tmp_path / "checkpoints" / "resnet18_outputs" / "last_model.pth")
    assert last["progress"]["nonfinite"] == last["progress"]["step"] > 1
    assert all(torch.equal(last["model_state"][k], v) for k, v in built.items())


@FUSED
def test_persistent_nans_stop_the_run_with_advice(tmp_path, tiny_data, monkeypatch, fused):
    monkeypatch.setattr("train.build_model", nan_on(set(range(1, 100))))
    overlay = write_overlay(tmp_path, tiny_data, **{"train.max_nonfinite_steps": 2, "train.epochs": 3,
                                                    "performance.fused_optimizer": fused,
                                                    "monitoring.mlflow.enabled": False})
    with pytest.raises(UserError, match=r"training stopped: \d+ steps had a non-finite .* Lower the learning rate"):
        run_script("train", ["--config", overlay, "--model", "resnet18"])


def test_fused_optimizer_needs_adam_or_adamw(tmp_path, tiny_data):
    overlay = write_overlay(tmp_path, tiny_data, **{"performance.fused_optimizer": True,
                                                    "models.resnet18.optimizer": "sgd"})
    with pytest.raises(UserError, match="fused_optimizer=true needs optimizer adamw or adam .*uses sgd"):
        run_script("train", ["--config", overlay, "--model", "resnet18"])

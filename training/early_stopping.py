"""Early stopping on one validation metric, with the messages of the original README."""
from __future__ import annotations

LABELS = {"val_acc": "Val Acc", "val_balanced_acc": "Val Balanced Acc", "val_loss": "Val Loss"}
BEST_LABELS = {"val_acc": "validation accuracy", "val_balanced_acc": "validation balanced accuracy",
               "val_loss": "validation loss"}


class EarlyStopping:
    """Counts epochs without an improvement of more than `min_delta`; patience 0 never stops."""

    def __init__(self, monitor: str = "val_acc", patience: int = 10, min_delta: float = 0.0):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.mode = "min" if monitor.endswith("loss") else "max"
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        delta = (self.best - value) if self.mode == "min" else (value - self.best)
        return delta > self.min_delta

    def step(self, value: float, epoch: int) -> str:
        """Record one epoch's value; returns the line to print."""
        if self.improved(value):
            previous, self.best, self.best_epoch, self.bad_epochs = self.best, value, epoch, 0
            gain = "" if previous is None else f" (improvement: {self.fmt(abs(value - previous))})"
            return f"New best model saved! {LABELS[self.monitor]}: {self.fmt(value)}{gain}"
        self.bad_epochs += 1
        if self.should_stop:
            return f"Early stopping triggered! No improvement for {self.bad_epochs} epochs."
        limit = f"/{self.patience}" if self.patience > 0 else ""
        return f"No improvement for {self.bad_epochs}{limit} epochs (best: {self.fmt(self.best)})"

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def fmt(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        return f"{value:.4f}" if self.mode == "min" else f"{value * 100:.3g}%" if value < 0.01 else f"{value:.2%}"

    def summary(self) -> str:
        return f"Best {BEST_LABELS[self.monitor]}: {self.fmt(self.best)} (epoch {self.best_epoch})"

    def state_dict(self) -> dict:
        return {"monitor": self.monitor, "best": self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]

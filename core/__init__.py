"""The floor every stage stands on: errors, the typed config, the command line, device choice, checkpoint
I/O, atomic file writes, the preprocessing contract, hardware readings and experiment tracking.

May import: nothing of the project's (standard library and third-party libraries only).
"""
import os as _os

# Nothing leaves the machine unless the user asked: the libraries' usage telemetry and crash reports are off
# before any of them is imported (MLflow decides at import). A value the user set in the environment wins;
# monitoring.mlflow.telemetry: true turns MLflow's back on (core.tracking.prepare_mlflow).
for _name, _off in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                    ("WANDB_ERROR_REPORTING", "false")):
    _os.environ.setdefault(_name, _off)

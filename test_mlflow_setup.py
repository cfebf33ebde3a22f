"""Setup check: what works on this machine and what to do about the rest (the original README's step 3).

    python test_mlflow_setup.py                      # torch, CUDA, the MLflow store, W&B, weights, data set, demo
    python test_mlflow_setup.py --set monitoring.mlflow.tracking_uri=http://127.0.0.1:5000   # a running server

Reads only: nothing is logged, generated or downloaded. Exit code 0 when nothing fails (notes and things to look
at are fine), 1 when a check fails, 2 on a user error.
"""
from __future__ import annotations

import argparse

from core.cli import add_common_args, config_from_args, run
from core.config import load_config
from ops.setup_check import format_checks, run_checks

RULE = "=" * 60


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Check the setup: torch, CUDA, the MLflow store and registry, W&B, "
                                            "ImageNet weights per model, the data set, the demo")
    add_common_args(p, model=False)
    return p


def main(args) -> int:
    cfg = config_from_args(args)
    demo_cfg = load_config(args.config, args.sets, demo=True)
    print(f"🧪 Brain Cancer MRI toolkit: setup check\n{RULE}")
    checks = run_checks(cfg, demo_cfg)
    print("\n".join(format_checks(checks)))
    failing = [c.name for c in checks if c.status == "fail"]
    print(RULE)
    print(f"❌ Fix first: {', '.join(failing)}" if failing else "✅ Ready: python train.py --model resnet18 --demo to "
                                                                "try everything on the synthetic demo")
    return 1 if failing else 0


if __name__ == "__main__":
    run(main, get_args_parser())

"""Compare models: train and evaluate each one in its own process, then one summary.

    python run_experiments.py                    # experiments.models, short: 5 epochs (CNNs), 3 (transformers)
    python run_experiments.py --full             # ... each for its full train.epochs
    python run_experiments.py --demo --models resnet18,efficientnet_b0 --epochs 1
    python run_experiments.py --resume           # skip models already finished

Each model runs `python train.py --model M` then `python evaluate.py --model M --medical-validation`
(logs in {train.output_dir}/experiments/logs/); a failing model is reported and the others go on.
Writes experiments_summary.csv / .json and experiments_comparison.png into {train.output_dir}/experiments/
and logs a parent MLflow run (experiment brain-cancer-mri-experiments) that the training runs nest under.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from core.cli import add_common_args, run
from core.config import PROJECT_ROOT
from core.errors import UserError
from ops.experiments import Plan, run_all, summary_lines


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train and evaluate several models, each in its own process, "
                                            "and compare them (summary table, CSV/JSON, plot, MLflow parent run)")
    add_common_args(p, model=False)
    p.add_argument("--models", default=None, metavar="A,B,...",
                   help="comma-separated model names (default: experiments.models in the config)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs for every model (default: experiments.epochs, a short comparison: 5 for CNNs, 3 for "
                        "transformers)")
    p.add_argument("--full", action="store_true", help="train every model for its full train.epochs")
    p.add_argument("--resume", action="store_true",
                   help="skip models that finished earlier with the same settings (from experiments_summary.json)")
    p.add_argument("--quiet", action="store_true", help="do not echo the children's output (it is still logged)")
    return p


def main(args) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if args.models is not None and not models:
        raise UserError("--models needs at least one model name, e.g. --models resnet18,efficientnet_b0")
    plan = Plan(config=str(Path(args.config).resolve()) if args.config else None, sets=args.sets,
                demo=args.demo, epochs=args.epochs, resplit=args.resplit, full=args.full)
    plan.load()  # a bad --config/--set stops here, once, not once per model
    # Children run from the repository root; relative paths in the config (outputs, mlflow.db) mean the same here.
    os.chdir(PROJECT_ROOT)
    experiments, files = run_all(plan, models, resume=args.resume, echo=not args.quiet)
    print("\n" + "\n".join(summary_lines(experiments)))
    print("\n📁 " + "\n📁 ".join(str(f) for f in files))
    failed = [e.model for e in experiments if e.status != "SUCCESS"]
    if failed:
        print(f"❌ {len(failed)} of {len(experiments)} experiment(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    run(main, get_args_parser())

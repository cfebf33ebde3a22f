"""GPU monitoring for medical AI training: system and GPU readings, GPU processes and advice.

    python monitor_gpu.py                 # redraw every 2 s until Ctrl-C
    python monitor_gpu.py -i 3            # every 3 s
    python monitor_gpu.py --once --save gpu_metrics.json
    python monitor_gpu.py --count 60 -i 1 --save gpu_log.jsonl   # one JSON line per refresh

Readings through NVML (nvidia-ml-py) in-process, no nvidia-smi subprocess; thresholds in
config.yaml under monitoring.gpu. Without an NVIDIA GPU it shows the system part and exits 0.
"""
from __future__ import annotations

import argparse

from core.cli import add_common_args, config_from_args, run
from ops.gpu_monitor import monitor


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Monitor GPUs (NVML) and system load beside a training run, "
                                            "with recommendations (thresholds: monitoring.gpu in the config)")
    add_common_args(p, model=False)
    p.add_argument("-i", "--interval", type=float, default=2.0, metavar="SECONDS",
                   help="seconds between refreshes (default: 2)")
    p.add_argument("--once", action="store_true", help="print the status once and exit")
    p.add_argument("--count", type=int, default=None, metavar="N", help="stop after N refreshes (default: until "
                                                                        "Ctrl-C)")
    p.add_argument("--save", default=None, metavar="FILE.json",
                   help="write the readings: one JSON document with --once, else one JSON line appended per refresh")
    p.add_argument("--no-processes", action="store_true", help="hide (and do not save) the GPU process list")
    return p


def main(args) -> int:
    cfg = config_from_args(args)
    return monitor(cfg.monitoring.gpu, interval=args.interval, once=args.once, count=args.count,
                   save=args.save, processes=not args.no_processes)


if __name__ == "__main__":
    run(main, get_args_parser())

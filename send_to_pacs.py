"""Send predictions on DICOM files to a PACS: a Comprehensive SR and a burned-in secondary capture per file,
in the study of the source, by C-STORE.

    python inference_with_mlflow.py --model brain-cancer-resnet18 --alias production --image study/ --json \\
        > study/predictions.json
    python send_to_pacs.py study/ --host 127.0.0.1 --port 4242 --ae-title ORTHANC

RESULT_DIR holds predictions.json (inference_with_mlflow.py --json) and the DICOM files it names. Results
wait in the spool (pacs.spool_dir) when the PACS is down; run the command again to send them. A result is
never sent twice. Exit code 0 when everything was sent, 1 when something waits or was skipped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.cli import add_common_args, config_from_args, run
from core.errors import UserError
from data.images import configure_limits
from pacs.manual import queue_results
from pacs.sender import Forwarder
from pacs.spool import Spool


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Send predictions on DICOM files to a PACS as SR + secondary capture")
    add_common_args(p, model=False)
    p.add_argument("result_dir", metavar="RESULT_DIR", help="folder with predictions.json and its DICOM files")
    p.add_argument("--host", default=None, help="the PACS's address (default: pacs.destination)")
    p.add_argument("--port", type=int, default=None, help="the PACS's DICOM port, e.g. 4242")
    p.add_argument("--ae-title", default=None, help="the PACS's AE title, e.g. ORTHANC")
    p.add_argument("--calling-ae", default=None, help="our AE title (default: pacs.ae_title, MRI_AI)")
    p.add_argument("--refer-below", type=float, default=None,
                   help="set the refer flag when the top probability is below this (default: pacs.refer_below)")
    return p


def destination_flag(args) -> str | None:
    given = [args.host, args.port, args.ae_title]
    if all(v is None for v in given):
        return None
    if any(v is None for v in given):
        raise UserError("give --host, --port and --ae-title together (or set pacs.destination)")
    return f"{args.ae_title}@{args.host}:{args.port}"


def main(args) -> int:
    cfg = config_from_args(args, **{"pacs.destination": destination_flag(args), "pacs.ae_title": args.calling_ae,
                                    "pacs.refer_below": args.refer_below})
    configure_limits(cfg)  # this run's images: bounds on every decoder
    settings, result_dir = cfg.pacs, Path(args.result_dir)
    if settings.destination_peer is None:
        raise UserError("no destination: give --host, --port and --ae-title (or set pacs.destination)")
    if not result_dir.is_dir():
        raise UserError(f"{result_dir} is not a folder")
    spool = Spool(settings.spool_dir, settings.destination_peer).acquire()
    try:
        queued, problems = queue_results(result_dir, spool, settings)
        report = Forwarder(spool, settings).send_pending()
    finally:
        spool.release()
    for line in problems:
        print(f"skipped {line}", file=sys.stderr)
    print(f"{queued} result(s) queued, {report.sent} sent to {settings.destination_peer}, "
          f"{report.remaining} waiting in {spool.dir}" + (f" ({report.error})" if report.error else ""))
    return 0 if not (problems or report.remaining) else 1


if __name__ == "__main__":
    run(main, get_args_parser())

"""Serve a registered model over HTTP: predictions, Grad-CAM, the model card, metrics, and an audit log.

    python serve.py --model brain-cancer-resnet18 --alias production          # http://127.0.0.1:8000
    python serve.py --model brain-cancer-resnet18 --host 0.0.0.0 --token-file /etc/mri/token --workers 2
    curl -F files=@scan.jpg http://127.0.0.1:8000/v1/predict
    python serve.py add-reviewer alice --password-file alice.pw     # a login for the review page
    python serve.py --model brain-cancer-resnet18 --review          # the review page at http://127.0.0.1:8000/
    python serve.py export-reviews reviewed/                          # the verdicts as a training set
    python serve.py --model brain-cancer-resnet18 --dicom-port 11112 --pacs-destination ORTHANC@127.0.0.1:4242

The ONNX flavor runs in ONNX Runtime (PyTorch only for /v1/explain). Every prediction is committed to the audit
database (--database, sqlite by default) before it is answered. Any address other than loopback needs
--token-file. --dicom-port runs a DICOM receiver beside the API (one server process): every frame a PACS sends
is classified, recorded and (with --review) put on the worklist; an SR and secondary captures go back into
the study at --pacs-destination. Other settings: --set serving.KEY=VALUE (config/config.yaml, section serving).
A first word that names a subcommand runs it instead (python serve.py SUBCOMMAND --help).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from core.cli import RefuseSecret, add_common_args, add_registered_model_args, config_from_args, run
from core.errors import UserError
from data.images import configure_limits
from deploy.registry import PRODUCTION, registered_name, validate_alias
from pacs.extension import dicom_extension
from review import commands as review_commands
from review.extension import review_extension
from review.station import ReviewStation
from series.rule import SeriesRule
from serving.app import Extension, app_from_environment
from serving.options import ServeOptions
from serving.runner import run_server

# name -> (get_args_parser, main): `python serve.py NAME ...` runs it; anything else runs the server.
SUBCOMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {
    "add-reviewer": (review_commands.add_reviewer_parser, review_commands.add_reviewer_main),
    "export-reviews": (review_commands.export_parser, review_commands.export_main),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a registered model over HTTP (FastAPI + uvicorn), with an "
                                            "audit log of every prediction")
    add_common_args(p, model=False)
    add_registered_model_args(p, f"serve the version this alias points at, and follow it (default: {PRODUCTION})",
                              "serve this version number, pinned")
    p.add_argument("--flavor", default="auto", help="auto (ONNX when registered), onnx, onnx-int8 (the int8 model "
                                                    "of a release registered with --int8), pytorch, or another "
                                                    "flavor the registry holds for the version")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; others need --token-file)")
    p.add_argument("--port", type=int, default=None, help="default 8000")
    p.add_argument("--workers", type=int, default=None, help="server processes (default 1)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="a file holding the bearer token every client must send (all paths but /healthz, /readyz)")
    p.add_argument("--token", action=RefuseSecret, instead="put it in a file (chmod 600) and give --token-file FILE")
    p.add_argument("--database", default=None, metavar="URL",
                   help="audit database URL (default sqlite:///audit.db; postgresql+psycopg://... for several "
                        "servers)")
    p.add_argument("--max-batch", type=int, default=None, help="images per model call (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="how long a batch waits for more (default 5)")
    p.add_argument("--queue-size", type=int, default=None,
                   help="requests in the server at once; more get 503 + Retry-After (default 64)")
    p.add_argument("--poll-seconds", type=float, default=None,
                   help="check the alias for a new version this often (default 30; 0: never)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="URL",
                   help="allow browser calls from this origin (repeatable; default: CORS off)")
    p.add_argument("--review", action="store_true",
                   help="serve the review page at / (worklist, case view, verdicts; reviewers log in: "
                        "python serve.py add-reviewer NAME --password-file FILE; settings: review.* in the config)")
    add_dicom_args(p)
    return p


def add_dicom_args(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("DICOM receiver (docs/deployment.md, section PACS)")
    d.add_argument("--dicom-port", type=int, default=None, metavar="PORT",
                   help="run a DICOM Storage SCP on this port beside the API (pacs.port; pacs.enabled: true does the "
                        "same with the configured port); needs --workers 1")
    d.add_argument("--ae-title", default=None, help="the receiver's AE title (default pacs.ae_title, MRI_AI)")
    d.add_argument("--pacs-destination", default=None, metavar="AE@HOST:PORT",
                   help="where the SR and secondary captures go, e.g. ORTHANC@127.0.0.1:4242 (pacs.destination; "
                        "it may also send images)")
    d.add_argument("--dicom-allow", action="append", default=None, metavar="AE@HOST",
                   help="a calling peer that may send images (repeatable; replaces pacs.allow)")


def dicom_flags(args) -> dict:
    """The DICOM flags as pacs.* config keys (None: not given); --dicom-port turns the receiver on."""
    return {"pacs.enabled": True if args.dicom_port is not None else None, "pacs.port": args.dicom_port,
            "pacs.ae_title": args.ae_title, "pacs.destination": args.pacs_destination,
            "pacs.allow": args.dicom_allow}


def options_from_args(args) -> ServeOptions:
    flags = {"host": args.host, "port": args.port, "workers": args.workers, "token_file": args.token_file,
             "database_url": args.database, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
             "queue_size": args.queue_size, "poll_seconds": args.poll_seconds, "cors_origins": args.cors_origin}
    dicom = dicom_flags(args)
    cfg = config_from_args(args, **{f"serving.{k}": v for k, v in flags.items()}, **dicom)
    configure_limits(cfg)  # this run's images: bounds on every decoder
    if not cfg.pacs.enabled and any(v is not None for v in dicom.values()):
        raise UserError("DICOM flags without the receiver: give --dicom-port PORT (or set pacs.enabled: true)")
    alias = None if args.version is not None else validate_alias(args.alias) or PRODUCTION
    extensions = (["review"] if args.review else []) + (["dicom"] if cfg.pacs.enabled else [])
    return ServeOptions(cfg.to_values(), registered_name(args.registered_model), alias, args.version, args.flavor,
                        extensions)


def build_extensions(options: ServeOptions) -> list[Extension]:
    """The review page and the DICOM node of one server process, wired here: the node puts its instances on this
    process's worklist."""
    station = (ReviewStation(options.cfg.review, SeriesRule.from_config(options.cfg.series),
                             options.cfg.pacs.keep_patient_identity) if "review" in options.extensions else None)
    built = [review_extension(station)] if station else []
    if "dicom" in options.extensions:
        built.append(dicom_extension(options.cfg, station.add_case if station else None))
    return built


def worker_app():
    """uvicorn's factory in every server process (--workers N): the app and its extensions."""
    return app_from_environment(build_extensions)


def main(args) -> int:
    run_server(options_from_args(args), build_extensions, "serve:worker_app")
    return 0


def cli(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        parser, command = SUBCOMMANDS[argv[0]]
        run(command, parser(), argv[1:])
    run(main, get_args_parser(), argv)


if __name__ == "__main__":
    cli()

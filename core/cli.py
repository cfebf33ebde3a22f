"""What every script shares on its command line: --config, --set, --demo, and clean user-error exits."""
from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from core.errors import UserError
from core.signals import TERMINATED_EXIT, Terminated


def add_common_args(parser: argparse.ArgumentParser, model: bool = True, checkpoint: bool = False,
                    device: bool = False) -> argparse.ArgumentParser:
    """--config, --set, --demo, --resplit, and on request --model, --checkpoint, --device."""
    parser.allow_abbrev = False  # --password X must not pass for --password-file X (argparse reads it at parse time)
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="YAML deep-merged over config/config.yaml (e.g. config/optimized_config.yaml)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value (repeatable), e.g. --set train.epochs=3")
    parser.add_argument("--demo", nargs="?", const="jpeg", default=False, choices=("jpeg", "dicom"),
                        help="use the embedded synthetic demo data set (generated on first use; not medical data); "
                             "--demo dicom: its variant of MR series as DICOM files")
    parser.add_argument("--resplit", action="store_true",
                        help="make a new split manifest when the data set on disk no longer matches the old one")
    if model:
        parser.add_argument("--model", default=None, help="model name from the config's models table (e.g. resnet18)")
    if checkpoint:
        parser.add_argument("--checkpoint", default=None, metavar="PATH",
                            help="default: checkpoints/{model}_outputs/best_model.pth")
    if device:
        parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    return parser


def add_registered_model_args(parser: argparse.ArgumentParser, alias_help: str = "model version alias (default: "
                              "production)", version_help: str = "model version number") -> argparse._ArgumentGroup:
    """--model (a registered model) and one of --alias / --version, as every script that reads the registry takes
    them; returns the --alias/--version group for a script that adds another way to choose."""
    parser.add_argument("--model", dest="registered_model", required=True,
                        help="registered model, e.g. brain-cancer-resnet18 (or the zoo name resnet18)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--alias", default=None, help=alias_help)
    which.add_argument("--version", default=None, help=version_help)
    return which


def same_data_flags(args: argparse.Namespace) -> str:
    """The flags a printed next command needs to find what this one used (--demo, --config, --set), shell-quoted,
    with a leading space: a hint that is copied and run works."""
    import shlex

    words = []
    if getattr(args, "demo", False):
        words += ["--demo"] if args.demo in (True, "jpeg") else ["--demo", args.demo]
    if getattr(args, "config", None):
        words += ["--config", args.config]
    for assignment in getattr(args, "sets", None) or []:
        words += ["--set", assignment]
    return "".join(" " + shlex.quote(str(w)) for w in words)


class RefuseSecret(argparse.Action):
    """An option that takes a secret on the command line (where `ps` and the shell history show it): refused
    without repeating the value."""

    def __init__(self, option_strings, dest, instead: str = "", **kwargs):
        self.instead = instead
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not taken on the command line, where ps and the shell history show it; "
                     f"{self.instead}")


def warn_if_readable(path: str | Path, what: str) -> None:
    """One line on stderr when a file holding a secret may be read by its group or others (chmod 600)."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        print(f"warning: {what} {path} is readable by others (mode {stat.S_IMODE(mode):o}): chmod 600 {path}",
              file=sys.stderr)


def config_from_args(args: argparse.Namespace, **overrides):
    """Resolve the config from the common flags; `overrides` are explicit flags as dotted keys."""
    from core.config import load_config

    flags = {"model": getattr(args, "model", None)}
    flags.update(overrides)
    return load_config(args.config, args.sets, args.demo, flags)


def run(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser, argv=None) -> None:
    """Parse, run, and turn user errors into one line on stderr and a non-zero exit (no traceback)."""
    args = parser.parse_args(argv)
    try:
        code = main(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(TERMINATED_EXIT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)

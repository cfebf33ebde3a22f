"""Deployment of registered versions: point an alias at a version, roll it back, list what runs where.

    python deploy_model.py list --model resnet18
    python deploy_model.py promote --model resnet18 --version 3 --alias production
    python deploy_model.py rollback --model resnet18 --alias production
    python deploy_model.py promote --model resnet18 --version 3 --alias production \\
        --serve-url http://127.0.0.1:8000 --token-file ~/.brain-mri/admin.token    # and reload the running server

@production only ever points at a version that passed the gates and was not forced (registry.promote_on: ci_lower
judges the CIs' lower bounds). Each move is kept in the version tags; rollback returns to the version that held
the alias before. Both flavors (PyTorch and ONNX) move together.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from core.cli import add_common_args, config_from_args, run, same_data_flags
from core.errors import UserError
from data.images import configure_limits
from deploy.aliases import deployment_lines, describe, move_alias, rollback_alias
from deploy.registry import connect, registered_name, resolve_version, validate_alias

HOW = "deploy_model.py"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the bearer token to wherever it points: refuse it (it surfaces as an HTTPError)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Point registry aliases at model versions, roll back, list deployments")
    commands = p.add_subparsers(dest="command", required=True, metavar="{list,promote,rollback}")
    listing = commands.add_parser("list", help="aliases -> versions and every version's validation status")
    promote = commands.add_parser("promote", help="point an alias at a version (both flavors)")
    rollback = commands.add_parser("rollback", help="return an alias to the version that held it before")
    for sub in (listing, promote, rollback):
        add_common_args(sub)
    for sub in (promote, rollback):
        sub.add_argument("--alias", default="production", help="the alias to move (default: production)")
        sub.add_argument("--serve-url", default=None, metavar="URL",
                         help="a running serve.py to reload afterwards (POST URL/admin/reload)")
        sub.add_argument("--token-file", default=None, metavar="FILE", help="the server's admin token (with "
                                                                            "--serve-url)")
    promote.add_argument("--version", required=True, help="the model version number (see: deploy_model.py list)")
    return p


def main(args) -> int:
    cfg = config_from_args(args)
    configure_limits(cfg)  # this run's images: bounds on every decoder
    name = registered_name(cfg.model)
    client = connect(cfg.monitoring.mlflow)
    promote_on = cfg.registry.promote_on
    if args.command == "list":
        print("\n".join(deployment_lines(client, name, promote_on)))
        return 0
    alias = validate_alias(args.alias)
    token = read_token(args.token_file) if args.serve_url else None
    if args.command == "promote":
        moves = move_alias(client, resolve_version(client, name, version=args.version), alias, HOW, promote_on)
    else:
        moves = rollback_alias(client, name, alias, HOW, promote_on)
    print(describe(moves))
    if args.serve_url:
        notify_server(args.serve_url, token)
    print(f"🔮 Predict: python inference_with_mlflow.py --model {name} --alias {alias} --image PATH"
          f"{same_data_flags(args)}")
    return 0


def read_token(path: str | None) -> str:
    if not path:
        raise UserError("--serve-url needs --token-file (the server's admin token)")
    file = Path(path).expanduser()
    try:
        token = file.read_text().strip()
    except OSError as exc:
        raise UserError(f"cannot read the token file {file}: {exc.strerror or exc}") from None
    if len(token.split()) != 1 or not token.isprintable():  # never echo it: it is a credential
        raise UserError(f"the token file {file} must hold one token on one line")
    if os.name == "posix" and file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {file} is readable by other users (chmod 600 {file})", file=sys.stderr)
    return token


def notify_server(url: str, token: str, timeout: float = 30.0) -> None:
    """POST {url}/admin/reload; a server that cannot be reached costs one warning (the registry already moved)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"--serve-url {url!r}: use http(s)://HOST:PORT")
    if parsed.scheme == "http" and parsed.hostname not in LOOPBACK:
        print(f"warning: {url} is plain HTTP: the token crosses the network unencrypted", file=sys.stderr)
    request = urllib.request.Request(f"{url.rstrip('/')}/admin/reload", method="POST", data=b"",
                                     headers={"Authorization": f"Bearer {token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)  # straight to the server
    try:
        with opener.open(request, timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        print(f"warning: {url} refused the reload (HTTP {exc.code} {exc.reason}); the registry is updated",
              file=sys.stderr)
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"warning: cannot reach {url} to reload ({reason}); the registry is updated, reload the server "
              "yourself", file=sys.stderr)
        return
    alias = f" @{body['alias']}" if body.get("alias") else ""
    print(f"🔄 Server {url} reloaded: {body.get('model')} v{body.get('version')}{alias}")


if __name__ == "__main__":
    run(main, get_args_parser())

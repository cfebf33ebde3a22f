"""What every request passes before any work is done for it: the token, the queue, the body's size and deadline.

A pure ASGI middleware, so a refused request costs no body read and no form parsing:
- the Host header (loopback names and serving.allowed_hosts; checked without a token, or when hosts are named)
  and, on requests that change state, the Origin: a page elsewhere cannot reach the API through DNS rebinding;
- the bearer token (when the server has one) on every path except the health checks and the paths an
  extension authenticates itself (a login page);
- admission: requests that run the model count against `queue_size` once their body has arrived (a slow upload
  holds no place; one address sends at most MAX_UPLOADS_PER_CLIENT bodies at once, 429 beyond); beyond it, 503;
- the body: a Content-Length above the cap is refused at once (413); a body that grows past it while
  streaming (413) or does not arrive within `request_timeout_s` (408) stops the request.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

from core.cli import warn_if_readable
from core.errors import UserError

PUBLIC_PATHS = ("/healthz", "/readyz")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MAX_UPLOADS_PER_CLIENT = 16  # bodies one address may be sending at once (slow clients held every queue place)


@dataclass
class GuardPolicy:
    token: str | None
    max_body_bytes: int
    request_timeout_s: float
    admitted_prefixes: tuple[str, ...]     # paths that run the model: they take a place in the queue
    exempt_prefixes: tuple[str, ...] = ()  # paths with their own authentication
    exempt_paths: tuple[str, ...] = ()     # the same, matched exactly
    allowed_hosts: tuple[str, ...] | None = None  # Host names served besides loopback ones (None: any Host)
    allowed_origins: tuple[str, ...] = ()  # cross-origin callers allowed to change state (serving.cors_origins)


def bearer_ok(headers: dict[bytes, bytes], token: str) -> bool:
    scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": payload})


class Guard:
    """ASGI middleware; `admission` is the service's (enter, leave, retry_after_s, count_error) set."""

    def __init__(self, app, policy: GuardPolicy, admission: Admission):
        self.app, self.policy, self.admission = app, policy, admission
        self._uploading: dict[str, int] = {}  # client address -> bodies being received (one event loop: no lock)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, p = scope["path"], self.policy
        headers = dict(scope["headers"])
        refusal = self._wrong_host_or_origin(scope["method"], headers)
        if refusal:
            self.admission.count_error("forbidden_origin")
            return await send_json(send, refusal[0], {"detail": refusal[1]})
        exempt = (path in PUBLIC_PATHS or path in p.exempt_paths or path.startswith(p.exempt_prefixes)
                  or scope["method"] == "OPTIONS")
        if p.token and not exempt and not bearer_ok(headers, p.token):
            self.admission.count_error("unauthorized")
            return await send_json(send, 401, {"detail": "missing or wrong bearer token"},
                                   [(b"www-authenticate", b'Bearer realm="brain-mri"')])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > p.max_body_bytes:
            self.admission.count_error("too_large")
            return await send_json(send, 413, {"detail": f"request body over the {p.max_body_bytes:,} byte limit"})
        receive = self._bounded(receive) if scope["method"] in ("POST", "PUT", "PATCH") else receive
        if not under(path, p.admitted_prefixes):
            return await self.app(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):  # a queue place only once the body is here
            client = (scope.get("client") or ("?", 0))[0]
            if self._uploading.get(client, 0) >= MAX_UPLOADS_PER_CLIENT:
                self.admission.count_error("too_many_uploads")
                return await send_json(send, 429, {"detail": f"more than {MAX_UPLOADS_PER_CLIENT} uploads in "
                                                             "progress from this address; retry later"},
                                       [(b"retry-after", b"5")])
            self._uploading[client] = self._uploading.get(client, 0) + 1
            try:
                body = await read_body(receive)
            except HTTPException as exc:
                return await send_json(send, exc.status_code, {"detail": exc.detail})
            finally:
                self._uploading[client] -= 1
                if not self._uploading[client]:
                    del self._uploading[client]
            if body is None:  # the client left
                return None
            receive = replay(body, receive)
        if not self.admission.enter():
            self.admission.count_error("overloaded")
            retry = str(max(1, math.ceil(self.admission.retry_after_s()))).encode()
            return await send_json(send, 503, {"detail": "the server is at its queue limit; retry later"},
                                   [(b"retry-after", retry)])
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.leave()

    def _wrong_host_or_origin(self, method: str, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        """A Host the server is not known by (DNS rebinding: evil.example resolved to 127.0.0.1), or a state-changing
        request from another site's page (its Origin), as (status, reason); None when both are fine."""
        p = self.policy
        if p.allowed_hosts is None:
            return None
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_allowed(host, p.allowed_hosts):
            return 400, "unknown Host header; add the name to serving.allowed_hosts"
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and method not in SAFE_METHODS and origin not in p.allowed_origins:
            netloc = urlsplit(origin).netloc
            if origin == "null" or not host_allowed(netloc, p.allowed_hosts):
                return 403, "cross-origin request refused (Origin is not this server)"
        return None

    def _bounded(self, receive):
        """receive() with the body's size cap and its deadline (raised as HTTP errors the app answers)."""
        p = self.policy
        deadline = time.monotonic() + p.request_timeout_s
        state = {"bytes": 0, "done": False}

        async def bounded_receive():
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.admission.count_error("timeout")
                raise HTTPException(408, f"request body not received within {p.request_timeout_s:g} s") from None
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
                if state["bytes"] > p.max_body_bytes:
                    self.admission.count_error("too_large")
                    raise HTTPException(413, f"request body over the {p.max_body_bytes:,} byte limit")
            return message

        return bounded_receive


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """A Host header (name[:port]) naming a loopback address, or listed in `allowed` (name or name:port)."""
    name = urlsplit(f"//{host}").hostname or ""
    return bool(name) and (is_loopback(name) or name in allowed or host.lower() in allowed)


async def read_body(receive) -> bytes | None:
    """The whole request body (bounded by the guard's receive), or None when the client disconnected."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """receive() that hands the app the body already read, then waits on the connection as before."""
    state = {"sent": False}

    async def replayed():
        if state["sent"]:
            return await receive()
        state["sent"] = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


def under(path: str, prefixes: tuple[str, ...]) -> bool:
    """The path is one of the prefixes or below one (/v1/predict, not /v1/predictions; "/x/" matches below /x/)."""
    return any(path == pre or path.startswith(pre if pre.endswith("/") else pre + "/") for pre in prefixes)


@dataclass
class Admission:
    """The queue's bookkeeping, kept by the service; the guard only asks."""
    enter: Callable[[], bool]
    leave: Callable[[], None]
    retry_after_s: Callable[[], float]
    count_error: Callable[[str], None]


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: the only addresses served without a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: str | None) -> str | None:
    """The bearer token in a file (never on the command line, where `ps` shows it); at least 16 characters."""
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UserError(f"cannot read the token file {path}: {exc.strerror}") from None
    warn_if_readable(path, "the token file")
    if len(token) < 16 or any(c.isspace() for c in token):
        raise UserError(f"the token in {path} must be one word of at least 16 characters "
                        "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > token)")
    return token


def check_bind(host: str, token_file: str | None) -> None:
    if not is_loopback(host) and not token_file:
        raise UserError(f"--host {host} is reachable from other machines: give --token-file FILE (a bearer token "
                        "every client must send), or bind 127.0.0.1 behind a reverse proxy")

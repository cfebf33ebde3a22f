"""Reviewers and their logins: argon2id password hashes in the database, a random session token in an
HttpOnly SameSite=Strict cookie (only its sha256 is stored), and a CSRF token per session for every form."""
from __future__ import annotations

import getpass
import hashlib
import hmac
import re
import secrets
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, delete, func, insert, select, update

from core.cli import warn_if_readable
from core.errors import UserError
from review.schema import login_failures, reviewers, sessions

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_PASSWORD = 10
_hasher = PasswordHasher()  # argon2id with the library's current parameters
_DUMMY = _hasher.hash("a password nobody has")  # an unknown name costs what a wrong password costs


@dataclass(frozen=True)
class Reviewer:
    id: int
    name: str
    csrf: str


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise UserError(f"reviewer name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                        "or digit")
    return name


def read_password(path: str | None) -> str:
    """The password in a file, or typed twice at a terminal; never on the command line, where `ps` and the
    shell history show it."""
    if path is None:
        if not sys.stdin.isatty():
            raise UserError("give --password-file FILE (or run at a terminal to type the password)")
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise UserError("the two passwords differ")
        where = "the password"
    else:
        try:
            password = open(path, encoding="utf-8").read().rstrip("\r\n")
        except OSError as exc:
            raise UserError(f"cannot read the password file {path}: {exc.strerror}") from None
        where = f"the password in {path}"
    if len(password) < MIN_PASSWORD:
        raise UserError(f"{where} has {len(password)} characters; at least {MIN_PASSWORD} please")
    if path is not None:
        warn_if_readable(path, "the password file")
    return password


def reviewer_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(reviewers)).scalar_one()


def add_reviewer(engine: Engine, name: str, password: str, replace: bool = False) -> bool:
    """Add a reviewer (or set a new password with replace=True); True when the name was new."""
    check_name(name)
    digest = _hasher.hash(password)
    with engine.begin() as conn:
        found = conn.execute(select(reviewers.c.id).where(reviewers.c.name == name)).scalar()
        if found is not None and not replace:
            raise UserError(f"reviewer {name!r} exists already (--reset sets a new password)")
        if found is None:
            conn.execute(insert(reviewers).values(name=name, password_hash=digest, created_at=_now()))
            return True
        conn.execute(update(reviewers).where(reviewers.c.id == found).values(password_hash=digest))
        conn.execute(delete(sessions).where(sessions.c.reviewer_id == found))  # old logins end with the old password
        return False


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def log_in(engine: Engine, name: str, password: str, hours: float) -> str | None:
    """A new session token for a right name and password, else None (the same work either way)."""
    with engine.connect() as conn:
        row = conn.execute(select(reviewers.c.id, reviewers.c.password_hash)
                           .where(reviewers.c.name == name)).first()
    try:
        _hasher.verify(row.password_hash if row else _DUMMY, password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None:
        return None
    token = secrets.token_urlsafe(32)
    now = _now()
    with engine.begin() as conn:
        conn.execute(delete(sessions).where(sessions.c.expires_at < now))
        conn.execute(insert(sessions).values(token_sha256=_token_hash(token), reviewer_id=row.id,
                                             csrf=secrets.token_urlsafe(32), created_at=now,
                                             expires_at=now + timedelta(hours=hours)))
    return token


def reviewer_for(engine: Engine, token: str | None) -> Reviewer | None:
    """The reviewer a session token belongs to, while the session lasts."""
    if not token:
        return None
    with engine.connect() as conn:
        row = conn.execute(select(reviewers.c.id, reviewers.c.name, sessions.c.csrf, sessions.c.expires_at)
                           .join(sessions, sessions.c.reviewer_id == reviewers.c.id)
                           .where(sessions.c.token_sha256 == _token_hash(token))).first()
    if row is None:
        return None
    expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=timezone.utc)
    return Reviewer(row.id, row.name, row.csrf) if expires > _now() else None


def log_out(engine: Engine, token: str | None) -> None:
    if token:
        with engine.begin() as conn:
            conn.execute(delete(sessions).where(sessions.c.token_sha256 == _token_hash(token)))


def same_token(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


class Throttle:
    """Back-off per client address and per login name: after FREE failures in a row, each further attempt must
    wait twice as long as the last (up to MAX_WAIT_S), and is refused unchecked until then; a success clears it."""
    FREE = 5
    MAX_WAIT_S = 300.0

    def __init__(self):
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (failures in a row, time of the last)
        self._lock = threading.Lock()

    def wait_s(self, keys: list[str], now: float) -> float:
        with self._lock:
            waits = [last + min(self.MAX_WAIT_S, 2.0 ** (n - self.FREE)) - now
                     for n, last in (self._failures.get(k, (0, 0.0)) for k in keys) if n >= self.FREE]
        return max([0.0, *waits])

    def failed(self, keys: list[str], now: float) -> None:
        with self._lock:
            for key in keys:
                self._failures[key] = (self._failures.get(key, (0, 0.0))[0] + 1, now)
            if len(self._failures) > 100_000:  # a spray of names: forget the oldest half
                for key in sorted(self._failures, key=lambda k: self._failures[k][1])[:50_000]:
                    del self._failures[key]

    def succeeded(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)


def record_failure(engine: Engine, name: str, client: str | None, throttled: bool) -> None:
    with engine.begin() as conn:
        conn.execute(insert(login_failures).values(at=_now(), name=name[:64], client=client, throttled=throttled))

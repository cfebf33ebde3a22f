"""A throwaway PostgreSQL for tests (Debian's `postgresql` package): initdb in a temporary folder, pg_ctl on a free
127.0.0.1 port with password authentication over TCP (the socket, in the private folder, trusts its owner), a
role with a password full of URL-special characters, one fresh database per test; stopped and removed by the
test. Run as root it runs the server as the `postgres` user (the server refuses root)."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

from server_process import free_port

ROLE, PASSWORD = "mri_ai", "s3cret:p@ss/w%rd?#"  # every character a URL must escape


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries installed (Debian keeps them out of PATH), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """`start()`, `new_database()` -> a SQLAlchemy URL with the role's credentials, `stop()`."""

    def __init__(self):
        self.bin = postgres_bin()
        if self.bin is None:
            raise FileNotFoundError("no PostgreSQL server installed (Debian: apt-get install postgresql)")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="brain-mri-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.user = "postgres" if os.geteuid() == 0 else None  # the server refuses to run as root

    def _run(self, *argv: str, **kwargs) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        return subprocess.run([*prefix, *argv], check=True, capture_output=True, text=True, timeout=120, **kwargs)

    def start(self) -> PostgresServer:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.user:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                  "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-instructions")
        pwfile.unlink()
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        self.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
        return self

    def sql(self, statement: str, database: str = "postgres") -> str:
        """One statement as the superuser over the server's own socket (psql, as the Debian package ships it)."""
        psql = self.bin / "psql" if (self.bin / "psql").exists() else "psql"
        return self._run(str(psql), "-h", str(self.root), "-p", str(self.port), "-U", "postgres", "-d", database,
                         "-v", "ON_ERROR_STOP=1", "-At", "-c", statement).stdout

    def new_database(self) -> str:
        """A fresh database owned by the role; its SQLAlchemy URL with user and password (escaped) in it."""
        name = f"audit_{uuid.uuid4().hex[:12]}"
        self.sql(f"CREATE DATABASE {name} OWNER {ROLE}")
        return f"postgresql+psycopg://{ROLE}:{quote(PASSWORD, safe='')}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

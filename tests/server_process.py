"""A real `serve.py` in a child process on a free 127.0.0.1 port, for tests: started, waited for, stopped."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_token(folder: Path, token: str = "test-token-0123456789abcdef") -> tuple[Path, str]:
    path = Path(folder) / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path, token


class ServerProcess:
    """`python serve.py ARGS --port P` in its own process group; `url`, `wait_ready`, `stop`, `kill9`, `log`."""

    def __init__(self, args: list, workdir: Path, token: str | None = None):
        self.port, self.workdir, self.token = free_port(), Path(workdir), token
        argv = [sys.executable, str(ROOT / "serve.py"), *map(str, args), "--port", str(self.port)]
        # the server's temp folders (uploads, model copies) in the test's folder: removed with it, even after kill -9
        self.start(argv, {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(self.workdir)})

    @classmethod
    def by_command(cls, argv: list[str], env: dict, workdir: Path, port: int, token: str | None = None):
        """A server that another command starts (a container's entrypoint), listening on `port`."""
        self = cls.__new__(cls)
        self.port, self.workdir, self.token = port, Path(workdir), token
        self.start(argv, {**env, "TMPDIR": str(self.workdir)})
        return self

    def start(self, argv: list[str], env: dict) -> None:
        """The server's command in its own process group, its output in the log."""
        self.log_path = self.workdir / f"server-{self.port}.log"
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, cwd=self.workdir, stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kwargs.pop("timeout", 120), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.py exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"serve.py not ready after {timeout} s:\n{self.log()[-3000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()

    def kill9(self) -> None:
        """SIGKILL to the server and every worker process: nothing gets to clean up."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log_file.close()

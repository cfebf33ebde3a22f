"""start_mlflow_server.sh: starts on loopback, answers HTTP, stops; refuses to expose itself by accident."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import ROOT, stop_process_group, tool_env

SCRIPT = ROOT / "start_mlflow_server.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_answers_on_loopback_and_stops(tmp_path):
    port = free_port()
    env = tool_env(MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
                   MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "mlartifacts"))
    log = open(tmp_path / "server.log", "w")
    # its own process group: stopping it stops every process mlflow started
    proc = subprocess.Popen([str(SCRIPT), "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        body, deadline = None, time.time() + 120
        while body is None and time.time() < deadline and proc.poll() is None:
            try:
                url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5"
                body = json.loads(urllib.request.urlopen(url, timeout=2).read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, (tmp_path / "server.log").read_text()[-2000:]
        assert [e["name"] for e in body["experiments"]] == ["Default"]
        assert (tmp_path / "mlflow.db").is_file()
        banner = (tmp_path / "server.log").read_text()
        assert f"http://127.0.0.1:{port}" in banner
    finally:
        stop_process_group(proc)
        log.close()
    with socket.socket() as s:  # nothing kept listening on the port
        assert s.connect_ex(("127.0.0.1", port)) != 0


def stub(folder, name: str = "mlflow", says: str = "mlflow"):
    """An executable that prints what it was given instead of serving."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f'#!/bin/sh\necho "{says} $* telemetry-off=$MLFLOW_DISABLE_TELEMETRY"\n')
    path.chmod(0o755)
    return path


def test_the_mlflow_on_path_wins_over_the_checkouts_venv(tmp_path):
    """An activated environment (or a test's stand-in) is the mlflow the user chose: a .venv in the checkout is
    only the fallback when none is on PATH."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(SCRIPT, checkout / SCRIPT.name)
    stub(checkout / ".venv" / "bin", says="venv-mlflow")
    stub(tmp_path / "bin", says="path-mlflow")
    system = "/usr/bin:/bin"
    if shutil.which("mlflow", path=system):
        pytest.skip("an mlflow is installed system-wide: the fallback cannot be seen")
    argv = ["bash", str(checkout / SCRIPT.name), "--port", "5999", "--artifacts-destination", str(tmp_path / "art")]
    chose = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd="/",
                           env=dict(os.environ, PATH=f"{tmp_path / 'bin'}:{system}"))
    assert chose.returncode == 0 and "path-mlflow server" in chose.stdout, chose.stderr
    fallback = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd="/",
                              env=dict(os.environ, PATH=system))
    assert fallback.returncode == 0 and "venv-mlflow server" in fallback.stdout, fallback.stderr
    (checkout / ".venv" / "bin" / "mlflow").unlink()
    neither = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd="/",
                             env=dict(os.environ, PATH=system))
    assert neither.returncode == 2 and neither.stderr.startswith("error: mlflow not found")


def run_script_with(args: list[str], shell: str = "bash", env: dict | None = None, fake_mlflow=None):
    """The script under `shell` (bash, or bash --posix); with fake_mlflow, an `mlflow` on PATH that prints what it
    was given instead of serving (to see what would reach the real server, without opening a port)."""
    env = dict(os.environ if env is None else env)
    env.pop("MLFLOW_DISABLE_TELEMETRY", None)
    if fake_mlflow is not None:  # the script makes the artifacts folder before it starts mlflow: not in the checkout
        env.setdefault("MLFLOW_ARTIFACTS_DESTINATION", str(fake_mlflow.parent / "mlartifacts"))
        stub(fake_mlflow)
        env["PATH"] = f"{fake_mlflow}:{env['PATH']}"
    return subprocess.run([*shell.split(), str(SCRIPT), *args], capture_output=True, text=True, timeout=30, env=env,
                          cwd="/")


SHELLS = ["bash", "bash --posix"]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("args, says", [
    (["--host", "0.0.0.0"], "add --expose"),
    (["--host", "127.evil.example"], "add --expose"),  # 127.* is loopback only as four decimal octets
    (["--host", "127.0.0.256"], "add --expose"),
    (["--host", "localhost.evil.example"], "add --expose"),
    (["--host", "10.1.2.3", "--expose"], "--expose needs --allowed-hosts"),
    (["--host", "0.0.0.0", "--expose", "--allowed-hosts", "*"], "accepts anyone"),
    (["--host", "0.0.0.0", "--expose", "--allowed-hosts", "a.site:5000,,b"], "empty entry"),
    (["--cors-allowed-origins", "*"], "accepts anyone"),
    (["--", "--disable-security-middleware"], "--disable-security-middleware is not passed on"),
    (["--", "--gunicorn-opts", "--workers 4"], "without its host and CORS checks"),
    (["--", "--host", "0.0.0.0"], "--host goes before --"),
    (["--", "--allowed-hosts=*"], "--allowed-hosts goes before --"),
    (["--", "-h0.0.0.0"], "-h (--host) goes before --"),  # click's attached short value binds every interface
    (["--", "-h", "0.0.0.0"], "-h (--host) goes before --"),
    (["--port", "http"], "--port"),
    (["--frobnicate"], "unknown option"),
])
def test_refusals(args, says, shell, tmp_path):
    result = run_script_with(args, shell, fake_mlflow=tmp_path / "bin")
    assert result.returncode == 2 and says in result.stderr and result.stdout == ""  # nothing was started


@pytest.mark.parametrize("shell", SHELLS)
def test_a_switched_off_middleware_in_the_environment_is_refused(shell, tmp_path):
    env = dict(os.environ, MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE="true")
    result = run_script_with([], shell, env, fake_mlflow=tmp_path / "bin")
    assert result.returncode == 2 and "MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE" in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost", "LOCALHOST"])
def test_loopback_hosts_start_without_expose(host, shell, tmp_path):
    result = run_script_with(["--host", host], shell, fake_mlflow=tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    assert f"--host {host} --port 5000" in result.stdout and "--allowed-hosts" not in result.stdout
    assert "telemetry-off=true" in result.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_expose_passes_the_named_hosts_and_keeps_loopback_clients(shell, tmp_path):
    result = run_script_with(["--host", "0.0.0.0", "--expose", "--allowed-hosts", "mlflow.site:5000",
                              "--cors-allowed-origins", "https://notebook.site", "--", "--static-prefix", "/ml"],
                             shell, fake_mlflow=tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    assert ("--allowed-hosts mlflow.site:5000,localhost:5000,127.0.0.1:5000 --cors-allowed-origins "
            "https://notebook.site --static-prefix /ml") in result.stdout
    assert "WITHOUT authentication" in result.stderr


def test_the_script_uses_no_bash_4_syntax():
    """macOS ships bash 3.2: no case conversion, associative arrays, mapfile/readarray, ;& or |&, and an empty
    array expanded under `set -u` only through ${a[@]+...}."""
    text = SCRIPT.read_text()
    code = "\n".join(line.split("#")[0] if not line.startswith("#!") else "" for line in text.splitlines())
    for pattern in (r"\$\{\w+(,,|\^\^|,|\^)\}", r"declare -A|local -A|typeset -A", r"\bmapfile\b|\breadarray\b",
                    r";;&|;&", r"\|&", r"&>>"):
        assert not re.search(pattern, code), pattern
    for name in re.findall(r"(\w+)=\(\)", code):  # every array that may be empty is expanded guarded
        assert f'"${{{name}[@]}}"' not in code.replace(f'${{{name}[@]+"${{{name}[@]}}"}}', ""), name

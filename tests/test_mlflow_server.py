"""start_mlflow_server.sh: starts on loopback, answers HTTP, stops; refuses to expose itself by accident."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request

from conftest import ROOT, stop_process_group

SCRIPT = ROOT / "start_mlflow_server.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_answers_on_loopback_and_stops(tmp_path):
    port = free_port()
    env = dict(os.environ, MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
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


def test_non_loopback_host_needs_expose():
    result = subprocess.run([str(SCRIPT), "--host", "0.0.0.0"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--expose" in result.stderr


def test_bad_port_is_refused():
    result = subprocess.run([str(SCRIPT), "--port", "http"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--port" in result.stderr

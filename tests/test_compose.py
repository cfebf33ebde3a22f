"""container/compose.yaml as written, run without containers: its server (the image's entrypoint, with the
Dockerfile's ENV and the compose file's environment and command), a real PostgreSQL reached through the pgpass
file the compose file mounts, and a real Orthanc configured from the compose file's own variables. Only what a
container runtime provides is stood in for: service names resolve to localhost, the ports are free loopback
ports, /app is the checkout, /data and /run/secrets are folders of the test, and every bind is 127.0.0.1."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import yaml
from orthanc_server import Orthanc, requires_orthanc
from postgres_server import PASSWORD, ROLE
from pydicom.uid import generate_uid
from server_process import ServerProcess, free_port
from test_audit_db import postgres  # noqa: F401  (a fixture: a throwaway PostgreSQL)
from test_pacs_series import pictures, upload, wait_for, write_series  # noqa: F401  (pictures: a fixture)

from conftest import ROOT, tool_env
from pacs.report import read_series_report

COMPOSE = ROOT / "container" / "compose.yaml"
# A short quiet period: the series is complete when Orthanc releases the association
FAST_SERIES = ["--set", "pacs.series_complete=association", "--set", "pacs.retry.initial_s=0.2"]


def dockerfile_env() -> dict[str, str]:
    """The Dockerfile's ENV instructions (KEY=VALUE pairs, continued lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in shlex.split(line[4:]))
    return env


def interpolate(value: str, env: dict) -> str:
    """Compose's ${NAME:-default} and ${NAME:?message}, from `env`."""
    def one(m):
        name, op, rest = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        assert op != ":?", f"compose needs {name}: {rest}"
        return rest if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, str(value))


class Stack:
    """The compose file's names and ports mapped to this machine: {service: local port} for each published one."""

    def __init__(self, tmp, ports: dict[tuple[str, int], int]):
        self.tmp, self.ports = tmp, ports

    def local(self, text: str) -> str:
        for (name, port), here in self.ports.items():
            text = text.replace(f"{name}:{port}", f"localhost:{here}")
        return (text.replace("0.0.0.0", "127.0.0.1").replace("/run/secrets/", f"{self.tmp / 'secrets'}/")
                .replace("/data/", f"{self.tmp / 'data'}/"))


def pgpass_line(host: str, port: int, database: str) -> str:
    """A pgpass line: ':' and '\\' in a field are escaped with '\\' (the password here has a ':')."""
    def field(value) -> str:
        return str(value).replace("\\", "\\\\").replace(":", "\\:")
    return ":".join(map(field, (host, port, database, ROLE, PASSWORD))) + "\n"


@requires_orthanc
def test_the_compose_stack_takes_a_series_from_orthanc_audits_it_in_postgresql_and_sends_results_back(
        postgres, registered, pictures, tmp_path):  # noqa: F811 (fixtures imported above)
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert services["server"]["depends_on"].keys() >= {"postgres", "orthanc"}
    pg_env, orthanc_env = services["postgres"]["environment"], services["orthanc"]["environment"]
    (tmp_path / "secrets").mkdir()
    (tmp_path / "data").mkdir()

    # PostgreSQL as the compose file makes it: its role and database, the password only in the secret files
    assert pg_env["POSTGRES_USER"] == ROLE
    postgres.sql(f"CREATE DATABASE {pg_env['POSTGRES_DB']} OWNER {ROLE}")
    stack = Stack(tmp_path, {("postgres", 5432): postgres.port, ("orthanc", 4242): 0, ("server", 11112): free_port(),
                             ("server", 8000): free_port()})
    pgpass = tmp_path / "secrets" / "pgpass"
    pgpass.write_text(pgpass_line("localhost", postgres.port, pg_env["POSTGRES_DB"]))
    pgpass.chmod(0o600)

    # Orthanc with the compose file's AE title and its modality entry for the server
    modalities = json.loads(orthanc_env["ORTHANC__DICOM_MODALITIES"])
    node_ae, node_host, node_port = modalities["mri_ai"]
    (tmp_path / "orthanc").mkdir()
    orthanc = Orthanc(tmp_path / "orthanc", {"mri_ai": [node_ae, "localhost", stack.ports[(node_host, node_port)]]})
    assert json.loads(orthanc.config.read_text())["DicomAet"] == orthanc_env["ORTHANC__DICOM_AET"]
    orthanc.start()
    stack.ports[("orthanc", 4242)] = orthanc.dicom_port

    # The server: the image's entrypoint, its environment (Dockerfile ENV, then compose's), compose's command
    store = dict(a.split("=", 1) for a in registered[3::2])  # the registry's --set pairs
    outside = {"MLFLOW_TRACKING_URI": store["monitoring.mlflow.tracking_uri"], "BRAIN_MRI_ALIAS": "staging"}
    env = {**dockerfile_env(), **{k: interpolate(v, outside) for k, v in services["server"]["environment"].items()}}
    env = {k: stack.local(v) for k, v in env.items() if k != "PATH"}
    env["BRAIN_MRI_PORT"] = str(stack.ports[("server", 8000)])
    assert f"{stack.tmp / 'secrets'}/" in env["BRAIN_MRI_TOKEN_FILE"] and "@" in env["BRAIN_MRI_DATABASE"]
    assert ":" not in env["BRAIN_MRI_DATABASE"].split("//", 1)[1].split("@")[0]  # no password in the URL
    token = "compose-token-0123456789abcdef"
    token_file = tmp_path / "secrets" / os.path.basename(env["BRAIN_MRI_TOKEN_FILE"])
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    entrypoint = (ROOT / "container" / "entrypoint.sh").read_text()
    assert entrypoint.count("/app/serve.py") == 1
    local_entrypoint = tmp_path / "entrypoint.sh"
    local_entrypoint.write_text(stack.local(entrypoint.replace("/app/serve.py", str(ROOT / "serve.py"))))
    command = [stack.local(str(a)) for a in services["server"]["command"]]
    command = [str(stack.ports[("server", 11112)]) if a == "11112" else a for a in command]
    server = ServerProcess.by_command(["sh", str(local_entrypoint), *command, *FAST_SERIES], tool_env(**env), tmp_path,
                                      stack.ports[("server", 8000)], token)
    study = generate_uid()
    write_series(tmp_path / "series", pictures, 6, study)
    try:
        server.wait_ready()
        series_id = next(iter(upload(orthanc, tmp_path / "series").values()))
        assert orthanc.store("mri_ai", series_id)[0] == 200
        found = wait_for(orthanc, study, 1)  # one SR, one KOS and one capture back in Orthanc
        with server.client() as client:
            recorded = client.get("/v1/series", params={"study_uid": study}).json()["series"]
        assert [(r["source"], r["outcome"], r["n_slices"]) for r in recorded] == [("dicom", "read", 6)]
        assert read_series_report(found["SR"][0])["predicted_class"] == recorded[0]["result"]["predicted_class"]
        audited = postgres.sql("SELECT count(*) FROM predictions WHERE source = 'dicom'", pg_env["POSTGRES_DB"])
        assert int(audited) == 6  # the audit trail is PostgreSQL's, reached with the pgpass file's password
        assert (tmp_path / "data" / "pacs_spool").is_dir()  # the volume holds the spool
    finally:
        server.stop()
        orthanc.stop()
    log = server.log()
    assert "Traceback" not in log and PASSWORD not in log
    assert subprocess.run(["sh", "-n", str(local_entrypoint)]).returncode == 0

"""Nothing leaves the machine unless the user asked: W&B offline with per-patient files kept local, no
library telemetry, no credentials in anything logged or stored, patient pixels readable by their owner only."""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, run_script, tool_env, write_overlay
from core.checkpoint import load_checkpoint
from core.config import load_config
from core.fileio import atomic_file, write_text_atomic
from core.redaction import redact, redact_text

SECRET = "s3cret-pw"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def wandb_offline_env(tmp_path, monkeypatch):
    """W&B's own folders in tmp; a key and WANDB_MODE=online in the environment, as a logged-in user has."""
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_MODE", "online")
    yield tmp_path / "wandb-home"
    import wandb

    wandb.teardown()  # the W&B service process this test started


def offline_records(root) -> bytes:
    """Everything an offline W&B run would upload on `wandb sync`: its transaction logs and staged files."""
    import wandb

    wandb.teardown()  # the W&B service writes the run's log in the background: done once it has stopped
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and p.suffix != ".log")


def test_evaluation_keeps_per_patient_files_out_of_wandb(trained, tmp_path, wandb_offline_env):
    overlay, _, best = trained
    out = tmp_path / "checkpoints" / "resnet18_outputs"
    out.mkdir(parents=True)
    shutil.copy(best, out / "best_model.pth")
    code = run_script("evaluate", ["--config", overlay, "--model", "resnet18", "--detailed",
                                   "--set", f"train.output_dir={tmp_path / 'checkpoints'}",
                                   "--set", "monitoring.wandb.mode=offline",
                                   "--set", f"monitoring.wandb.dir={tmp_path / 'wandb-runs'}"])
    assert code == 0
    runs = list((tmp_path / "wandb-runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # offline, although a key and WANDB_MODE=online are in the environment
    sent = offline_records(tmp_path / "wandb-runs") + offline_records(wandb_offline_env)
    assert b"evaluation_metrics.json" in sent  # aggregate figures are there: the search can see artifacts
    assert b"predictions.csv" not in sent and b"gradcam_" not in sent
    first_path = (out / "predictions.csv").read_text().splitlines()[1].split(",")[0]
    assert first_path.encode() not in sent  # no file path of a test image either
    overlays = sorted((out / "gradcam").glob("gradcam_*.png"))
    assert overlays and all(mode(p) == 0o600 for p in overlays) and mode(out / "gradcam") == 0o700


def test_per_patient_files_reach_wandb_only_with_the_separate_key(tmp_path, wandb_offline_env):
    from core.tracking import RunTracker

    (tmp_path / "predictions.csv").write_text("path,predicted\npatient 0001/slice 7.jpg,glioma\n")
    for allowed in (False, True):
        runs = tmp_path / f"runs-{allowed}"
        cfg = load_config(None, ["monitoring.mlflow.enabled=false", "monitoring.wandb.mode=offline",
                                 f"monitoring.wandb.dir={runs}", f"monitoring.wandb.log_patient_data={allowed}"])
        with RunTracker(cfg, run_name="t", mlflow_experiment=None, wandb_project="p") as tracker:
            tracker.log_artifact(tmp_path / "predictions.csv", "evaluation", patient_data=True)
        assert (b"predictions.csv" in offline_records(runs)) is allowed


def test_wandb_goes_online_only_when_the_config_says_online(tmp_path, monkeypatch):
    from core.tracking import wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_MODE", "online")
    assert load_config(None).monitoring.wandb.mode == "offline"
    assert wandb_mode("offline") == wandb_mode("auto") == "offline"  # a key alone never sends a run away
    assert wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("offline") == "disabled" and wandb_mode("disabled") == "disabled"


def clean_env(**extra) -> dict:
    """The environment of a user's shell: no CI or pytest markers (MLflow turns telemetry off by itself there)."""
    markers = ("PYTEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "HF_HUB_DISABLE",
               "WANDB_ERROR_REPORTING")
    env = {k: v for k, v in os.environ.items() if not k.startswith(markers)}
    return {**env, **extra}


def test_library_telemetry_is_off_unless_turned_on():
    probe = ("import os, core, mlflow\n"
             "from mlflow.telemetry.client import get_telemetry_client\n"
             "env = os.environ\n"
             "print(env['MLFLOW_DISABLE_TELEMETRY'], get_telemetry_client(), env['HF_HUB_DISABLE_TELEMETRY'],"
             " env['WANDB_ERROR_REPORTING'])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["true", "None", "1", "false"], out.stderr[-2000:]
    # turned on by the user, in the config or in MLflow's own variable (checked without importing MLflow,
    # which would then start reporting)
    turned_on = ("import os, core\n"
                 "from core.config import load_config\n"
                 "from core.tracking import prepare_mlflow\n"
                 "prepare_mlflow(load_config(None, ['monitoring.mlflow.telemetry=true']).monitoring.mlflow)\n"
                 "print(os.environ['MLFLOW_DISABLE_TELEMETRY'])")
    for env in (clean_env(), clean_env(MLFLOW_DISABLE_TELEMETRY="false")):
        got = subprocess.run([sys.executable, "-c", turned_on], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
        assert got.stdout.strip() == "false", got.stderr[-2000:]


@pytest.mark.parametrize("text, expected", [
    ("http://alice:s3cret-pw@mlflow.site:5000", "http://***@mlflow.site:5000"),
    ("https://token@h/x", "https://***@h/x"),
    ("postgresql://u:p@ss@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),  # a raw '@' in the password
    ("https://b.blob/x?sv=1&sig=abc&se=2", "https://b.blob/x?sv=1&sig=***&se=2"),
    ("https://s3/x?X-Amz-Credential=a&X-Amz-Signature=b", "https://s3/x?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("cannot reach http://a:b@127.0.0.1:9: refused", "cannot reach http://***@127.0.0.1:9: refused"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("./data/brain cancer/x=1", "./data/brain cancer/x=1"),
])
def test_credentials_are_stripped_from_any_uri(text, expected):
    assert redact_text(text) == expected
    assert redact({"a": [text]}) == {"a": [expected]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow server (start_mlflow_server.sh) on a free loopback port; its address."""
    port = free_port()
    env = tool_env(MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path / 'server.db'}",
                   MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "server-artifacts"))
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(ROOT / "start_mlflow_server.sh"), "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        log.close()


def test_credentials_in_the_tracking_uri_are_kept_out_of_params_checkpoints_and_logs(tmp_path, tiny_data,
                                                                                       mlflow_server, capsys):
    from mlflow import MlflowClient

    uri = f"http://alice:{SECRET}@{mlflow_server}"
    overlay = write_overlay(tmp_path, tiny_data, **{"monitoring.mlflow.tracking_uri": uri})
    assert run_script("train", ["--config", overlay, "--model", "resnet18"]) == 0
    console = capsys.readouterr()
    assert SECRET not in console.out + console.err and "http://***@" in console.out  # the banner's MLflow line
    out = tmp_path / "checkpoints" / "resnet18_outputs"
    ckpt = load_checkpoint(out / "best_model.pth")
    assert SECRET not in json.dumps(ckpt["config"]) and ckpt["config"]["monitoring"]["mlflow"]["tracking_uri"] == \
        f"http://***@{mlflow_server}"
    assert SECRET not in (out / "resolved_config.yaml").read_text()
    client = MlflowClient(tracking_uri=f"http://{mlflow_server}")
    (run,) = client.search_runs([client.get_experiment_by_name("brain-cancer-mri-v2-resnet18").experiment_id])
    assert run.data.params["monitoring.mlflow.tracking_uri"] == f"http://***@{mlflow_server}"
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if SECRET in v]


def test_the_registry_link_carries_no_credentials():
    from deploy.registry import run_link

    class Store:
        def get_run(self, run_id):
            raise LookupError(run_id)  # a run from another store: the link keeps the address

    assert SECRET not in run_link(Store(), "abc", f"https://bob:{SECRET}@mlflow.site")


def test_patient_pixels_are_owner_only_and_other_files_follow_the_umask(tmp_path, tiny_data):
    from data.cache import split_cache
    from data.manifest import prepare_split

    cfg = load_config(write_overlay(tmp_path, tiny_data))
    cache = split_cache(cfg, prepare_split(cfg), "train", 32, progress=False)
    assert mode(cache.path) == 0o600 and mode(cache.path.parent) == 0o700
    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_file(tmp_path / "overlay.png", private=True) as fh:
        fh.write(b"pixels")
    assert mode(tmp_path / "overlay.png") == 0o600
    assert mode(write_text_atomic(tmp_path / "report.txt", "figures")) == 0o666 & ~umask


def test_the_command_line_reaches_wandb_without_its_credentials(tmp_path, wandb_offline_env, monkeypatch):
    """W&B records the command line in its run file (uploaded by a later `wandb sync`): a password given with
    --set is not in it, nor in anything else the run wrote."""
    from core.tracking import RunTracker

    uri = f"http://alice:{SECRET}@mlflow.example/"
    monkeypatch.setattr(sys, "argv", ["train.py", "--set", f"monitoring.mlflow.tracking_uri={uri}"])
    cfg = load_config(None, ["monitoring.mlflow.enabled=false", "monitoring.wandb.mode=offline",
                             f"monitoring.wandb.dir={tmp_path / 'runs'}", f"monitoring.mlflow.tracking_uri={uri}"])
    with RunTracker(cfg, run_name="t", mlflow_experiment=None, wandb_project="p") as tracker:
        tracker.log_params(cfg.to_dict())
    assert sys.argv[2].endswith(f"{SECRET}@mlflow.example/")  # the process keeps its own arguments
    written = offline_records(tmp_path / "runs") + offline_records(wandb_offline_env)
    written += b"".join(p.read_bytes() for p in (tmp_path / "runs").rglob("*.log"))
    assert b"tracking_uri=http://***@mlflow.example/" in written  # the command line is there, redacted
    assert SECRET.encode() not in written


def test_ray_usage_statistics_are_off_when_ray_is_used_and_importing_sets_nothing():
    pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-scale.txt")
    code = ("import os; before = dict(os.environ); import archive.engine\n"
            "assert dict(os.environ) == before, 'importing changed the environment'\n"
            "archive.engine.import_ray(); print(os.environ['RAY_USAGE_STATS_ENABLED'])")
    env = {k: v for k, v in os.environ.items() if k != "RAY_USAGE_STATS_ENABLED"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "0", done.stderr

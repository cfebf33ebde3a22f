"""The registry and its gate policy, against real sqlite MLflow registries in tmp: automatic registration after
train.py, register_model.py, deploy_model.py, inference by alias, and every way around the gate refused.

A model that passes the gates honestly comes from `passing_run` (three epochs on classes a CNN tells apart at once);
one that fails them is the one-epoch `trained` model. Gates are never lowered to make a test pass.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from mlflow import MlflowClient

import data.manifest
from conftest import one_torch_thread, run_script, write_overlay
from core.checkpoint import load_checkpoint
from core.config import load_config
from core.errors import UserError
from core.tracking import RunTracker
from data.manifest import sha256_file
from deploy.automation import release_after_training
from deploy.policy import judge, loosened_gates, production_refusal, version_tags
from deploy.registry import PICKLE_SWITCH, connect, download, load_pytorch_flavor, validate_alias, validate_semver
from tests.slowest import slow_setup

NAME = "brain-cancer-resnet18"
PASS_ALL = ["--set", "evaluation.gates.accuracy=0", "--set", "evaluation.gates.sensitivity=0",
            "--set", "evaluation.gates.latency_ms=100000", "--set", "evaluation.gates.max_imbalance=100"]


@pytest.fixture(autouse=True, scope="module")
def _latency_measured_single_threaded():
    with one_torch_thread():
        yield


def store_argv(overlay, tmp, db) -> list:
    uri = f"sqlite:///{db}"
    return ["--config", overlay, "--model", "resnet18", "--set", f"monitoring.mlflow.tracking_uri={uri}",
            "--set", f"monitoring.mlflow.artifact_location={tmp / 'mlartifacts'}"]


def client_for(db) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")


@pytest.fixture(scope="module")
@slow_setup("copies the passing run's registry, then evaluates and registers v2 in it")
def released_again(passing_run, tmp_path_factory):
    """A copy of the passing run's registry where the README's quick start ran: a plain evaluate.py, then
    register_model.py --version 1.0.0 (v2 beside the automatic v1)."""
    overlay, run_tmp, _ = passing_run
    tmp = tmp_path_factory.mktemp("registry copy")
    shutil.copy(run_tmp / "mlflow.db", tmp / "mlflow.db")
    argv = store_argv(overlay, tmp, tmp / "mlflow.db")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_script("evaluate", argv) == 0
    # the next step evaluate.py prints, copied as a user would (its placeholder description filled in)
    (hint,) = [ln for ln in out.getvalue().splitlines() if ln.startswith("📝 Next: python register_model.py ")]
    command = shlex.split(hint.removeprefix("📝 Next: ").partition(" (a new semantic version)")[0])
    assert command[:2] == ["python", "register_model.py"] and "..." in command
    command[command.index("...")] = "First production model"
    assert run_script("register_model", command[2:]) == 0
    return argv, tmp, client_for(tmp / "mlflow.db")


def test_training_registers_and_promotes_a_model_that_passes_the_gates(passing_run):
    overlay, tmp, out = passing_run
    for line in ("Deployment ready: YES", "📦 ONNX model exported and registered: brain-cancer-resnet18-onnx v1",
                 "📝 Model brain-cancer-resnet18 v1 registered in Staging",
                 "🏆 Model brain-cancer-resnet18 v1 promoted to Production!",
                 "Next: python inference_with_mlflow.py --model brain-cancer-resnet18 --image PATH"):
        assert line in out, line
    client = client_for(tmp / "mlflow.db")
    mv = client.get_model_version_by_alias(NAME, "production")
    assert str(mv.version) == "1" and str(client.get_model_version_by_alias(NAME, "staging").version) == "1"
    best = tmp / "checkpoints" / "resnet18_outputs" / "best_model.pth"
    assert mv.tags["checkpoint_sha256"] == sha256_file(best)
    # the model card, beside the checkpoint and in the registry, says where the version is now: promoted
    for card in ((best.parent / "model_card.md").read_text(), mv.description):
        assert "Aliases now: `production`, `staging` (as of " in card
    assert mv.tags["auto_registered"] == "true" and mv.tags["registered_by"].startswith("train.py")
    assert mv.tags["medical_validation"] == "passed" and mv.tags["forced"] == "false"
    assert "set by train.py" in mv.tags["alias.production.history"]
    onnx_prod = client.get_model_version_by_alias(f"{NAME}-onnx", "production")
    assert str(onnx_prod.version) == mv.tags["onnx_version"]
    # the evaluation it was judged on lies beside the checkpoint and names it; the training run is tagged
    metrics = json.loads((best.parent / "evaluation_metrics.json").read_text())
    assert metrics["checkpoint_sha256"] == sha256_file(best)
    run = client.get_run(load_checkpoint(best)["mlflow_run_id"])
    assert run.data.tags["registry.version"] == "1" and run.data.tags["registry.alias"] == "production"
    assert run.data.metrics["test_accuracy"] >= 0.85


def test_inference_serves_production_by_default_and_staging_on_request(passing_run, capsys):
    overlay, tmp, _ = passing_run
    image = next((tmp / "distinct" / "bright").glob("*.png"))
    argv = ["--config", overlay, "--model", NAME, "--image", image]
    assert run_script("inference_with_mlflow", argv) == 0
    out = capsys.readouterr()
    assert "✅ Successfully loaded model: brain-cancer-resnet18 (Production)\n" in out.out
    assert " Predicted Class: bright" in out.out and "warning" not in out.err
    assert run_script("inference_with_mlflow", argv + ["--stage", "Staging"]) == 0
    assert "✅ Successfully loaded model: brain-cancer-resnet18 (Staging)\n" in capsys.readouterr().out


def test_quick_start_registers_after_a_plain_evaluation_and_twice_is_harmless(released_again, capsys):
    argv, _, client = released_again
    mv = client.search_model_versions(f"name='{NAME}' and tags.semver='1.0.0'")[0]
    assert str(mv.version) == "2" and mv.tags["medical_validation"] == "passed" and "First production" in mv.description
    assert run_script("register_model", argv + ["--version", "1.0.0"]) == 0
    assert "already version 1.0.0 of this checkpoint" in capsys.readouterr().out
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2


def test_another_checkpoint_cannot_borrow_evidence_or_a_version(released_again, passing_run, tmp_path):
    argv, _, _ = released_again
    src = passing_run[1] / "checkpoints" / "resnet18_outputs"
    other = tmp_path / "checkpoints" / "resnet18_outputs"
    other.mkdir(parents=True)
    ckpt = load_checkpoint(src / "best_model.pth")
    torch.save({**ckpt, "epoch": ckpt["epoch"] + 1}, other / "best_model.pth")  # another checkpoint, same split
    shutil.copy(src / "evaluation_metrics.json", other)
    shutil.copy(src / "medical_validation.json", other)
    elsewhere = argv + ["--set", f"train.output_dir={tmp_path / 'checkpoints'}"]
    with pytest.raises(UserError, match="scored another checkpoint"):
        run_script("register_model", elsewhere + ["--version", "1.0.1"])
    assert run_script("evaluate", elsewhere) == 0  # its own evidence now
    with pytest.raises(UserError, match="already has version 1.0.0 .* from another checkpoint"):
        run_script("register_model", elsewhere + ["--version", "1.0.0"])


def test_register_model_reads_the_checkpoint_once(released_again, passing_run, monkeypatch):
    """--checkpoint alone names the model from the checkpoint, and the release uses that read, not a second."""
    import evaluation.source
    import register_model

    argv, _, client = released_again
    reads = []

    def counted(path, *args, **kwargs):
        reads.append(path)
        return load_checkpoint(path, *args, **kwargs)

    monkeypatch.setattr(register_model, "load_checkpoint", counted)
    monkeypatch.setattr(evaluation.source, "load_checkpoint", counted)
    best = passing_run[1] / "checkpoints" / "resnet18_outputs" / "best_model.pth"
    without_model = [a for a in argv if a not in ("--model", "resnet18")]
    assert run_script("register_model", without_model + ["--checkpoint", best, "--version", "3.0.0"]) == 0
    assert len(reads) == 1
    assert client.search_model_versions(f"name='{NAME}' and tags.semver='3.0.0'")


class ReloadEndpoint(BaseHTTPRequestHandler):
    """The serving endpoint's reload, as a real HTTP server on 127.0.0.1: answers the known token only."""
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        ReloadEndpoint.seen.append((self.path, self.headers.get("Authorization")))
        ok = self.path == "/admin/reload" and self.headers.get("Authorization") == "Bearer s3cret"
        body = json.dumps({"model": NAME, "version": "2", "alias": "production"}).encode() if ok else b"{}"
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def reload_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ReloadEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_deploy_model_promotes_reloads_rolls_back_and_lists(released_again, reload_server, tmp_path, capsys):
    argv, _, client = released_again
    token = tmp_path / "admin.token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    serve = ["--serve-url", reload_server, "--token-file", token]
    assert run_script("deploy_model", ["promote", *argv, "--version", "2", *serve]) == 0
    out = capsys.readouterr()
    assert "🏆 Model brain-cancer-resnet18 v2 promoted to Production! (was v1)" in out.out
    assert f"🔄 Server {reload_server} reloaded: {NAME} v2 @production" in out.out and not out.err
    assert ReloadEndpoint.seen[-1] == ("/admin/reload", "Bearer s3cret")
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags["alias.production.previous"] == "1"
    assert str(client.get_model_version_by_alias(f"{NAME}-onnx", "production").version) == v2.tags["onnx_version"]

    token.write_text("wrong")  # the server refuses; the registry move stands and the user is told in one line
    assert run_script("deploy_model", ["rollback", *argv, *serve]) == 0
    out = capsys.readouterr()
    assert "🏆 Model brain-cancer-resnet18 v1 promoted to Production! (was v2)" in out.out
    assert out.err.count("\n") == 1 and "refused the reload (HTTP 401" in out.err
    assert str(client.get_model_version_by_alias(NAME, "production").version) == "1"
    assert "moved to v1 by deploy_model.py" in client.get_model_version(NAME, "2").tags["alias.production.history"]

    with pytest.raises(UserError, match="v1 is the first version recorded at @production"):
        run_script("deploy_model", ["rollback", *argv])
    closed = ["--serve-url", "http://127.0.0.1:9", "--token-file", token]
    assert run_script("deploy_model", ["promote", *argv, "--version", "2", "--alias", "staging", *closed]) == 0
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
    assert run_script("deploy_model", ["list", *argv]) == 0
    listing = capsys.readouterr().out
    assert "@production   -> v1" in listing and "@staging      -> v2" in listing and "production: ok" in listing
    token.write_text("s3cret\nAuthorization: other")  # a credential file is never echoed, nor sent as headers
    with pytest.raises(UserError, match="must hold one token on one line") as refused:
        run_script("deploy_model", ["promote", *argv, "--version", "2", *serve])
    assert "s3cret" not in str(refused.value)


def test_the_gate_cannot_be_talked_around(trained, tiny_data, tmp_path, capsys):
    """A failing model: not by a stored verdict, not by lowered gates, not by --force into production."""
    overlay, _, ckpt_path = trained
    out = tmp_path / "checkpoints" / "resnet18_outputs"
    out.mkdir(parents=True)
    shutil.copy(ckpt_path, out / "best_model.pth")
    argv = store_argv(overlay, tmp_path, tmp_path / "registry.db") + [
        "--set", f"train.output_dir={tmp_path / 'checkpoints'}"]
    with pytest.raises(UserError, match="has no evaluation of this checkpoint"):
        run_script("register_model", argv + ["--version", "1.0.0"])
    # gates lowered at evaluation write "deployment ready"; registration judges the figures with its own gates
    assert run_script("evaluate", argv + PASS_ALL + ["--medical-validation"]) == 0
    assert json.loads((out / "medical_validation.json").read_text())["deployment_ready"] is True
    with pytest.raises(UserError, match="fails the gates in force .*accuracy"):
        run_script("register_model", argv + ["--version", "1.0.0"])
    with pytest.raises(UserError, match=r"cannot be @production: it is forced: gates loosened below the defaults "
                                        r"\(accuracy 0 \(default 0.85\)"):
        run_script("register_model", argv + PASS_ALL + ["--version", "1.0.0", "--alias", "production"])
    with pytest.raises(UserError, match=r"cannot be @production: it is forced \(--force; medical validation failed"):
        run_script("register_model", argv + ["--version", "1.0.0", "--alias", "production", "--force"])
    assert run_script("register_model", argv + ["--version", "1.0.0", "--force"]) == 0
    assert "⚠️  Registering a forced version (medical validation failed)" in capsys.readouterr().out
    client = client_for(tmp_path / "registry.db")
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["forced"] == "true" and mv.tags["medical_validation"] == "failed"
    assert "Registered with --force" in (out / "model_card.md").read_text()
    with pytest.raises(UserError, match="v1 cannot be @production: it is forced"):
        run_script("deploy_model", ["promote", *argv, "--version", "1"])
    assert client.get_registered_model(NAME).aliases == {}
    image = next(tiny_data.rglob("*.jpg"))
    assert run_script("inference_with_mlflow", argv + ["--version", "1", "--image", image]) == 0
    assert "warning: brain-cancer-resnet18 v1 was registered with --force" in capsys.readouterr().err


def test_training_says_why_nothing_was_registered(trained, tmp_path, capsys):
    overlay, _, ckpt_path = trained
    out = tmp_path / "checkpoints" / "resnet18_outputs"
    out.mkdir(parents=True)
    shutil.copy(ckpt_path, out / "best_model.pth")
    sets = [f"train.output_dir={tmp_path / 'checkpoints'}",
            f"monitoring.mlflow.tracking_uri=sqlite:///{tmp_path / 'registry.db'}"]
    for extra, reason in ((["monitoring.mlflow.enabled=false"], "MLflow is off"),
                          (["evaluation.gates.accuracy=0.5"], "gates are loosened below the defaults (accuracy 0.5"),
                          ([], "the model fails the gates (accuracy")):
        cfg = load_config(overlay, sets + extra)
        with RunTracker(cfg, run_name="t", mlflow_experiment=None, wandb_project=None) as tracker:
            assert release_after_training(cfg, torch.device("cpu"), tracker) == "skipped"
        printed = capsys.readouterr().out
        assert "Not registered: " in printed and reason in printed
        assert "Next: python evaluate.py --model resnet18" in printed
    assert not (tmp_path / "registry.db").exists()  # nothing was registered, or even connected to


def test_training_with_auto_register_hashes_the_data_set_once(tiny_data, tmp_path, monkeypatch, capsys):
    """The split is made (every image hashed) once per train.py run; the registry's evaluation reuses it."""
    hashed: list[str] = []
    real = data.manifest.sha256_file

    def counting(path):
        hashed.append(str(path))
        return real(path)

    monkeypatch.setattr(data.manifest, "sha256_file", counting)
    overlay = write_overlay(tmp_path, tiny_data)
    assert run_script("train", ["--config", overlay, "--model", "resnet18"]) == 0
    printed = capsys.readouterr().out
    assert "Evaluating" in printed and "registry.auto_register" in printed  # the registry's evaluation ran
    images = sorted(str(p) for p in tiny_data.rglob("*") if p.is_file())
    assert sorted(hashed) == images  # each image once


def test_pt2_flavor_loads_only_with_the_pickle_guard(passing_run, tmp_path, monkeypatch):
    overlay, _, _ = passing_run
    client = connect(load_config(overlay).monitoring.mlflow)
    local = download(client.get_model_version(NAME, "1"), tmp_path / "model")
    monkeypatch.setenv(PICKLE_SWITCH, "true")  # even where the environment allows pickle
    module = load_pytorch_flavor(str(local))
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 3)  # logits, as mlflow.pyfunc expects
    with zipfile.ZipFile(local / "data" / "model.pt2", "a") as archive:  # a crafted archive: one pickled record
        archive.writestr("model/data/constants/payload.pkl", b"cbuiltins\nprint\n(S'payload ran'\ntR.")
    with pytest.raises(UserError, match="refused to load .*payload.pkl"):
        load_pytorch_flavor(str(local))
    assert os.environ[PICKLE_SWITCH] == "true"  # the guard is restored, not left changed


def test_policy_judges_figures_not_verdicts(passing_run):
    _, tmp, _ = passing_run
    metrics = json.loads((tmp / "checkpoints" / "resnet18_outputs" / "evaluation_metrics.json").read_text())
    gates = load_config().evaluation.gates
    metrics["accuracy"] = {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95}  # passes on the point, not on the CI
    evidence = judge(metrics, gates)
    assert evidence.status == "passed" and evidence.ci_status == "failed"
    tags = version_tags(evidence, False, gates)
    assert production_refusal(tags, "point") is None
    assert "lower bounds of the 95% CIs" in production_refusal(tags, "ci_lower")
    del metrics["timing"]
    with pytest.raises(UserError, match="lacks the figure 'timing'"):
        judge(metrics, gates)
    assert production_refusal({}, "point").startswith("its medical validation is missing")


def test_examples_walk_through_the_registry_read_only(passing_run, capsys):
    overlay, tmp, _ = passing_run
    before = {a: str(v) for a, v in client_for(tmp / "mlflow.db").get_registered_model(NAME).aliases.items()}
    assert run_script("mlflow_model_examples", ["--config", overlay, "--model", "resnet18"]) == 0
    out = capsys.readouterr().out
    for line in ("1️⃣  Logging vs registering", "model.onnx", "models:/brain-cancer-resnet18@production",
                 "PyTorch pt2 flavor, loaded with MLflow's pickle guard on", "ONNX flavor through mlflow.pyfunc",
                 "tags.medical_validation='passed'\") -> v1"):
        assert line in out, line
    delta = float(out.split("max |Δlogit| vs PyTorch ")[1].split()[0])
    assert delta < 1e-3  # the two flavors of one version agree
    after = {a: str(v) for a, v in client_for(tmp / "mlflow.db").get_registered_model(NAME).aliases.items()}
    assert after == before
    with pytest.raises(UserError, match="has no version 9"):
        run_script("mlflow_model_examples", ["--config", overlay, "--model", "resnet18", "--version", "9"])


def test_loosening_is_judged_per_gate_direction():
    gates = load_config().evaluation.gates
    assert loosened_gates(gates) == []
    stricter = load_config(sets=["evaluation.gates.accuracy=0.9", "evaluation.gates.latency_ms=100"])
    assert loosened_gates(stricter.evaluation.gates) == []
    looser = load_config(sets=["evaluation.gates.latency_ms=900", "evaluation.gates.max_imbalance=9"])
    assert [g.split()[0] for g in loosened_gates(looser.evaluation.gates)] == ["latency_ms", "max_imbalance"]
    with pytest.raises(UserError, match="registry.promote_on"):
        load_config(sets=["registry.promote_on=median"])


@pytest.mark.parametrize("bad", ["1.0", "v1.0.0", "1.0.0.0", "01.0.0", ""])
def test_invalid_semver_is_refused(bad):
    with pytest.raises(UserError, match="not a semantic version"):
        validate_semver(bad)


@pytest.mark.parametrize("alias", ["Production", "STAGING", "latest", "v2", "a b"])
def test_aliases_that_would_slip_past_the_policy_are_refused(alias):
    with pytest.raises(UserError, match="--alias"):
        validate_alias(alias)


def test_the_model_card_follows_the_aliases_of_its_version(tmp_path):
    """A card written at registration says @staging; after a promotion it must not: the description's aliases line
    is rewritten whenever an alias moves, on the version that got it and on the one that lost it."""
    from deploy.aliases import move_alias
    from deploy.model_card import aliases_line

    client = client_for(tmp_path / "mlflow.db")
    client.create_registered_model(NAME)
    card = f"# Model card: {NAME} 1.0.0\n{aliases_line(['staging'])}\n## Intended use"
    passed = {"medical_validation": "passed", "forced": "false"}
    v1 = client.create_model_version(NAME, source=str(tmp_path), description=card, tags=passed)
    v2 = client.create_model_version(NAME, source=str(tmp_path), description=card, tags=passed)
    move_alias(client, client.get_model_version(NAME, v1.version), "staging", "test")
    move_alias(client, client.get_model_version(NAME, v1.version), "production", "test")
    assert "Aliases now: `production`, `staging` (as of " in client.get_model_version(NAME, v1.version).description
    move_alias(client, client.get_model_version(NAME, v2.version), "staging", "test")
    assert "Aliases now: `production` (as of " in client.get_model_version(NAME, v1.version).description
    assert "Aliases now: `staging` (as of " in client.get_model_version(NAME, v2.version).description
    assert client.get_model_version(NAME, v2.version).description.startswith(f"# Model card: {NAME} 1.0.0\n")

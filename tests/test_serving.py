"""serve.py: a real uvicorn server on loopback, a real registered model in a temporary MLflow store.

Parity with inference_with_mlflow.py --json, hostile uploads beside good ones, the token, slow clients, a
reload under load, a full queue, and the audit log after kill -9.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import shutil
import socket
import sqlite3
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from server_process import ServerProcess, free_port, write_token

from conftest import run_script, write_dicom
from core.errors import UserError
from data.images import split_frame_name
from tests.slowest import slow_setup

MODEL = "brain-cancer-resnet18"
TOL = 1e-6


# ---- the model, two versions, and what the CLI says about the test files ----------------------------------

def perturbed_checkpoint(src: Path, dst: Path) -> Path:
    """The same network with another classifier bias: a second version whose answers differ from the first's."""
    ckpt = torch.load(src, weights_only=True)
    bias = [k for k, v in ckpt["model_state"].items() if k.endswith("bias") and v.shape == (3,)][-1]
    ckpt["model_state"][bias] = ckpt["model_state"][bias] + torch.tensor([2.0, -2.0, 0.0])
    dst.parent.mkdir(parents=True)
    torch.save(ckpt, dst)
    return dst


@pytest.fixture(scope="module")
@slow_setup("evaluates and registers two versions of the model")
def registry(trained, tmp_path_factory):
    """v1 (@staging, evaluated) and v2 (no alias, never evaluated) of brain-cancer-resnet18, both forced: a
    one-epoch model fails the gates."""
    overlay, _, ckpt_path = trained
    tmp = tmp_path_factory.mktemp("serving registry")
    store = ["--config", overlay, "--set", f"monitoring.mlflow.tracking_uri=sqlite:///{tmp / 'registry.db'}",
             "--set", f"monitoring.mlflow.artifact_location={tmp / 'mlartifacts'}"]
    for version, out in (("1.0.0", tmp / "v1"), ("2.0.0", tmp / "v2")):
        target = out / "resnet18_outputs" / "best_model.pth"
        if version == "1.0.0":
            target.parent.mkdir(parents=True)
            shutil.copy(ckpt_path, target)
        else:
            perturbed_checkpoint(ckpt_path, target)
        alias = ["--alias", "staging"] if version == "1.0.0" else []
        if version == "1.0.0":  # v1 carries its evaluation (it fails the gates: a one-epoch model)
            assert run_script("evaluate", store + ["--model", "resnet18", "--medical-validation",
                                                   "--set", f"train.output_dir={out}"]) in (0, 3)  # 3: gates failed
        assert run_script("register_model", store + ["--model", "resnet18", "--version", version, "--force", *alias,
                                                     "--set", f"train.output_dir={out}"]) == 0
    return {"store": store, "uri": f"sqlite:///{tmp / 'registry.db'}", "tmp": tmp}


def jpeg_bytes(gray: np.ndarray, size=None) -> bytes:
    img = Image.fromarray(gray)
    buf = io.BytesIO()
    (img.resize(size) if size else img).convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good_files(tiny_data, tmp_path_factory) -> dict[str, bytes]:
    """Every kind of input the CLI accepts, as the bytes a client uploads."""
    folder = tmp_path_factory.mktemp("serving inputs")
    slices = sorted(tiny_data.rglob("*.jpg"))
    arrays = [np.asarray(Image.open(p).convert("L")) for p in slices[::8][:3]]
    files = {f"slice{i}.jpg": p.read_bytes() for i, p in enumerate(slices[::6][:4])}
    files["odd size.jpg"] = jpeg_bytes(arrays[0], (97, 131))
    rgba = Image.fromarray(arrays[1]).convert("RGBA")
    rgba.putalpha(200)
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    files["rgba.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(arrays[2].astype(np.uint16) * 257).save(buf, format="PNG")
    files["sixteen.png"] = buf.getvalue()
    write_dicom(folder / "windowed.dcm", arrays[0].astype(np.uint16) * 16, (2000, 4000))
    write_dicom(folder / "cine.dcm", np.stack([arrays[1], arrays[2][::-1], arrays[0]]).astype(np.uint16) * 16)
    for name in ("windowed.dcm", "cine.dcm"):
        files[name] = (folder / name).read_bytes()
    return files


def cli_predictions(registry, files: dict[str, bytes], folder: Path, version: str) -> dict:
    """{(file name, frame): record} from inference_with_mlflow.py --json on the same bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_script("inference_with_mlflow", registry["store"] + [
            "--model", MODEL, "--version", version, "--json", "--image", *(folder / n for n in files)])
    assert code == 0
    doc = json.loads(out.getvalue())
    assert str(doc["version"]) == version
    return {(split_frame_name(p["path"])[0].name, split_frame_name(p["path"])[1]): p for p in doc["predictions"]}


@pytest.fixture(scope="module")
def expected(registry, good_files, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("cli answers")
    return {v: cli_predictions(registry, good_files, tmp / v, v) for v in ("1", "2")}


def store_args(registry) -> list:
    return [*registry["store"], "--model", MODEL, "--alias", "staging"]


@pytest.fixture(scope="module")
@slow_setup("starts serve.py with its model loaded")
def server(registry, tmp_path_factory):
    """The server most tests share: a token, small caps (1 MB bodies, 4 files), 3 s timeouts."""
    tmp = tmp_path_factory.mktemp("server")
    token_file, token = write_token(tmp)
    srv = ServerProcess([*store_args(registry), "--token-file", token_file, "--database", f"sqlite:///{tmp / 'a.db'}",
                         "--poll-seconds", "0", "--set", "serving.max_upload_mb=1", "--set", "serving.max_files=4",
                         "--set", "serving.request_timeout_s=3", "--set", "serving.header_timeout_s=3"], tmp, token)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def assert_matches(record: dict, expected: dict, version: str) -> None:
    want = expected[version][(record["file"], record["frame"])]
    worst = max(abs(record["probabilities"][k] - v) for k, v in want["probabilities"].items())
    assert worst <= TOL, f"{record['file']} frame {record['frame']}: differs from the CLI by {worst:.2e}"
    # the answer checks too: the same flags, sets and distance as the command line's
    assert (record["out_of_distribution"], record["prediction_set"], record["ood_limit"]) == (
        want["out_of_distribution"], want["prediction_set"], want["ood_limit"]) and want["prediction_set"]
    assert abs(record["ood_distance"] - want["ood_distance"]) <= 1e-3 * want["ood_distance"] + 1e-3


def audit_rows(db: Path, sql: str, args=()) -> list:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


# ---- parity, records, the audit log ------------------------------------------------------------------------

def test_answers_equal_the_cli_and_every_prediction_is_in_the_audit_log(server, good_files, expected):
    names = list(good_files)
    requests = [names[i:i + 2] for i in range(0, len(names), 2)] + [[n] for n in names]  # batched and alone

    def send(group):
        with server.client() as c:
            return c.post("/v1/predict", files=[("files", (n, good_files[n])) for n in group])

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, requests))
    records = []
    for group, r in zip(requests, answers):
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["model"], doc["version"], doc["alias"], doc["flavor"]) == (MODEL, "1", "staging", "onnx")
        assert doc["forced"] is True and doc["warning"] and doc["errors"] == []
        # GET /v1/model has the contract (its intensity histogram alone is 2,121 bytes), not every answer
        assert "contract" not in doc and len(r.content) < 1500 * len(doc["predictions"])
        assert [p["file"] for p in doc["predictions"]] == [n for n in group for _ in range(3 if n == "cine.dcm" else 1)]
        for p in doc["predictions"]:
            assert_matches(p, expected, "1")
            assert p["sha256"] == hashlib.sha256(good_files[p["file"]]).hexdigest()
            assert p["predicted_class"] == max(p["probabilities"], key=p["probabilities"].get)
        records += doc["predictions"]
    assert sorted({r["frame"] for r in records if r["file"] == "cine.dcm"}) == [1, 2, 3]
    rows = {row[0]: row[1:] for row in audit_rows(
        server.workdir / "a.db", "SELECT id, input_sha256, model_version, model_alias, flavor, frame, filename, "
                                 "output_json, study_uid FROM predictions")}
    for r in records:
        sha, version, alias, flavor, frame, filename, output, study = rows[r["record_id"]]
        assert (sha, version, alias, flavor, frame, filename) == (r["sha256"], "1", "staging", "onnx", r["frame"],
                                                                  r["file"])
        assert json.loads(output)["probabilities"] == r["probabilities"]
        assert (study is not None) == r["file"].endswith(".dcm")  # the DICOM's UIDs are kept with its records


def test_model_card_and_metrics(server):
    with server.client() as c:
        card = c.get("/v1/model").json()
        metrics = c.get("/metrics").text
    assert (card["version"], card["forced"]) == ("1", True) and card["medical_validation"] in ("failed", "passed")
    assert card["model_card"].startswith("# Model card: brain-cancer-resnet18 1.0.0")
    accuracy = card["evaluation"]["accuracy"]
    assert accuracy["ci_low"] <= accuracy["value"] <= accuracy["ci_high"]  # the figures with their intervals
    assert {g["name"] for g in card["gates"]["gates"]} >= {"accuracy"}
    for path in (card["contract"]["split_manifest"], card["evaluation"]["checkpoint"],
                 card["evaluation"]["split_manifest"]):
        assert "/" not in path  # file names, never paths
    assert str(server.workdir.parent) not in json.dumps(card)
    info = 'brain_mri_model_info{alias="staging",flavor="onnx",model="brain-cancer-resnet18",version="1"} 1.0'
    assert info in metrics
    for name in ("brain_mri_requests_total", "brain_mri_batch_size_bucket", "brain_mri_request_seconds_bucket"):
        assert name in metrics


def test_explain_returns_the_grad_cam_of_the_predicted_class(server, good_files, expected):
    with server.client() as c:
        r = c.post("/v1/explain", files={"files": ("windowed.dcm", good_files["windowed.dcm"])})
        frame = c.post("/v1/explain", params={"frame": 2}, files={"files": ("cine.dcm", good_files["cine.dcm"])})
        missing = c.post("/v1/explain", params={"frame": 9}, files={"files": ("cine.dcm", good_files["cine.dcm"])})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert Image.open(io.BytesIO(r.content)).size[0] > 0
    want = expected["1"][("windowed.dcm", None)]
    assert r.headers["x-predicted-class"] == want["predicted_class"] and r.headers["x-model-version"] == "1"
    assert frame.status_code == 200
    want = expected["1"][("cine.dcm", 2)]
    assert frame.headers["x-predicted-class"] == want["predicted_class"]
    assert missing.status_code == 422 and "no frame 9" in missing.json()["detail"]
    rows = audit_rows(server.workdir / "a.db", "SELECT frame FROM predictions WHERE id = ?",
                      (frame.headers["x-record-id"],))
    assert rows == [(2,)]  # a Grad-CAM's prediction is audited like any other


# ---- hostile input ------------------------------------------------------------------------------------------

def hostile_dicoms(folder: Path, pixels: np.ndarray) -> dict[str, bytes]:
    from pydicom.encaps import encapsulate

    out = {}
    ds = write_dicom(folder / "report.dcm", pixels)
    del ds.PixelData  # a DICOM object without an image (e.g. a structured report)
    ds.save_as(folder / "report.dcm", enforce_file_format=True)
    ds = write_dicom(folder / "j2k.dcm", pixels)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.91"  # JPEG 2000 with a broken code stream
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    ds.save_as(folder / "j2k.dcm", enforce_file_format=True)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"  # a transfer syntax nobody decodes
    ds.save_as(folder / "syntax.dcm", implicit_vr=False, little_endian=True, enforce_file_format=True)
    ds = write_dicom(folder / "frames.dcm", pixels)
    ds.NumberOfFrames = 5000  # claims far more images than a request may hold
    ds.save_as(folder / "frames.dcm", enforce_file_format=True)
    for name in ("report.dcm", "j2k.dcm", "syntax.dcm", "frames.dcm"):
        out[name] = (folder / name).read_bytes()
    return out


@pytest.fixture(scope="module")
def hostile(good_files, tmp_path_factory) -> dict[str, tuple[dict, int]]:
    """name -> (httpx request arguments, the 4xx expected)."""
    folder = tmp_path_factory.mktemp("hostile")
    jpeg = good_files["slice0.jpg"]
    head = bytearray(jpeg_bytes(np.zeros((16, 16), np.uint8)))
    sof = head.find(b"\xff\xc0")
    head[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)  # a 3 KB JPEG that claims 4.2 gigapixels
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 400 Mpx in ~50 KB
    files = {"empty.jpg": b"", "truncated.jpg": jpeg[:len(jpeg) // 2], "bomb.png": bomb.getvalue(),
             "noise.png": random.Random(0).randbytes(4000), "header-bomb.jpg": bytes(head),
             **hostile_dicoms(folder, np.full((32, 32), 900, np.uint16))}
    status = {"frames.dcm": 413}
    cases = {name: ({"files": [("files", (name, data))]}, status.get(name, 422)) for name, data in files.items()}
    cases["too-big.jpg"] = ({"files": [("files", ("too-big.jpg", random.Random(1).randbytes(1_200_000)))]}, 413)
    cases["json body"] = ({"json": {"image": "scan.jpg"}}, 415)
    cases["five files"] = ({"files": [("files", (f"{i}.jpg", jpeg)) for i in range(5)]}, 400)
    cases["no file"] = ({"content": b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--b--\r\n',
                         "headers": {"content-type": "multipart/form-data; boundary=b"}}, 422)
    cases["broken multipart"] = ({"content": b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a",
                                  "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 422)
    return cases


def test_hostile_uploads_get_a_4xx_with_a_reason_while_good_ones_are_answered(server, good_files, hostile, expected):
    good = {"good:" + n: ({"files": [("files", (n, data))]}, 200) for n, data in good_files.items()}
    odd_names = {"<img src=x onerror=alert(1)>.jpg": "<img src=x onerror=alert(1)>.jpg",
                 "../../etc/passwd.jpg": "passwd.jpg", "C:\\Users\\doe\\scan.jpg": "scan.jpg"}
    for sent in odd_names:
        good["name:" + sent] = ({"files": [("files", (sent, good_files["slice1.jpg"]))]}, 200)
    jobs = [*good.items(), *hostile.items()] * 3
    random.Random(2).shuffle(jobs)

    def send(job):
        name, (kwargs, _) = job
        with server.client() as c:
            kwargs = {**kwargs, "headers": {**server.headers, **kwargs.get("headers", {})}}
            return c.post("/v1/predict", **kwargs)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, jobs))
    for (name, (_, want)), r in zip(jobs, answers):
        assert r.status_code in (want if isinstance(want, set) else {want}), f"{name}: {r.status_code} {r.text[:300]}"
        if want == 200:
            sent = name.split(":", 1)[1]
            source, shown = (sent, sent) if name.startswith("good:") else ("slice1.jpg", odd_names[sent])
            for p in r.json()["predictions"]:
                assert p["file"] == shown
                assert_matches({**p, "file": source}, expected, "1")
        else:
            detail = r.json()["detail"]
            assert isinstance(detail, str) and detail, name
            assert "brain-mri-serve-" not in r.text and str(server.workdir) not in r.text  # no server paths
    with server.client() as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        errors = c.get("/metrics").text
    assert server.alive()
    assert 'brain_mri_errors_total{kind="unreadable_image"}' in errors and 'kind="too_large"' in errors
    assert "Traceback" not in server.log() and " 500 " not in server.log()


# ---- access ------------------------------------------------------------------------------------------------

def test_token_guards_every_endpoint_but_the_health_checks(server, registry, good_files, tmp_path):
    files = {"files": ("a.jpg", good_files["slice0.jpg"])}
    with httpx.Client(base_url=server.url, timeout=60) as anon:
        for method, path in (("GET", "/v1/model"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
                             ("POST", "/admin/reload")):
            assert anon.request(method, path).status_code == 401, path
        assert anon.post("/v1/predict", files=files).status_code == 401
        wrong = anon.post("/v1/predict", files=files, headers={"Authorization": "Bearer not-the-token-at-all"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
        assert anon.get("/healthz").status_code == 200 and anon.get("/readyz").status_code == 200
        assert "access-control-allow-origin" not in anon.get("/healthz", headers={"Origin": "http://x"}).headers
        assert anon.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 401  # its assets: as /docs
    with server.client() as c:
        assert c.get("/docs").status_code == 404  # off unless serving.api_docs
        assert c.get("/openapi.json").json()["info"]["title"] == "Brain MRI classifier"
        assert c.post("/admin/reload").json() == {"model": MODEL, "version": "1", "alias": "staging", "changed": False}
    args = [*store_args(registry), "--host", "0.0.0.0"]
    with pytest.raises(UserError, match="--token-file"):
        run_script("serve", args)  # refused before anything binds
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(UserError, match="at least 16 characters"):
        run_script("serve", [*args, "--token-file", short])


def raw_exchange(port: int, data: bytes, wait: float = 60) -> bytes:
    """Send `data` and then nothing more; what the server says before it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def test_slow_clients_are_cut_off_and_the_server_goes_on(server, good_files):
    auth = f"Authorization: Bearer {server.token}\r\n".encode()
    stalled_body = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n" + auth +
                    b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n")
    assert raw_exchange(server.port, stalled_body).startswith(b"HTTP/1.1 408")
    stalled_head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Ty"
    assert raw_exchange(server.port, stalled_head).startswith(b"HTTP/1.1 408")
    assert raw_exchange(server.port, b"").startswith(b"HTTP/1.1 408")  # connected, never spoke
    with server.client() as c:
        assert c.post("/v1/predict", files={"files": ("a.jpg", good_files["slice0.jpg"])}).status_code == 200


# ---- model updates -----------------------------------------------------------------------------------------

def move_alias(registry, version: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    client.set_registered_model_alias(MODEL, "staging", version)


def test_reload_under_load_swaps_versions_and_every_answer_names_its_own(registry, good_files, expected,
                                                                         tmp_path):
    token_file, token = write_token(tmp_path)
    srv = ServerProcess([*store_args(registry), "--token-file", token_file, "--poll-seconds", "1",
                         "--database", f"sqlite:///{tmp_path / 'a.db'}"], tmp_path, token)
    names = [n for n in good_files if n != "cine.dcm"]
    answers = []

    def client_loop(seed, stop):
        rng = random.Random(seed)
        with srv.client() as c:
            while not stop.is_set():
                name = rng.choice(names)
                sent = time.monotonic()
                answers.append((sent, name, c.post("/v1/predict", files={"files": (name, good_files[name])})))

    try:
        srv.wait_ready()
        with load_in_background(client_loop, 4):
            wait_for_answers(answers, 20)
            move_alias(registry, "2")
            with srv.client() as c:
                reload = c.post("/admin/reload")
            swapped = time.monotonic()
            assert reload.status_code == 200 and reload.json()["version"] == "2"
            wait_for_answers(answers, len(answers) + 20)
            moved_back = time.monotonic()
            move_alias(registry, "1")  # not announced: the server finds it by polling the alias
            wait_until(lambda: answers[-1][2].json()["version"] == "1", 120)
            wait_for_answers(answers, len(answers) + 10)
    finally:
        move_alias(registry, "1")
        srv.stop()
    versions = [r.json()["version"] for _, _, r in answers]
    assert {"1", "2"} <= set(versions)
    for _, _, r in answers:
        assert r.status_code == 200, r.text
        doc = r.json()
        assert_matches(doc["predictions"][0], expected, doc["version"])  # produced by the version it names
    after_reload = [r.json()["version"] for sent, _, r in answers if swapped < sent < moved_back]
    assert after_reload and set(after_reload) == {"2"}  # nothing sent after the reload's answer met v1


@contextlib.contextmanager
def load_in_background(client_loop, n: int):
    """n threads running client_loop(seed, stop) while the block runs; stopped on leaving it, however it is
    left; their errors are raised at the end."""
    stop = threading.Event()
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(client_loop, seed, stop) for seed in range(n)]
        try:
            yield
        finally:
            stop.set()
    for f in futures:
        f.result()


def wait_for_answers(answers: list, n: int, timeout: float = 180) -> None:
    wait_until(lambda: len(answers) >= n, timeout)


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.05)


# ---- the queue and the audit log under failure ---------------------------------------------------------------

def test_a_full_queue_answers_503_with_retry_after(registry, good_files, tmp_path):
    srv = ServerProcess([*store_args(registry), "--queue-size", "1", "--poll-seconds", "0",
                         "--database", f"sqlite:///{tmp_path / 'a.db'}"], tmp_path)
    try:
        srv.wait_ready()
        jpeg, cine = good_files["slice0.jpg"], good_files["cine.dcm"]
        body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n"
                b"Content-Type: image/jpeg\r\n\r\n" + jpeg + b"\r\n--b--\r\n")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as slow:
            slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                         b"boundary=b\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:50])
            with srv.client() as c:  # a body still on its way holds no place in the queue
                assert c.post("/v1/predict", files={"files": ("b.jpg", jpeg)}).status_code == 200
                with ThreadPoolExecutor(8) as pool:  # eight at once for one place: some wait their turn in vain
                    answers = list(pool.map(lambda i: c.post("/v1/predict", files={"files": (f"{i}.dcm", cine)}),
                                            range(16)))
                full = [a for a in answers if a.status_code == 503]
                assert full and all(a.status_code in (200, 503) for a in answers)
                assert int(full[0].headers["retry-after"]) >= 1 and "queue" in full[0].json()["detail"]
                slow.sendall(body[50:])
                assert slow.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        srv.stop()


def test_kill_9_under_load_loses_no_acknowledged_record(registry, good_files, tmp_path):
    db = tmp_path / "audit.db"
    srv = ServerProcess([*store_args(registry), "--workers", "2", "--poll-seconds", "0",
                         "--database", f"sqlite:///{db}"], tmp_path)
    acknowledged, names = [], [n for n in good_files if n.endswith(".jpg")]

    def client_loop(seed, stop):
        rng = random.Random(seed)
        with contextlib.suppress(httpx.TransportError), srv.client() as c:
            while not stop.is_set():
                name = rng.choice(names)
                r = c.post("/v1/predict", files={"files": (name, good_files[name])})
                if r.status_code == 200:
                    acknowledged.extend(p["record_id"] for p in r.json()["predictions"])

    try:
        srv.wait_ready()
        with load_in_background(client_loop, 8):
            wait_for_answers(acknowledged, 60)
            srv.kill9()  # mid-load: requests are in flight in both workers
    finally:
        if srv.alive():
            srv.stop()
    assert audit_rows(db, "PRAGMA integrity_check") == [("ok",)]
    stored = {row[0] for row in audit_rows(db, "SELECT id FROM predictions")}
    missing = set(acknowledged) - stored
    assert len(acknowledged) >= 60 and not missing, f"{len(missing)} acknowledged records lost"


# ---- the seams later components use -------------------------------------------------------------------------

def test_the_audit_schema_is_versioned_and_a_newer_database_is_refused(tmp_path):
    from sqlalchemy import text

    from serving.audit import Migration, make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    probe = Migration(1, "probe table", lambda conn: conn.execute(text("CREATE TABLE probe (id INTEGER)")))
    assert migrate(engine, {"probe": [probe]}) == {"serving": 2, "probe": 1}
    assert migrate(engine, {"probe": [probe]}) == {"serving": 2, "probe": 1}  # applied once
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_versions SET version = 7 WHERE component = 'serving'"))
    with pytest.raises(UserError, match="serving schema v7, newer than this toolkit"):
        migrate(engine)
    engine.dispose()
    assert (tmp_path / "audit.db").stat().st_mode & 0o077 == 0  # patient metadata: owner only


def test_an_extension_plugs_its_routes_hooks_and_tables_into_the_same_server(registry, tmp_path):
    import uvicorn
    from fastapi import APIRouter
    from sqlalchemy import text

    import serve
    from serving.app import Extension, create_app
    from serving.audit import Migration

    token_file, _ = write_token(tmp_path)
    args = serve.get_args_parser().parse_args(list(map(str, [*store_args(registry), "--token-file", token_file,
                                                            "--database", f"sqlite:///{tmp_path / 'a.db'}",
                                                            "--cors-origin", "https://viewer.example"])))
    router, started = APIRouter(), []
    router.add_api_route("/page/hello", lambda: {"hello": "reviewer"})
    verdicts = Migration(1, "verdicts", lambda conn: conn.execute(text("CREATE TABLE v (i INT)")))
    ext = Extension("page", router=router, on_startup=started.append, exempt_prefixes=("/page",),
                    migrations={"page": [verdicts]})
    app = create_app(serve.options_from_args(args), [ext])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 60)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            assert c.get("/page/hello").json() == {"hello": "reviewer"}  # its own login, not the bearer token
            assert c.get("/v1/model").status_code == 401
            preflight = c.options("/v1/predict", headers={"Origin": "https://viewer.example",
                                                          "Access-Control-Request-Method": "POST"})
            assert preflight.headers["access-control-allow-origin"] == "https://viewer.example"  # --cors-origin
        assert started == [app.state.service]
        assert audit_rows(tmp_path / "a.db", "SELECT component, version FROM schema_versions ORDER BY 1") == [
            ("page", 1), ("serving", 2)]
    finally:
        server.should_exit = True
        thread.join(60)

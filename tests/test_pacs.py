"""PACS integration against a real Orthanc, per instance (`pacs.results: slice`; per series: test_pacs_series.py):
images arrive by C-STORE, every frame is classified, an SR and burned-in secondary captures come back into the
study exactly once, even across a PACS outage and a kill -9
of the toolkit; refused peers and objects get the right DICOM answer and the receiver stays up; and the same
through serve.py --dicom-port, its API and its review worklist."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage, MRImageStorage, Verification

from conftest import ROOT, run_script, write_dicom
from core.config import load_config
from core.errors import UserError
from data.images import configure_limits, split_frame_name
from deploy.predictors import OnnxPredictor, TorchPredictor
from deploy.refer import ReferRule
from pacs.node import start_node
from pacs.pipeline import ServerHooks
from pacs.receiver import start_receiver
from pacs.report import DISCLAIMER, ModelInfo, make_report, read_report
from pacs.sender import Forwarder
from pacs.spool import Spool, destination_key
from tests.orthanc_server import Orthanc, free_port, requires_orthanc
from tests.server_process import ServerProcess
from tests.slowest import slow_setup

MODEL = ModelInfo("brain-cancer-resnet18", "1")
SR_MODALITY, SC_MODALITY = "SR", "OT"


@pytest.fixture(scope="module")
@slow_setup("exports the model to ONNX and loads it as ONNX and PyTorch")
def predictors(trained, tmp_path_factory):
    """The tiny trained model as ONNX (it classifies) and as PyTorch (its Grad-CAM is burned in)."""
    overlay, _, ckpt = trained
    out = tmp_path_factory.mktemp("pacs model")
    assert run_script("export_model", ["--config", overlay, "--model", "resnet18", "--checkpoint", ckpt,
                                       "--format", "onnx", "--output-dir", out, "--parity-images", "2"]) == 0
    return OnnxPredictor(out / "resnet18_model.onnx"), TorchPredictor(ckpt)


@pytest.fixture(scope="module")
def slices(tiny_data) -> np.ndarray:
    """Three real (synthetic) slices, one per class, as a scanner's 12-bit frames."""
    picks = [next(folder.glob("*.jpg")) for folder in sorted(p for p in tiny_data.iterdir() if p.is_dir())]
    return np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.uint16) * 16 for p in picks[:3]])


def write_mr(path, slices, **attrs):
    """A multi-frame MR with the patient and study attributes a scanner fills in."""
    study = dict(PatientName="Test^Phantom", PatientBirthDate="19700101", PatientSex="O", StudyDate="20260101",
                 StudyTime="120000", AccessionNumber="ACC0001", StudyID="1", InstanceNumber=1, SeriesNumber=3,
                 ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    return write_dicom(path, slices, (2000, 4000), **{**study, **attrs})


def pacs_settings(tmp_path, port: int, orthanc: Orthanc | None = None, *sets: str):
    destination = [f"pacs.destination=ORTHANC@127.0.0.1:{orthanc.dicom_port}"] if orthanc else []
    cfg = load_config(sets=["pacs.results=slice", f"pacs.port={port}", f"pacs.spool_dir={tmp_path / 'spool'}",
                            "pacs.timeout_s=10",
                            "pacs.retry.initial_s=0.2", "pacs.retry.max_s=1", *destination, *sets])
    configure_limits(cfg)  # as serve.py does at startup
    return cfg.pacs


@pytest.fixture
def orthanc(tmp_path):
    """A running Orthanc that knows the toolkit's receiver (on a port picked here) as modality 'mri_ai'."""
    port = free_port()
    (tmp_path / "orthanc").mkdir()
    server = Orthanc(tmp_path / "orthanc", {"mri_ai": ["MRI_AI", "127.0.0.1", port]})
    server.start()
    server.receiver_port = port
    yield server
    server.stop()


def wait_for_results(orthanc: Orthanc, study_uid: str, n_captures: int, n_reports: int = 1,
                     timeout_s: float = 120) -> dict:
    """{modality: [instance ids]} of the study's result series once n_reports SR and n_captures SC have arrived."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = {s["MainDicomTags"].get("Modality"): s["Instances"] for s in orthanc.study_series(study_uid)}
        if len(found.get(SR_MODALITY, [])) == n_reports and len(found.get(SC_MODALITY, [])) == n_captures:
            return found
        time.sleep(0.25)
    raise AssertionError(f"results did not arrive in {timeout_s} s: {found}")


def arrivals(orthanc: Orthanc, uid: str) -> int:
    return sum(1 for u, origin, _ in orthanc.received() if u == uid and origin == "DicomProtocol")


@requires_orthanc
def test_a_study_sent_by_orthanc_gets_its_sr_and_captures_back_exactly_once(orthanc, predictors, slices, tmp_path):
    onnx, torch_model = predictors
    predictions, seen = [], []
    hooks = ServerHooks(heatmaps=torch_model.cam_maps,
                        on_predictions=lambda records, ds, ae, peer, _: (predictions.extend(records),
                                                                      seen.append((ds, ae, peer))))
    node = start_node(pacs_settings(tmp_path, orthanc.receiver_port, orthanc), onnx, MODEL, hooks)
    try:
        mr = write_mr(tmp_path / "scan.dcm", slices)
        mr_id = orthanc.upload((tmp_path / "scan.dcm").read_bytes())
        status, answer = orthanc.store("mri_ai", mr_id)
        assert status == 200, answer
        # The C-STORE was answered after the predictions were recorded: they are here now, one per frame.
        expected = onnx.predict_file(tmp_path / "scan.dcm")
        assert [p["frame"] for p in predictions] == [1, 2, 3]
        for got, want in zip(predictions, expected):
            assert got["path"] == f"{mr.SOPInstanceUID}#frame={got['frame']}"
            assert (got["study_instance_uid"], got["series_instance_uid"], got["sop_instance_uid"]) == (
                mr.StudyInstanceUID, mr.SeriesInstanceUID, mr.SOPInstanceUID)
            assert got["predicted_class"] == want["predicted_class"]
            assert max(abs(got["probabilities"][k] - v) for k, v in want["probabilities"].items()) < 1e-6
            # no intensity reference in this model: the threshold and the record's own answer checks decide
            assert got["refer"] == ReferRule(0.6).assess(got, None).refer and got["version"] == "1"
        ds, calling_ae, peer = seen[0]
        assert (calling_ae, peer) == ("ORTHANC", "127.0.0.1")
        assert str(ds.PatientName) == "" and not ds.get("PatientBirthDate") and ds.PatientID == "TEST0001"

        found = wait_for_results(orthanc, mr.StudyInstanceUID, n_captures=3)
        sr = dcmread(io.BytesIO(orthanc.instance_file(found[SR_MODALITY][0])))
        assert sr.StudyInstanceUID == mr.StudyInstanceUID and sr.SeriesInstanceUID != mr.SeriesInstanceUID
        assert str(sr.PatientName) == "" and sr.PatientID == "TEST0001" and sr.VerificationFlag == "UNVERIFIED"
        report = read_report(sr)
        assert [r["frame"] for r in report] == [1, 2, 3]
        for frame, prediction in zip(report, predictions):
            assert frame["sop_instance_uid"] == mr.SOPInstanceUID
            assert frame["predicted_class"] == prediction["predicted_class"] and frame["refer"] == prediction["refer"]
            assert frame["reasons"] == prediction["refer_reasons"]  # the SR says why, as the audit record does
            assert frame["out_of_distribution"] == prediction["out_of_distribution"]
            assert frame["prediction_set"] == prediction["prediction_set"]
            assert (frame["model"], frame["version"]) == (MODEL.name, MODEL.version)
            assert frame["probabilities"].keys() == prediction["probabilities"].keys()
            assert max(abs(frame["probabilities"][k] - p) for k, p in prediction["probabilities"].items()) < 1e-6
        captures = sorted((dcmread(io.BytesIO(orthanc.instance_file(i))) for i in found[SC_MODALITY]),
                          key=lambda d: d.SourceImageSequence[0].ReferencedFrameNumber)
        for frame, capture in enumerate(captures, 1):
            assert capture.StudyInstanceUID == mr.StudyInstanceUID and capture.BurnedInAnnotation == "YES"
            assert capture.ImageComments == DISCLAIMER and capture.SourceImageSequence[0].ReferencedFrameNumber == frame
            rgb = capture.pixel_array.astype(int)
            assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 50  # the heat map's colours, not a grey slice
        for uid in [sr.SOPInstanceUID] + [c.SOPInstanceUID for c in captures]:
            assert arrivals(orthanc, uid) == 1
    finally:
        node.stop()


CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from core.config import load_config
from core.errors import UserError
from deploy.predictors import OnnxPredictor
from pacs.node import start_node
from pacs.pipeline import InstancePipeline
from pacs.receiver import start_receiver
from pacs.report import ModelInfo
from pacs.spool import Spool
settings, model = load_config(sets={sets!r}).pacs, ModelInfo("brain-cancer-resnet18", "1")
predictor = OnnxPredictor({onnx!r})
if {whole!r}:
    start_node(settings, predictor, model)
else:  # the receiver alone: instances are classified and kept, no result is made or sent
    start_receiver(settings, InstancePipeline(predictor, model, settings, Spool(settings.spool_dir,
                                                                                settings.destination_peer)))
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def start_child(settings_sets: list[str], onnx_path, whole: bool, log) -> subprocess.Popen:
    """The toolkit's DICOM node (or its receiver alone) in a process of its own, so that the test can kill -9 it."""
    code = CHILD.format(root=str(ROOT), sets=settings_sets, onnx=str(onnx_path), whole=whole)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=log, text=True)
    assert child.stdout.readline().strip() == "ready", "the node process did not start"
    return child


def node_sets(tmp_path, port: int, orthanc: Orthanc) -> list[str]:
    return ["pacs.results=slice", f"pacs.port={port}", f"pacs.spool_dir={tmp_path / 'spool'}", "pacs.timeout_s=10",
            "pacs.retry.initial_s=0.3", "pacs.retry.max_s=2",
            f"pacs.destination=ORTHANC@127.0.0.1:{orthanc.dicom_port}"]


def files(folder, pattern="*.dcm") -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


def wait_until(condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@requires_orthanc
def test_results_survive_a_pacs_outage_and_a_kill_9_and_arrive_once(orthanc, predictors, slices, tmp_path):
    onnx = predictors[0]
    sets = node_sets(tmp_path, orthanc.receiver_port, orthanc)
    spool = tmp_path / "spool" / destination_key(load_config(sets=sets).pacs.destination_peer)
    mr = write_mr(tmp_path / "scan.dcm", slices)
    mr_id = orthanc.upload((tmp_path / "scan.dcm").read_bytes())
    children = []
    with open(tmp_path / "node.log", "w") as log:
        try:
            # 1. The receiver takes the study: classified and kept on disk before the C-STORE is answered.
            children.append(start_child(sets, onnx.onnx_path, whole=False, log=log))
            assert orthanc.store("mri_ai", mr_id)[0] == 200
            job = files(spool / "incoming", "job-*")
            assert [n.rsplit(".", 1)[1] for n in job] == ["dcm", "json"]
            # 2. The PACS goes down before the results are due, and the toolkit dies without cleaning up.
            orthanc.stop()
            os.kill(children[0].pid, signal.SIGKILL)
            children[0].wait()
            # 3. A new node on the same spool makes the results, finds the PACS down, keeps them, retries.
            children.append(start_child(sets, onnx.onnx_path, whole=True, log=log))
            wait_until(lambda: len(files(spool / "pending")) == 4 and not files(spool / "incoming"))
            time.sleep(1.5)  # a few failed tries (0.3, 0.6, 1.2 s apart); not a timing assertion
            assert len(files(spool / "pending")) == 4  # one SR + three captures, none lost
            # 4. The PACS is back: every result arrives, once.
            orthanc.start()
            found = wait_for_results(orthanc, mr.StudyInstanceUID, n_captures=3)
            wait_until(lambda: not files(spool / "pending"))
        finally:
            for child in children:
                child.kill()
                child.wait()
    assert "next try in" in (tmp_path / "node.log").read_text()
    results = [orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
               for i in found[SR_MODALITY] + found[SC_MODALITY]]
    assert len(results) == 4 and [arrivals(orthanc, uid) for uid in results] == [1, 1, 1, 1]
    assert sorted(files(spool / "sent", "*")) == sorted(results)

    # 5. The same study again: the same results (same UIDs) are made but not queued, so not sent, again.
    node = start_node(load_config(sets=sets).pacs, onnx, MODEL)
    try:
        assert orthanc.store("mri_ai", mr_id)[0] == 200
        wait_until(lambda: not files(spool / "incoming", "job-*"))
        assert not files(spool / "pending")
    finally:
        node.stop()
    assert [arrivals(orthanc, uid) for uid in results] == [1, 1, 1, 1]


def scu_associate(port: int, calling: str = "ORTHANC", called: str = "MRI_AI", contexts=(MRImageStorage,)):
    ae = AE(ae_title=calling)
    for context in (*contexts, Verification):
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title=called)


@requires_orthanc
def test_a_wrong_ae_title_and_a_non_image_object_are_refused_and_the_receiver_stays_up(orthanc, predictors, slices,
                                                                                     tmp_path):
    received = []
    settings = pacs_settings(tmp_path, orthanc.receiver_port, None, "pacs.allow=[ORTHANC@127.0.0.1]")
    node = start_node(settings, predictors[0], MODEL, ServerHooks(on_predictions=lambda r, *_: received.extend(r)))
    try:
        mr = write_mr(tmp_path / "scan.dcm", slices)
        mr_id = orthanc.upload((tmp_path / "scan.dcm").read_bytes())
        # Orthanc calling as an AE title that is not allowed: the association is rejected, nothing classified.
        status, answer = orthanc.store("mri_ai", mr_id, LocalAet="INTRUDER")
        assert status != 200 and "Association Rejected" in answer["Details"] and not received
        assoc = scu_associate(node.port, calling="INTRUDER")
        assert assoc.is_rejected
        rejection = assoc.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)  # calling AE unknown
        assoc = scu_associate(node.port, called="SOMEONE_ELSE")
        assert assoc.is_rejected and assoc.acceptor.primitive.diagnostic == 7  # called AE title not recognized

        # A structured report is not an image: refused with 0x0122, through Orthanc and directly.
        frame = {"frame": None, "sop_class_uid": mr.SOPClassUID, "sop_instance_uid": mr.SOPInstanceUID,
                 "predicted_class": "glioma", "probabilities": {"glioma": 1.0}, "refer": False}
        sr_path = tmp_path / "report.dcm"
        make_report(mr, [frame], ModelInfo("another-model", "7")).save_as(sr_path, enforce_file_format=True)
        status, answer = orthanc.store("mri_ai", orthanc.upload(sr_path.read_bytes()))
        assert status != 200 and "DIMSE status 0x0122" in answer["Details"] and not received
        assoc = scu_associate(node.port, contexts=(ComprehensiveSRStorage,))
        assert assoc.send_c_store(dcmread(sr_path)).Status == 0x0122
        assoc.release()

        # Still up: an echo, then the image itself, classified frame by frame.
        assert orthanc.request("POST", "/modalities/mri_ai/echo", b"{}")[0] == 200
        assert orthanc.store("mri_ai", mr_id)[0] == 200
        assert [r["frame"] for r in received] == [1, 2, 3] and received[0]["sop_instance_uid"] == mr.SOPInstanceUID
    finally:
        node.stop()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom's, on the hostile UID below
def test_hostile_instances_get_a_failure_status_and_the_receiver_stays_up(predictors, slices, tmp_path):
    received = []
    settings = pacs_settings(tmp_path, 0, None, "pacs.allow=[ORTHANC@127.0.0.1]", "images.max_frames=3",
                             "images.max_pixels=10000", "pacs.max_instance_mb=1")
    node = start_node(settings, predictors[0], MODEL, ServerHooks(on_predictions=lambda r, ds, *_: received.append(ds)))
    try:
        assoc = scu_associate(node.port)
        good = write_mr(tmp_path / "good.dcm", slices)
        truncated = dcmread(tmp_path / "good.dcm")
        truncated.PixelData = truncated.PixelData[:1000]  # pixel data cut short: cannot be decoded
        truncated.SOPInstanceUID = "1.2.3.4.5"
        answer = assoc.send_c_store(truncated)
        assert answer.Status == 0xC000 and str(tmp_path) not in answer.ErrorComment  # no server paths
        no_study = dcmread(tmp_path / "good.dcm")
        no_study.StudyInstanceUID = "../../etc"  # results are filed by UID: a path is not one
        assert assoc.send_c_store(no_study).Status == 0xC000
        four = write_mr(tmp_path / "four.dcm", np.concatenate([slices, slices[:1]]))  # over images.max_frames
        assert assoc.send_c_store(four).Status == 0xA700
        wide = write_mr(tmp_path / "wide.dcm", np.zeros((1, 64, 200), dtype=np.uint16))  # over images.max_pixels
        assert assoc.send_c_store(wide).Status == 0xA700
        assert assoc.send_c_store(good).Status == 0x0000 and len(received) == 1
        assoc.release()
        # Over the byte cap: the association is aborted before the whole object is taken in.
        huge = write_mr(tmp_path / "huge.dcm", (np.arange(3 * 700 * 700) % 4096).reshape(3, 700, 700))
        assoc = scu_associate(node.port)
        assert "Status" not in assoc.send_c_store(huge)
        assoc = scu_associate(node.port)
        assert assoc.send_c_echo().Status == 0x0000 and assoc.send_c_store(good).Status == 0x0000
        assoc.release()
    finally:
        node.stop()
    assert len(received) == 2 and all(str(ds.PatientName) == "" for ds in received)


def test_patient_identity_is_kept_only_when_asked_and_a_new_model_names_its_version(predictors, slices, tmp_path):
    received = []
    settings = pacs_settings(tmp_path, 0, None, "pacs.allow=[ORTHANC@127.0.0.1]", "pacs.keep_patient_identity=true")
    hooks = ServerHooks(on_predictions=lambda records, ds, *_: received.append((records, ds)))
    node = start_node(settings, predictors[0], MODEL, hooks)
    try:
        assoc = scu_associate(node.port)
        assert assoc.send_c_store(write_mr(tmp_path / "scan.dcm", slices)).Status == 0x0000
        node.use_model(predictors[0], ModelInfo(MODEL.name, "2"))  # e.g. the production alias moved
        assert assoc.send_c_store(write_mr(tmp_path / "next.dcm", slices)).Status == 0x0000
        assoc.release()
    finally:
        node.stop()
    assert str(received[0][1].PatientName) == "Test^Phantom" and received[0][1].PatientBirthDate == "19700101"
    assert [records[0]["version"] for records, _ in received] == ["1", "2"]


def test_a_result_the_destination_keeps_refusing_is_kept_aside_not_lost(tmp_path, slices):
    """The destination here is a toolkit receiver, which refuses an SR (0x0122) every time it is offered."""
    destination = start_receiver(pacs_settings(tmp_path, 0, None, "pacs.allow=[MRI_AI@127.0.0.1]",
                                               "pacs.ae_title=ARCHIVE"), lambda *a: None)
    try:
        settings = pacs_settings(tmp_path, 0, None, f"pacs.destination=ARCHIVE@127.0.0.1:{destination.port}",
                                 "pacs.retry.max_attempts=2")
        spool = Spool(settings.spool_dir, settings.destination_peer)
        mr = write_mr(tmp_path / "scan.dcm", slices)
        frame = {"frame": None, "sop_class_uid": mr.SOPClassUID, "sop_instance_uid": mr.SOPInstanceUID,
                 "predicted_class": "glioma", "probabilities": {"glioma": 1.0}, "refer": False}
        sr = make_report(mr, [frame], MODEL)
        assert spool.put(sr) and not spool.put(sr)  # keyed by SOP Instance UID: queued once
        forwarder = Forwarder(spool, settings)
        first, second = forwarder.send_pending(), forwarder.send_pending()
    finally:
        destination.stop()
    assert (first.refused, first.given_up, first.remaining) == (1, 0, 1)
    assert (second.refused, second.given_up, second.remaining) == (1, 1, 0)
    assert "0x0122" in spool.failure_reason(sr.SOPInstanceUID)
    assert dcmread(spool.failed_dir / f"{sr.SOPInstanceUID}.dcm").SOPInstanceUID == sr.SOPInstanceUID
    assert not spool.put(sr)  # made again, it is not offered again: failed/ is looked at by a person


@requires_orthanc
def test_send_to_pacs_returns_inference_results_into_their_study_once(orthanc, registered, slices, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    mr = write_mr(results / "scan.dcm", slices)
    single = write_mr(results / "single.dcm", slices[1], SeriesInstanceUID=mr.SeriesInstanceUID,
                      StudyInstanceUID=mr.StudyInstanceUID, InstanceNumber=2)
    Image.fromarray((slices[0] // 16).astype(np.uint8)).save(results / "slice.png")  # not DICOM: no PACS result
    for name in ("scan.dcm", "single.dcm"):
        orthanc.upload((results / name).read_bytes())
    assert run_script("inference_with_mlflow", registered + ["--model", "brain-cancer-resnet18", "--alias",
                                                             "staging", "--json", "--image", results]) == 0
    (results / "predictions.json").write_text(capsys.readouterr().out)
    doc = json.loads((results / "predictions.json").read_text())
    argv = [results, "--host", "127.0.0.1", "--port", orthanc.dicom_port, "--ae-title", "ORTHANC",
            "--set", f"pacs.spool_dir={tmp_path / 'spool'}", "--set", "pacs.timeout_s=5"]

    orthanc.stop()  # the PACS is down: everything waits in the spool
    assert run_script("send_to_pacs", argv) == 1
    assert "6 result(s) queued, 0 sent" in capsys.readouterr().out  # 2 SR + 4 captures
    orthanc.start()
    assert run_script("send_to_pacs", argv) == 0
    assert "0 result(s) queued, 6 sent" in capsys.readouterr().out
    assert run_script("send_to_pacs", argv) == 0
    assert "0 result(s) queued, 0 sent" in capsys.readouterr().out  # nothing twice

    found = wait_for_results(orthanc, mr.StudyInstanceUID, n_captures=4, n_reports=2)
    reports = [dcmread(io.BytesIO(orthanc.instance_file(i))) for i in found[SR_MODALITY]]
    got = {(r["sop_instance_uid"], r["frame"]): r for sr in reports for r in read_report(sr)}
    uid_of = {"scan.dcm": mr.SOPInstanceUID, "single.dcm": single.SOPInstanceUID}
    for prediction in doc["predictions"]:
        path, frame = split_frame_name(prediction["path"])
        if path.name == "slice.png":
            continue
        frame_report = got.pop((uid_of[path.name], frame))
        assert frame_report["predicted_class"] == prediction["predicted_class"]
        assert (frame_report["model"], frame_report["version"]) == (doc["model"], str(doc["version"]))
        assert max(abs(frame_report["probabilities"][k] - p) for k, p in prediction["probabilities"].items()) < 1e-6
        # the answer checks the command line gives are the SR's
        assert (frame_report["out_of_distribution"], frame_report["prediction_set"]) == (
            prediction["out_of_distribution"], prediction["prediction_set"])
    assert not got
    assert all(arrivals(orthanc, sr.SOPInstanceUID) == 1 for sr in reports)


def test_a_compressed_instance_is_decoded_like_the_file_it_came_from(predictors, slices, tmp_path):
    received = []
    settings = pacs_settings(tmp_path, 0, None, "pacs.allow=[ORTHANC@127.0.0.1]")
    node = start_node(settings, predictors[0], MODEL, ServerHooks(on_predictions=lambda r, *_: received.extend(r)))
    try:
        mr = write_mr(tmp_path / "scan.dcm", slices)
        mr.compress(RLELossless)
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(MRImageStorage, [RLELossless])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MRI_AI")
        assert assoc.send_c_store(mr).Status == 0x0000
        assoc.release()
    finally:
        node.stop()
    expected = predictors[0].predict_file(tmp_path / "scan.dcm")
    assert [r["frame"] for r in received] == [1, 2, 3]
    for got, want in zip(received, expected):
        assert max(abs(got["probabilities"][k] - v) for k, v in want["probabilities"].items()) < 1e-6


@pytest.mark.parametrize("assignment, key", [
    ("pacs.destination=ORTHANC@127.0.0.1", "pacs.destination"),  # no port
    ("pacs.allow=[SCANNER]", "pacs.allow"),  # no host
    ("pacs.ae_title=SEVENTEEN_LETTERS", "pacs.ae_title"),
])
def test_pacs_settings_that_cannot_work_are_refused_in_one_line(assignment, key):
    with pytest.raises(UserError, match=f"invalid config value for '{key}'"):
        load_config(sets=[assignment])


def test_send_to_pacs_says_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="together"):
        run_script("send_to_pacs", [tmp_path, "--host", "127.0.0.1"])
    done = subprocess.run([sys.executable, str(ROOT / "send_to_pacs.py"), str(tmp_path), "--host", "127.0.0.1",
                           "--port", "4242", "--ae-title", "ORTHANC", "--set", f"pacs.spool_dir={tmp_path / 'spool'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "predictions.json" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# ---- serve.py --dicom-port: the receiver inside the HTTP server ------------------------------------------------

def served_predictions(server, study_uid: str, n: int, timeout_s: float = 60) -> list[dict]:
    """GET /v1/predictions?study_uid=... once it lists n predictions."""
    deadline = time.monotonic() + timeout_s
    with server.client() as client:
        while True:
            answer = client.get("/v1/predictions", params={"study_uid": study_uid})
            assert answer.status_code == 200, answer.text
            found = answer.json()["predictions"]
            if len(found) >= n or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


def db_rows(db, sql: str) -> list:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


@requires_orthanc
def test_serve_py_takes_a_study_from_orthanc_into_its_api_and_worklist_and_sends_the_results_back(
        orthanc, registered, slices, tmp_path):
    db, store = tmp_path / "audit.db", tmp_path / "store"
    server = ServerProcess([*registered, "--model", "brain-cancer-resnet18", "--alias", "staging", "--review",
                            "--database", f"sqlite:///{db}", "--poll-seconds", "0",
                            "--dicom-port", orthanc.receiver_port, "--ae-title", "MRI_AI",
                            "--pacs-destination", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                            "--set", f"pacs.spool_dir={tmp_path / 'spool'}", "--set", f"review.store_dir={store}",
                            "--set", "pacs.results=slice",
                            "--set", "pacs.retry.initial_s=0.2"], tmp_path)
    try:
        server.wait_ready()
        mr = write_mr(tmp_path / "scan.dcm", slices)
        status, answer = orthanc.store("mri_ai", orthanc.upload((tmp_path / "scan.dcm").read_bytes()))
        assert status == 200, answer
        api = served_predictions(server, mr.StudyInstanceUID, 3)
        assert [p["frame"] for p in api] == [1, 2, 3]
        for p in api:
            assert (p["source"], p["client"], p["series_uid"], p["sop_instance_uid"]) == (
                "dicom", "ORTHANC@127.0.0.1", mr.SeriesInstanceUID, mr.SOPInstanceUID)
            assert (p["model"], p["version"]) == ("brain-cancer-resnet18", "1") and isinstance(p["refer"], bool)

        found = wait_for_results(orthanc, mr.StudyInstanceUID, n_captures=3)
        report = read_report(dcmread(io.BytesIO(orthanc.instance_file(found[SR_MODALITY][0]))))
        assert [r["frame"] for r in report] == [1, 2, 3]
        for frame, p in zip(report, api):
            assert (frame["predicted_class"], frame["refer"], frame["model"], frame["version"]) == (
                p["predicted_class"], p["refer"], p["model"], p["version"])
            assert max(abs(frame["probabilities"][k] - v) for k, v in p["probabilities"].items()) < 1e-6
        capture = dcmread(io.BytesIO(orthanc.instance_file(found[SC_MODALITY][0]))).pixel_array.astype(int)
        assert np.abs(capture[..., 0] - capture[..., 2]).max() > 50  # the served version's Grad-CAM burned in

        # On the worklist: one case for the instance, one item per frame, with the refer flag the SR carries.
        items = db_rows(db, "SELECT c.source, c.client, c.study_uid, i.frame, i.refer, i.prediction_id, c.file_ref "
                            "FROM review_items i JOIN review_cases c ON c.id = i.case_id ORDER BY i.frame")
        assert [row[:3] for row in items] == [("dicom", "ORTHANC@127.0.0.1", mr.StudyInstanceUID)] * 3
        assert [(row[3], bool(row[4]), row[5]) for row in items] == [(p["frame"], p["refer"], p["record_id"])
                                                                     for p in api]
        kept = dcmread(store / items[0][6])  # the instance as the page shows it: no patient name or birth date
        assert str(kept.PatientName) == "" and not kept.get("PatientBirthDate")
        assert not any("Phantom" in row[0] for row in db_rows(db, "SELECT output_json FROM predictions"))
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def test_serve_py_runs_the_dicom_receiver_in_one_process_on_a_free_port_and_spool(registered, tmp_path):
    served = [*registered, "--model", "brain-cancer-resnet18", "--alias", "staging"]
    with pytest.raises(UserError, match="one server process"):
        run_script("serve", [*served, "--workers", "2", "--dicom-port", free_port()])
    with pytest.raises(UserError, match="give --dicom-port"):
        run_script("serve", [*served, "--pacs-destination", "ORTHANC@127.0.0.1:4242"])
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(UserError, match="cannot listen for DICOM"):
            run_script("serve", [*served, "--dicom-port", taken.getsockname()[1]])
    settings = pacs_settings(tmp_path, 0, None, "pacs.destination=ORTHANC@127.0.0.1:4242")
    running = Spool(settings.spool_dir, settings.destination_peer).acquire()  # another server sends from it
    try:
        with pytest.raises(UserError, match="in use by another process"):
            run_script("serve", [*served, "--dicom-port", free_port(), "--pacs-destination", settings.destination,
                                 "--set", f"pacs.spool_dir={settings.spool_dir}"])
    finally:
        running.release()


@requires_orthanc
def test_dicom_arrivals_follow_the_served_alias_to_a_new_version(orthanc, registered, slices, tmp_path):
    """The alias moves while the server runs: the next instance is classified, recorded and reported by the new
    version, and its SR names that version."""
    source = Path(registered[registered.index("--set") + 1].split("sqlite:///", 1)[1]).parent
    shutil.copy(source / "registry.db", tmp_path / "registry.db")  # a registry of its own: others keep theirs
    store = [*registered[:2], "--set", f"monitoring.mlflow.tracking_uri=sqlite:///{tmp_path / 'registry.db'}",
             "--set", f"monitoring.mlflow.artifact_location={tmp_path / 'mlartifacts'}"]
    server = ServerProcess([*store, "--model", "brain-cancer-resnet18", "--alias", "staging", "--poll-seconds", "0.5",
                            "--database", f"sqlite:///{tmp_path / 'audit.db'}",
                            "--dicom-port", orthanc.receiver_port, "--ae-title", "MRI_AI",
                            "--pacs-destination", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                            "--set", f"pacs.spool_dir={tmp_path / 'spool'}", "--set", "pacs.retry.initial_s=0.2",
                            "--set", "pacs.results=slice"],
                           tmp_path)
    try:
        server.wait_ready()
        assert run_script("register_model", store + ["--model", "resnet18", "--version", "2.0.0", "--alias", "staging",
                                                     "--force", "--set",
                                                     f"train.output_dir={source / 'checkpoints'}"]) == 0
        with server.client() as client:
            deadline = time.monotonic() + 120
            while client.get("/v1/model").json().get("version") != "2" and time.monotonic() < deadline:
                time.sleep(0.5)
        mr = write_mr(tmp_path / "scan.dcm", slices[:1])
        status, answer = orthanc.store("mri_ai", orthanc.upload((tmp_path / "scan.dcm").read_bytes()))
        assert status == 200, answer
        api = served_predictions(server, mr.StudyInstanceUID, 1)
        assert [(p["model"], p["version"]) for p in api] == [("brain-cancer-resnet18", "2")]
        found = wait_for_results(orthanc, mr.StudyInstanceUID, n_captures=1)
        report = read_report(dcmread(io.BytesIO(orthanc.instance_file(found[SR_MODALITY][0]))))
        assert [(r["model"], r["version"]) for r in report] == [("brain-cancer-resnet18", "2")]
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def test_a_peer_whose_name_resolves_late_or_moves_is_admitted_without_a_restart(monkeypatch):
    """In compose or Kubernetes the PACS's name may not resolve yet when the node starts, and a restarted PACS
    comes back at another address: names are looked up again when an unknown address calls (at most every
    refresh_s, so strangers cannot make the node flood its resolver). The name service is the network's, so it is
    stood in for here."""
    from core.config import parse_peer
    from pacs.receiver import AllowList

    names: dict[str, str] = {}
    lookups = []

    def resolve(host, *args, **kwargs):
        lookups.append(host)
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], 0))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    allow = AllowList([parse_peer("ORTHANC@orthanc")], refresh_s=0.3)
    assert not allow.admits("ORTHANC", "10.0.0.5")  # not resolvable at start: no one is admitted
    names["orthanc"] = "10.0.0.5"
    assert not allow.knows("10.0.0.5") and len(lookups) == 1  # within refresh_s: no second lookup
    time.sleep(0.35)
    assert allow.admits("ORTHANC", "10.0.0.5") and not allow.admits("OTHER", "10.0.0.5")
    names["orthanc"] = "10.0.0.9"  # the PACS restarted at another address
    time.sleep(0.35)
    assert allow.admits("ORTHANC", "10.0.0.9") and not allow.knows("10.0.0.5")

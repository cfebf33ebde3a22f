"""The DICOM node per series, against a real Orthanc: a series sent by the PACS gets one SR, one Key Object
Selection and one secondary capture back (the series rule on its slices' records, the KOS naming the key slices);
each series its own; a localizer series is skipped with an audit row; the node's own results routed back are not
read again; a late instance amends the result; a kill -9 loses and duplicates nothing."""
from __future__ import annotations

import io
import os
import signal
import time
import zipfile

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid

from core.config import load_config
from pacs.keyobjects import make_key_objects, read_key_objects
from pacs.node import start_node
from pacs.pipeline import ServerHooks
from pacs.report import ModelInfo, SeriesOutput, make_series_report, read_series_report
from pacs.selection import is_own_output, skip_reason
from pacs.spool import destination_key
from series.rule import SeriesRule, SliceCheck, read_series
from tests import test_pacs
from tests.conftest import write_dicom
from tests.orthanc_server import Orthanc, requires_orthanc
from tests.server_process import ServerProcess
from tests.test_pacs import MODEL, arrivals, files, pacs_settings, start_child, wait_until

orthanc, predictors = test_pacs.orthanc, test_pacs.predictors  # the PACS tests' fixtures: a real Orthanc, the model

SERIES = ["pacs.results=series", "pacs.series_complete=association"]


@pytest.fixture(scope="module")
def pictures(tiny_data) -> list[np.ndarray]:
    """Every image of the tiny data set as a scanner's 12-bit slice (8 per class)."""
    paths = sorted(p for folder in sorted(tiny_data.iterdir()) if folder.is_dir() for p in folder.glob("*.jpg"))
    return [np.asarray(Image.open(p).convert("L"), dtype=np.uint16) * 16 for p in paths]


def write_series(folder, pictures, n: int, study: str, start: int = 0, series: str | None = None,
                 image_type=("ORIGINAL", "PRIMARY", "M"), first_slice: int = 0) -> list:
    """n single-frame MR slices of one series, 5 mm apart along z, InstanceNumber running against the position."""
    folder.mkdir(parents=True, exist_ok=True)
    series = series or generate_uid()
    out = []
    for k in range(first_slice, first_slice + n):
        out.append(write_dicom(folder / f"{series[-8:]}-{k:02d}.dcm", pictures[(start + k) % len(pictures)],
                               (2000, 4000), StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=100 - k,
                               ImagePositionPatient=[0, 0, 5.0 * k], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                               ImageType=list(image_type), SeriesNumber=3, PatientSex="O", StudyDate="20260101",
                               StudyTime="120000", AccessionNumber="ACC0002", StudyID="2",
                               SeriesDescription="T1 axial"))
    return out


def upload(orthanc: Orthanc, folder) -> dict[str, str]:
    """Every file of a folder into Orthanc: {SOP Instance UID: Orthanc series id}."""
    out = {}
    for path in sorted(folder.glob("*.dcm")):
        instance = orthanc.upload(path.read_bytes())
        out[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = orthanc.get(f"/instances/{instance}")[
            "ParentSeries"]
    return out


def result_series(orthanc: Orthanc, study_uid: str) -> dict[str, list[str]]:
    """{modality: [instance ids]} of the study's SR, KO and OT series."""
    found: dict[str, list[str]] = {}
    for s in orthanc.study_series(study_uid):
        found.setdefault(s["MainDicomTags"].get("Modality"), []).extend(s["Instances"])
    return {k: v for k, v in found.items() if k in ("SR", "KO", "OT")}


def wait_for(orthanc: Orthanc, study_uid: str, n: int, timeout_s: float = 120) -> dict[str, list]:
    """The study's results once n SR, n KO and n SC have arrived: {modality: [datasets]}."""
    deadline, found = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        found = result_series(orthanc, study_uid)
        if all(len(found.get(m, [])) == n for m in ("SR", "KO", "OT")):
            return {m: [dcmread(io.BytesIO(orthanc.instance_file(i))) for i in ids] for m, ids in found.items()}
        time.sleep(0.25)
    raise AssertionError(f"results did not arrive in {timeout_s} s: {found}")


def expected_result(records: list[dict], positions: dict[str, float]):
    """The series rule applied to the slices' records, ordered here by the position the test wrote."""
    ordered = sorted(records, key=lambda r: positions[r["sop_instance_uid"]])
    names = list(ordered[0]["probabilities"])
    probs = np.array([[r["probabilities"][c] for c in names] for r in ordered])
    checks = [SliceCheck(refer=r["refer"]) for r in ordered]  # the slice refer rule's flags, as the SR shows them
    return read_series(probs, names, SeriesRule(), checks), ordered


def by_series(datasets, series: list) -> list:
    """The results (of one kind) that answer a source series (its datasets): by the slices they reference."""
    sops = {ds.SOPInstanceUID for ds in series}

    def source(ds) -> str:
        if ds.Modality == "SR":
            return read_series_report(ds)["key_slices"][0][0]
        if ds.Modality == "KO":
            return read_key_objects(ds)[0][0]
        return ds.SourceImageSequence[0].ReferencedSOPInstanceUID
    return [ds for ds in datasets if source(ds) in sops]


@requires_orthanc
def test_a_series_sent_by_orthanc_gets_one_sr_one_kos_and_one_capture_back(orthanc, predictors, pictures, tmp_path):
    onnx, torch_model = predictors
    records, events = [], []
    hooks = ServerHooks(heatmaps=torch_model.cam_maps, on_series=events.append,
                        on_predictions=lambda r, *_: records.extend(r))
    node = start_node(pacs_settings(tmp_path, orthanc.receiver_port, orthanc, *SERIES), onnx, MODEL, hooks)
    study = generate_uid()
    try:
        first = write_series(tmp_path / "study", pictures, 24, study, start=0)
        second = write_series(tmp_path / "study", pictures, 10, study, start=9)
        localizer = write_series(tmp_path / "study", pictures, 3, study, image_type=("ORIGINAL", "PRIMARY",
                                                                                      "LOCALIZER"))
        series_ids = upload(orthanc, tmp_path / "study")
        study_id = orthanc.get(f"/series/{series_ids[first[0].SOPInstanceUID]}")["ParentStudy"]
        assert orthanc.store("mri_ai", study_id)[0] == 200  # the whole study, in one association
        found = wait_for(orthanc, study, 2)

        # Only the two MR series were classified: one record per slice, the localizer never.
        sent = {ds.SOPInstanceUID for ds in first + second}
        assert sorted(r["sop_instance_uid"] for r in records) == sorted(sent)
        skipped = [e for e in events if e["outcome"] == "skipped"]
        assert len(skipped) == 1 and skipped[0]["series_uid"] == localizer[0].SeriesInstanceUID
        assert "LOCALIZER" in skipped[0]["reason"]

        positions = {ds.SOPInstanceUID: float(ds.ImagePositionPatient[2]) for ds in first + second}
        for series in (first, second):
            uid = series[0].SeriesInstanceUID
            mine = [r for r in records if r["series_instance_uid"] == uid]
            want, ordered = expected_result(mine, positions)
            (sr,), (kos,) = by_series(found["SR"], series), by_series(found["KO"], series)
            report = read_series_report(sr)
            assert (report["predicted_class"], report["refer"]) == (want.predicted_class, want.refer)
            assert max(abs(report["probabilities"][c] - p) for c, p in want.probabilities.items()) < 1e-6
            keys = [(ordered[i]["sop_instance_uid"], None) for i in want.key_slices]
            assert report["key_slices"] == keys and sorted(read_key_objects(kos)) == sorted(keys)
            assert (report["model"], report["version"]) == (MODEL.name, MODEL.version) and report["amends"] == []
            texts = [item.TextValue for item in kos.ContentSequence if "TextValue" in item]
            assert sr.StudyInstanceUID == kos.StudyInstanceUID == study
            assert any("not for primary diagnosis" in t for t in texts)
            event = next(e for e in events if e["series_uid"] == uid)
            assert (event["outcome"], event["n_slices"], event["result"]["predicted_class"]) == (
                "read", len(series), want.predicted_class)
        captures = found["OT"]
        assert [len(by_series(captures, s)) for s in (first, second)] == [1, 1]
        assert all(c.BurnedInAnnotation == "YES" and c.StudyInstanceUID == study for c in captures)
        rgb = captures[0].pixel_array.astype(int)
        assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 50  # the key slices' heat maps, not grey slices
        results = [ds.SOPInstanceUID for kind in found.values() for ds in kind]
        assert len(results) == 6 and all(arrivals(orthanc, uid) == 1 for uid in results)

        # The PACS routes the node's own capture back: taken, not classified, no new result.
        n_records = len(records)
        capture_id = result_series(orthanc, study)["OT"][0]
        assert orthanc.store("mri_ai", capture_id)[0] == 200
        time.sleep(1.0)
        assert len(records) == n_records and len(events) == 3

        # A late instance of the first series: an amended result (revision 1) naming the first SR it replaces.
        late = write_series(tmp_path / "late", pictures, 1, study, series=first[0].SeriesInstanceUID, first_slice=24)
        late_id = orthanc.upload((tmp_path / "late" / os.listdir(tmp_path / "late")[0]).read_bytes())
        assert orthanc.store("mri_ai", late_id)[0] == 200
        amended = wait_for(orthanc, study, 3)
        new_sr = [ds for ds in by_series(amended["SR"], first + late) if ds.InstanceNumber == 2]
        (old_sr,) = by_series(found["SR"], first)
        report = read_series_report(new_sr[0])
        assert report["amends"] == [old_sr.SOPInstanceUID] and events[-1]["outcome"] == "amended"
        mine = [r for r in records if r["series_instance_uid"] == first[0].SeriesInstanceUID]
        positions[late[0].SOPInstanceUID] = float(late[0].ImagePositionPatient[2])
        want, _ = expected_result(mine, positions)
        assert len(mine) == 25 and report["predicted_class"] == want.predicted_class
        assert events[-1]["n_slices"] == 25
    finally:
        node.stop()


@requires_orthanc
def test_a_series_skipped_for_too_few_slices_is_read_once_more_arrive_and_a_localizer_stays_skipped(
        orthanc, predictors, pictures, tmp_path):
    """A series sent in two associations, the first with fewer slices than pacs.select.min_slices: skipped with its
    audit row, then read once the rest arrive (one SR, one KOS, one SC). A localizer that grows stays skipped."""
    onnx, _ = predictors
    events = []
    node = start_node(pacs_settings(tmp_path, orthanc.receiver_port, orthanc, *SERIES, "pacs.select.min_slices=5"),
                      onnx, MODEL, ServerHooks(on_series=events.append))
    study = generate_uid()

    def send(datasets, folder) -> None:
        ids = upload(orthanc, folder)
        assert orthanc.store("mri_ai", ids[datasets[0].SOPInstanceUID])[0] == 200  # the series so far, one association

    try:
        first = write_series(tmp_path / "part1", pictures, 3, study)
        series_uid = first[0].SeriesInstanceUID
        scout = write_series(tmp_path / "scout1", pictures, 2, study, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
        send(first, tmp_path / "part1")
        send(scout, tmp_path / "scout1")
        wait_until(lambda: len([e for e in events if e["outcome"] == "skipped"]) == 2, 60)
        few = next(e for e in events if e["series_uid"] == series_uid)
        assert "fewer than pacs.select.min_slices (5)" in few["reason"]

        rest = write_series(tmp_path / "part2", pictures, 3, study, series=series_uid, first_slice=3)
        more_scout = write_series(tmp_path / "scout2", pictures, 2, study, series=scout[0].SeriesInstanceUID,
                                  first_slice=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
        send(rest, tmp_path / "part2")
        send(more_scout, tmp_path / "scout2")
        found = wait_for(orthanc, study, 1)
        assert [len(by_series(found[kind], first + rest)) for kind in ("SR", "KO", "OT")] == [1, 1, 1]
        read = [e for e in events if e["outcome"] == "read"]
        assert len(read) == 1 and read[0]["series_uid"] == series_uid and read[0]["n_slices"] == 6
        time.sleep(2.0)  # the localizer's second part settles: still skipped, no second audit row, no result
        assert [e["outcome"] for e in events].count("skipped") == 2 and len(result_series(orthanc, study)["SR"]) == 1
    finally:
        node.stop()


@requires_orthanc
def test_a_kill_9_between_receiving_and_sending_loses_nothing_and_duplicates_nothing(orthanc, predictors, pictures,
                                                                                      tmp_path):
    sets = [f"pacs.port={orthanc.receiver_port}", f"pacs.spool_dir={tmp_path / 'spool'}", "pacs.timeout_s=10",
            "pacs.retry.initial_s=0.3", "pacs.retry.max_s=2", "pacs.results=series", "pacs.series_stable_seconds=1",
            f"pacs.destination=ORTHANC@127.0.0.1:{orthanc.dicom_port}"]
    spool = tmp_path / "spool" / destination_key(load_config(sets=sets).pacs.destination_peer)
    study = generate_uid()
    series = write_series(tmp_path / "series", pictures, 12, study)
    series_id = next(iter(upload(orthanc, tmp_path / "series").values()))
    children = []
    with open(tmp_path / "node.log", "w") as log:
        try:
            # 1. The receiver takes the series and dies (kill -9) before any result is made.
            children.append(start_child(sets, predictors[0].onnx_path, whole=False, log=log))
            assert orthanc.store("mri_ai", series_id)[0] == 200
            os.kill(children[0].pid, signal.SIGKILL)
            children[0].wait()
            (folder,) = [p for p in (spool / "series").iterdir() if p.is_dir()]
            assert len(files(folder, "*.json")) == 12 + 1  # every acknowledged instance + series.json
            # 2. A new node reads it once the quiet period has passed, and sends its three results.
            children.append(start_child(sets, predictors[0].onnx_path, whole=True, log=log))
            found = wait_for(orthanc, study, 1)
            wait_until(lambda: not files(spool / "pending") and (folder / "results" / "0.json").exists())
            # 3. Killed again after sending, and its record of the results lost too (the window between queueing
            # and writing it down): the next node makes the same results, which the spool knows, and sends nothing.
            os.kill(children[1].pid, signal.SIGKILL)
            children[1].wait()
            (folder / "results" / "0.json").unlink()
            children.append(start_child(sets, predictors[0].onnx_path, whole=True, log=log))
            wait_until(lambda: (folder / "results" / "0.json").exists())
            time.sleep(1.0)
        finally:
            for child in children:
                child.kill()
                child.wait()
    results = [ds.SOPInstanceUID for kind in found.values() for ds in kind]
    assert len(results) == 3 and [arrivals(orthanc, uid) for uid in results] == [1, 1, 1]
    assert sorted(files(spool / "sent", "*")) == sorted(results) and not files(spool / "pending")
    assert read_key_objects(found["KO"][0])[0][0] in {ds.SOPInstanceUID for ds in series}


@requires_orthanc
def test_a_kill_9_between_a_skip_for_too_few_slices_and_the_rest_still_reads_the_series_once(
        orthanc, predictors, pictures, tmp_path):
    """The skip (and the slice count it was made at) is in the spool: a node killed after skipping a series for too
    few slices, and a new one that receives the rest, read the series once, with every slice."""
    sets = [f"pacs.port={orthanc.receiver_port}", f"pacs.spool_dir={tmp_path / 'spool'}", "pacs.timeout_s=10",
            "pacs.retry.initial_s=0.3", "pacs.retry.max_s=2", *SERIES, "pacs.select.min_slices=5",
            f"pacs.destination=ORTHANC@127.0.0.1:{orthanc.dicom_port}"]
    spool = tmp_path / "spool" / destination_key(load_config(sets=sets).pacs.destination_peer)
    study = generate_uid()
    first = write_series(tmp_path / "part1", pictures, 3, study)
    rest = write_series(tmp_path / "part2", pictures, 3, study, series=first[0].SeriesInstanceUID, first_slice=3)
    children = []
    with open(tmp_path / "node.log", "w") as log:
        try:
            children.append(start_child(sets, predictors[0].onnx_path, whole=True, log=log))
            ids = upload(orthanc, tmp_path / "part1")
            assert orthanc.store("mri_ai", ids[first[0].SOPInstanceUID])[0] == 200
            wait_until(lambda: any((spool / "series").glob("*/skipped.json")), 60)
            os.kill(children[0].pid, signal.SIGKILL)  # skipped, and nothing more to do until more slices come
            children[0].wait()
            children.append(start_child(sets, predictors[0].onnx_path, whole=True, log=log))
            ids = upload(orthanc, tmp_path / "part2")
            assert orthanc.store("mri_ai", ids[rest[0].SOPInstanceUID])[0] == 200
            found = wait_for(orthanc, study, 1)
            time.sleep(1.0)  # anything sent twice would have arrived by now
        finally:
            for child in children:
                child.kill()
                child.wait()
    assert [len(by_series(found[kind], first + rest)) for kind in ("SR", "KO", "OT")] == [1, 1, 1]
    results = [ds.SOPInstanceUID for kind in found.values() for ds in kind]
    assert [arrivals(orthanc, uid) for uid in results] == [1, 1, 1]
    report = read_series_report(found["SR"][0])
    assert {sop for sop, _ in report["key_slices"]} <= {ds.SOPInstanceUID for ds in first + rest}
    (folder,) = [p for p in (spool / "series").iterdir() if p.is_dir()]
    assert not (folder / "skipped.json").exists() and len(files(folder, "*.dcm")) == 6


def test_selection_rules_and_the_nodes_own_output(tmp_path, pictures):
    select = load_config().pacs.select
    study = generate_uid()
    (mr,) = write_series(tmp_path / "a", pictures, 1, study)
    assert skip_reason(mr, select) is None
    mr.ImageType = ["ORIGINAL", "PRIMARY", "SCOUT"]
    assert "SCOUT" in skip_reason(mr, select)
    mr.ImageType = ["DERIVED", "SECONDARY"]
    assert "derived" in skip_reason(mr, select)
    mr.ImageType, mr.Modality = ["ORIGINAL", "PRIMARY"], "CT"
    assert "modality CT" in skip_reason(mr, select)
    mr.Modality = "MR"
    patterns = load_config(sets=["pacs.select.skip_descriptions=[diffusion]"]).pacs.select
    mr.SeriesDescription = "DIFFUSION b1000"
    assert "skip_descriptions" in skip_reason(mr, patterns)

    record = {"sop_instance_uid": mr.SOPInstanceUID, "sop_class_uid": mr.SOPClassUID, "frame": None,
              "predicted_class": "glioma", "probabilities": {"glioma": 0.9, "meningioma": 0.1}, "refer": True,
              "slice_index": 0}
    result = {"predicted_class": "glioma", "confidence": 0.9, "probabilities": {"glioma": 0.9, "meningioma": 0.1},
              "refer": True, "reasons": ["too few slices: 1"], "n_slices": 1, "rule": "top-3 mean"}
    output = SeriesOutput(study, mr.SeriesInstanceUID, ModelInfo("m", "1"), 0)
    sr = make_series_report([mr], result, [record], output.model, output)
    kos = make_key_objects({mr.SOPInstanceUID: mr}, [record], result, output.model, output)
    assert is_own_output(sr) and is_own_output(kos) and not is_own_output(mr)
    assert read_series_report(sr)["reasons"] == ["too few slices: 1"]
    assert read_key_objects(kos) == [(mr.SOPInstanceUID, None)]
    # the same series, model version and revision: the same UIDs (nothing made twice is sent twice)
    assert make_series_report([mr], result, [record], output.model, output).SOPInstanceUID == sr.SOPInstanceUID


@requires_orthanc
def test_post_v1_series_agrees_with_the_served_node_on_the_same_series(orthanc, registered, pictures, tmp_path):
    server = ServerProcess([*registered, "--model", "brain-cancer-resnet18", "--alias", "staging",
                            "--database", f"sqlite:///{tmp_path / 'audit.db'}", "--poll-seconds", "0",
                            "--dicom-port", orthanc.receiver_port, "--ae-title", "MRI_AI",
                            "--pacs-destination", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                            "--set", f"pacs.spool_dir={tmp_path / 'spool'}", "--set", "pacs.retry.initial_s=0.2",
                            *[a for s in SERIES for a in ("--set", s)]], tmp_path)
    study = generate_uid()
    series = write_series(tmp_path / "series", pictures, 12, study, start=5)
    try:
        server.wait_ready()
        series_id = next(iter(upload(orthanc, tmp_path / "series").values()))
        assert orthanc.store("mri_ai", series_id)[0] == 200
        found = wait_for(orthanc, study, 1)
        with server.client() as client:
            recorded = client.get("/v1/series", params={"study_uid": study}).json()["series"]
            assert [(r["source"], r["outcome"], r["n_slices"]) for r in recorded] == [("dicom", "read", 12)]
            node = recorded[0]["result"]
            # The same files by the API, as one zip, in another order: the same series result.
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as archive:
                for path in sorted((tmp_path / "series").glob("*.dcm"), reverse=True):
                    archive.write(path, path.name)
            answer = client.post("/v1/series", files={"files": ("series.zip", buffer.getvalue(), "application/zip")})
            assert answer.status_code == 200, answer.text
            api = answer.json()
            assert (api["series"]["predicted_class"], api["series"]["key_slices"]) == (node["predicted_class"],
                                                                                      node["key_slices"])
            assert [tuple(k) for k in api["series"]["key_slice_refs"]] == [tuple(k) for k in node["key_slice_refs"]]
            assert max(abs(api["series"]["probabilities"][c] - p) for c, p in node["probabilities"].items()) < 1e-6
            assert [p["sop_instance_uid"] for p in api["predictions"]] == [ds.SOPInstanceUID for ds in series]
            assert read_series_report(found["SR"][0])["predicted_class"] == api["series"]["predicted_class"]
            # Both are on record, and every slice twice (node and API), committed before the answers.
            recorded = client.get("/v1/series", params={"study_uid": study}).json()["series"]
            assert sorted(r["source"] for r in recorded) == ["api", "dicom"]
            slices = client.get("/v1/predictions", params={"series_uid": series[0].SeriesInstanceUID}).json()
            assert sorted(p["source"] for p in slices["predictions"]) == ["api"] * 12 + ["dicom"] * 12
            # Two series in one request, or a file that is not DICOM: refused with the reason.
            other = write_series(tmp_path / "other", pictures, 1, study)[0]
            parts = [("files", (p.name, p.read_bytes())) for p in [*(tmp_path / "series").glob("*.dcm"),
                                                                     *(tmp_path / "other").glob("*.dcm")]]
            refused = client.post("/v1/series", files=parts)
            assert refused.status_code == 422 and "2 series" in refused.json()["detail"]
            refused = client.post("/v1/series", files={"files": ("notes.txt", b"hello")})
            assert refused.status_code == 422 and "not a DICOM file" in refused.json()["detail"]
            assert other.SeriesInstanceUID != series[0].SeriesInstanceUID
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def test_a_series_zip_is_bounded_before_it_is_inflated():
    from serving.series_api import unzip
    from serving.uploads import Upload, UploadError

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.dcm", b"\0" * (8 * 2**20))  # 8 MB of zeros: a few KB compressed
    assert len(buffer.getvalue()) < 100_000
    with pytest.raises(UploadError, match="uncompressed"):
        unzip([Upload("bomb.zip", buffer.getvalue())], max_files=16, max_bytes=2**20)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for k in range(20):
            archive.writestr(f"dir/{k}.dcm", b"x")
    with pytest.raises(UploadError, match="20 files"):
        unzip([Upload("many.zip", buffer.getvalue())], max_files=16, max_bytes=2**20)
    parts = unzip([Upload("s.zip", buffer.getvalue())], max_files=32, max_bytes=2**20)
    assert len(parts) == 20 and parts[0].filename == "0.dcm"  # no folder names: never used as paths anyway


def test_the_key_objects_and_the_report_name_the_key_frames_of_a_multi_frame_instance(tmp_path, pictures):
    mr = write_dicom(tmp_path / "mf.dcm", np.stack(pictures[:4]), (2000, 4000), Modality="MR")
    result = {"predicted_class": "glioma", "confidence": 0.7, "probabilities": {"glioma": 0.7, "pituitary": 0.3},
              "refer": False, "reasons": [], "n_slices": 4, "rule": "top-2 mean"}
    key = [{"sop_instance_uid": mr.SOPInstanceUID, "sop_class_uid": mr.SOPClassUID, "frame": frame,
            "predicted_class": "glioma", "probabilities": {"glioma": 0.7, "pituitary": 0.3}, "refer": False,
            "slice_index": frame - 1} for frame in (2, 3)]
    output = SeriesOutput(mr.StudyInstanceUID, mr.SeriesInstanceUID, ModelInfo("m", "1"), 0)
    kos = make_key_objects({mr.SOPInstanceUID: mr}, key, result, output.model, output)
    assert read_key_objects(kos) == [(mr.SOPInstanceUID, 2), (mr.SOPInstanceUID, 3)]
    report = read_series_report(make_series_report([mr], result, key, output.model, output))
    assert report["key_slices"] == [(mr.SOPInstanceUID, 2), (mr.SOPInstanceUID, 3)]
    assert [s["frame"] for s in report["slices"]] == [2, 3] and report["refer"] is False

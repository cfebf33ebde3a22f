"""The review station's series viewer in a real Chromium (Debian's, driven by Playwright) against a real uvicorn
server (serve.py --review --dicom-port) on loopback: a 24-slice MR series sent to its DICOM node over C-STORE,
read slice by slice on the canvas with window/level, zoom and the key-slice jump, and judged as one series.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from server_process import ServerProcess, free_port, write_token
from test_review import (  # noqa: F401  (module fixtures: the registered model and the browser)
    MODEL,
    PASSWORD,
    artifacts,
    browser,
    browsing,
    log_in,
    registry,
    rows,
    serve_cli,
    wait_for,
    windowed,
)

from conftest import write_dicom
from tests.slowest import slow_setup

N_SLICES = 24
SPACING_MM = 5.0
WINDOW = (2048, 1024)  # centre, width: narrower than the 12-bit range, so the file's own window is visible
SCANNER = "SCANNER"


@pytest.fixture(scope="module")
@slow_setup("starts serve.py --review with its DICOM node and model loaded")
def node_server(registry, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """serve.py --review with its DICOM node on a free port, a reviewer added by the CLI."""
    tmp = tmp_path_factory.mktemp("viewer_server")
    db = f"sqlite:///{tmp / 'audit.db'}"
    (tmp / "alice.pw").write_text(PASSWORD + "\n")
    assert serve_cli(["add-reviewer", "alice", "--password-file", tmp / "alice.pw", "--database", db],
                     tmp).returncode == 0
    token_file, token = write_token(tmp)
    srv = ServerProcess([*registry, "--model", MODEL, "--alias", "staging", "--review", "--token-file", token_file,
                         "--database", db, "--poll-seconds", "0", "--dicom-port", free_port(), "--ae-title", "MRI_AI",
                         "--set", f"pacs.allow=[{SCANNER}@127.0.0.1]", "--set", f"pacs.spool_dir={tmp / 'spool'}",
                         "--set", f"review.store_dir={tmp / 'store'}",
                         # names shown, so that a hostile PatientName reaches the page (and is shown as text)
                         "--set", "pacs.keep_patient_identity=true"], tmp, token)
    srv.db = tmp / "audit.db"
    srv.dicom_port = int(srv.proc.args[srv.proc.args.index("--dicom-port") + 1])
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def mr_series(tiny_data, tmp_path_factory) -> list[Path]:
    """24 single-frame MR instances of one series, 5 mm apart along the slice normal, each its own picture (real
    phantom slices of the data set, 12-bit); InstanceNumber runs against the position, as on a feet-first scan."""
    folder = tmp_path_factory.mktemp("viewer_series")
    pictures = sorted(tiny_data.rglob("*.jpg"))
    picks = [pictures[(k * 7) % len(pictures)] for k in range(N_SLICES)]
    study, series = "1.2.826.0.1.3680043.8.498.1001", "1.2.826.0.1.3680043.8.498.1001.2"
    paths = []
    for k, picture in enumerate(picks):
        gray = np.asarray(Image.open(picture).convert("L").resize((96, 80)), dtype=np.uint16) * 16 + k
        path = folder / f"slice{k:02d}.dcm"
        write_dicom(path, gray, WINDOW, StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=N_SLICES - k,
                    ImagePositionPatient=[0.0, 0.0, SPACING_MM * k], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                    PatientID="P-0042", AccessionNumber="ACC-77", StudyDate="20261201", SeriesNumber=4,
                    StudyDescription="MR brain", SeriesDescription="T1 axial")
        paths.append(path)
    return paths


def send(paths: list[Path], port: int) -> None:
    """C-STORE each file to the server's DICOM node, in the order given, as a scanner or a PACS does."""
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    ae = AE(ae_title=SCANNER)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="MRI_AI")
    assert assoc.is_established
    try:
        for path in paths:
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    finally:
        assoc.release()


# ---- reading the viewer ---------------------------------------------------------------------------------------

def canvas(page) -> np.ndarray:
    """The grey levels on the viewer's canvas (its red channel; the canvas is grey)."""
    width, height, red = page.evaluate("""() => {
        const c = document.getElementById("view");
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        const out = [];
        for (let k = 0; k < d.length; k += 4) out.push(d[k]);
        return [c.width, c.height, out];
    }""")
    return np.asarray(red, dtype=np.float64).reshape(height, width)


def wait_drawn(page, index: int) -> None:
    """Until slice `index` (0-based) is on the canvas."""
    page.wait_for_function(f"() => document.getElementById('viewer').dataset.drawn === '{index}'", timeout=60_000)


def counter(page) -> str:
    return page.locator("#slice-counter").inner_text()


def shown_index(page) -> int:
    return int(page.locator("#viewer").get_attribute("data-index"))


def stored(path: Path) -> np.ndarray:
    return dcmread(path).pixel_array.astype(np.float64)


def test_a_series_from_the_dicom_node_is_read_in_the_viewer_and_judged_as_one(node_server, browser,  # noqa: F811
                                                                             mr_series):
    shuffled = random.Random(7).sample(mr_series, len(mr_series))  # arrival order says nothing of slice order
    send(shuffled, node_server.dicom_port)
    wait_for(lambda: rows(node_server.db, "SELECT count(*) FROM review_items")[0][0] == N_SLICES)
    by_sop = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: k for k, p in enumerate(mr_series)}
    sop_of = dict(rows(node_server.db, "SELECT id, sop_instance_uid FROM predictions"))
    middle = next(cid for cid, pid in rows(node_server.db, "SELECT case_id, prediction_id FROM review_items")
                  if by_sop[sop_of[pid]] == 10)

    with browsing(browser, node_server) as page:
        log_in(page, node_server)
        page.goto(f"{node_server.url}/review/case/{middle}")
        page.wait_for_selector("#viewer.live")
        data = page.request.get(f"{node_server.url}/review/case/{middle}/series.json").json()
        # the slices in the series' order (position along the normal), whatever order they arrived in
        assert [by_sop[sop_of[s["prediction_id"]]] for s in data["slices"]] == list(range(N_SLICES))
        assert data["series"]["n_slices"] == N_SLICES and data["series"]["key_slices"]
        wait_drawn(page, 10)
        assert counter(page) == f"Slice 11 / {N_SLICES}"
        # the canvas is the slice's stored values through the file's own window
        assert np.abs(canvas(page) - windowed(stored(mr_series[10]), *WINDOW)).max() <= 1.5
        assert page.locator("#wl").inner_text() == f"W {WINDOW[1]} L {WINDOW[0]}"

        # the wheel and the keys scroll the slices; the counter, the canvas and the heat map follow
        box = page.locator("#viewer").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.wheel(0, 120)
        wait_drawn(page, 11)
        assert counter(page) == f"Slice 12 / {N_SLICES}"
        assert np.abs(canvas(page) - windowed(stored(mr_series[11]), *WINDOW)).max() <= 1.5
        page.keyboard.press("ArrowDown")
        wait_drawn(page, 12)
        page.keyboard.press("j")
        wait_drawn(page, 13)
        page.keyboard.press("k")
        page.keyboard.press("ArrowUp")
        wait_drawn(page, 11)
        assert counter(page) == f"Slice 12 / {N_SLICES}"
        assert page.locator("#heatmap").get_attribute("src") == data["slices"][11]["heatmap"]

        # right-drag sets window/level: the numbers and the pixels change, and R resets them
        before = canvas(page)
        page.mouse.down(button="right")
        page.mouse.move(box["x"] + box["width"] / 2 + 60, box["y"] + box["height"] / 2 - 40, steps=5)
        page.mouse.up(button="right")
        assert page.locator("#wl").inner_text() != f"W {WINDOW[1]} L {WINDOW[0]}"
        assert np.abs(canvas(page) - before).max() > 10
        page.keyboard.press("r")
        assert page.locator("#wl").inner_text() == f"W {WINDOW[1]} L {WINDOW[0]}"
        assert np.abs(canvas(page) - before).max() <= 1.5

        # zoom changes the scale shown and applied; fit brings it back
        fitted = page.locator("#zoom").inner_text()
        page.keyboard.press("+")
        zoomed = page.locator("#zoom").inner_text()
        assert int(zoomed.rstrip("%")) > int(fitted.rstrip("%"))
        assert "scale(" in page.locator("#stage").get_attribute("style")
        page.keyboard.press("0")
        assert page.locator("#zoom").inner_text() == fitted
        page.keyboard.down("Control")
        page.mouse.wheel(0, -120)  # Ctrl+wheel zooms; the slice stays
        page.keyboard.up("Control")
        assert int(page.locator("#zoom").inner_text().rstrip("%")) > int(fitted.rstrip("%"))
        assert counter(page) == f"Slice 12 / {N_SLICES}"
        page.keyboard.press("0")

        # N lands on a key slice, with its own heat map; the strip marks every key slice
        page.keyboard.press("n")
        key = shown_index(page)
        assert key in data["series"]["key_slices"]
        assert page.locator("#heatmap").get_attribute("src") == data["slices"][key]["heatmap"]
        assert page.locator("#strip .cell.key").count() == len(data["series"]["key_slices"])
        # F flags the slice on screen; A judges the series (agrees, or confirms its referral)
        page.keyboard.press("f")
        assert page.locator("#flag-slice").get_attribute("aria-pressed") == "true"
        assert page.locator("#strip .cell.flagged").count() == 1
        expected = "refer" if data["series"]["refer"] else "agree"
        assert page.locator("#agree").get_attribute("value") == expected
        with page.expect_navigation():
            page.keyboard.press("a")

        flagged_pid = data["slices"][key]["prediction_id"]
        saved = rows(node_server.db, "SELECT prediction_id, predicted_class, reviewer_class, finding, created_at "
                                     "FROM review_verdicts")
        assert len(saved) == N_SLICES and len({r[4] for r in saved}) == 1  # one verdict on every slice, at once
        assert {r[1] for r in saved} == {data["series"]["predicted_class"]}
        assert {r[3] for r in saved} == ({"refer_confirmed"} if expected == "refer" else {None})
        assert rows(node_server.db, "SELECT prediction_id FROM review_flags") == [(flagged_pid,)]

        # the verdict survives a reload: every slice of the series reads as judged
        page.goto(f"{node_server.url}/review/case/{middle}")
        page.wait_for_selector("#viewer.live")
        assert page.locator("#current-verdict").is_visible()
        again = page.request.get(f"{node_server.url}/review/case/{middle}/series.json").json()
        assert all(s["status"] != "pending" for s in again["slices"])

    # export-reviews: the series' 24 slices under the verdict's folder, one study group (one split); with
    # --flagged-only, the flagged slice alone
    folder = ".findings/refer_confirmed" if expected == "refer" else data["series"]["predicted_class"]
    for flag, count in (([], N_SLICES), (["--flagged-only"], 1)):
        out = node_server.workdir / f"export{len(flag)}"
        done = serve_cli(["export-reviews", out, *flag, "--database", f"sqlite:///{node_server.db}",
                          "--store-dir", node_server.workdir / "store"], node_server.workdir)
        assert done.returncode == 0, done.stderr
        written = [p for p in out.rglob("*.dcm")]
        assert len(written) == count and {p.parent.relative_to(out).as_posix() for p in written} == {folder}
        assert len({p.name.split("_")[0] for p in written}) == 1 and written[0].name.startswith("study-")
    flagged_sop = sop_of[flagged_pid]
    assert dcmread(written[0], stop_before_pixels=True).SOPInstanceUID == flagged_sop

    # D + a number changes the series' verdict: a new row on every slice naming that class (the first rows stay),
    # and the export follows the newest verdict
    with browsing(browser, node_server) as page:
        log_in(page, node_server)
        page.goto(f"{node_server.url}/review/case/{middle}")
        page.wait_for_selector("#viewer.live")
        names = [t.split(" ", 1)[1] for t in page.locator("#choices button.choice:not(.finding)").all_inner_texts()]
        other = next(n for n in names if n != data["series"]["predicted_class"])
        with page.expect_navigation():
            page.keyboard.press("d")
            page.keyboard.press(str(names.index(other) + 1))
    changed = rows(node_server.db, "SELECT prediction_id, reviewer_class, finding FROM review_verdicts ORDER BY id")
    assert len(changed) == 2 * N_SLICES
    assert {(r[1], r[2]) for r in changed[N_SLICES:]} == {(other, None)}
    assert sorted(r[0] for r in changed[N_SLICES:]) == sorted(r[0] for r in changed[:N_SLICES])
    out = node_server.workdir / "export-changed"
    done = serve_cli(["export-reviews", out, "--database", f"sqlite:///{node_server.db}", "--store-dir",
                      node_server.workdir / "store"], node_server.workdir)
    assert done.returncode == 0, done.stderr
    assert {p.parent.relative_to(out).as_posix() for p in out.rglob("*.dcm")} == {other}
    assert len(list(out.rglob("*.dcm"))) == N_SLICES


# ---- the study worklist ---------------------------------------------------------------------------------------

HOSTILE = {"PatientID": "<img src=x onerror=alert(1)>", "StudyDescription": "<script>alert(2)</script>",
           "SeriesDescription": "<svg onload=document.body.dataset.pwned=1>",
           "PatientName": "<iframe srcdoc='<b>x</b>' onload=alert(3)>"}


def study_rows(page) -> list[dict[str, str]]:
    """The study worklist's study rows as {column heading: text}."""
    heads = page.locator("#studies > thead th").all_inner_texts()
    return [dict(zip(heads, cells)) for cells in page.locator("#studies tr.study-row").evaluate_all(
        "rs => rs.map(r => [...r.children].map(c => c.textContent.trim()))")]


def fits(page, width: int, height: int, shot: Path) -> None:
    """At a reading-room screen size the page has no horizontal overflow; a screenshot of it goes to `shot`."""
    page.set_viewport_size({"width": width, "height": height})
    page.wait_for_timeout(200)  # the viewer refits on resize
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth"), shot.name
    page.screenshot(path=str(shot))


def test_the_study_worklist_shows_studies_with_their_series_and_dicom_text_as_text(
        node_server, browser, mr_series, tiny_data, tmp_path, artifacts):  # noqa: F811
    if rows(node_server.db, "SELECT count(*) FROM review_items")[0][0] < N_SLICES:
        send(mr_series, node_server.dicom_port)  # run alone: the series the viewer test sent
    hostile = []
    for k, picture in enumerate(sorted(tiny_data.rglob("*.jpg"))[:3]):
        gray = np.asarray(Image.open(picture).convert("L"), dtype=np.uint16) * 16
        hostile.append(tmp_path / f"h{k}.dcm")
        write_dicom(hostile[-1], gray, WINDOW, StudyInstanceUID="1.2.3.4.5.6", SeriesInstanceUID="1.2.3.4.5.6.7",
                    InstanceNumber=k + 1, AccessionNumber="ACC-9", **HOSTILE)
    send(hostile, node_server.dicom_port)
    wait_for(lambda: rows(node_server.db, "SELECT count(*) FROM review_items")[0][0] >= N_SLICES + 3)
    mr_case = rows(node_server.db, "SELECT c.id FROM review_cases c WHERE c.study_uid = ? LIMIT 1",
                   (dcmread(mr_series[0], stop_before_pixels=True).StudyInstanceUID,))[0][0]
    pictures = {f"IMG{n}.jpg": p.read_bytes() for n, p in zip((10, 2, 1), sorted(tiny_data.rglob("*.jpg"))[3:6])}

    with browsing(browser, node_server) as page:
        log_in(page, node_server)
        with page.expect_navigation():  # an upload of several plain images: one study row of its own
            page.set_input_files("#files", [{"name": n, "mimeType": "image/jpeg", "buffer": b}
                                            for n, b in pictures.items()])
        page.wait_for_selector("#viewer.live")
        order = page.request.get(page.url.split("?")[0] + "/series.json").json()["slices"]
        assert [s["filename"] for s in order] == ["IMG1.jpg", "IMG2.jpg", "IMG10.jpg"]  # natural name order

        page.click("#to-studies")
        page.goto(f"{node_server.url}/review/studies?status=all")
        shown = study_rows(page)
        by_accession = {r["Accession"]: r for r in shown}
        assert {"ACC-77", "ACC-9"} <= set(by_accession), shown
        mr = by_accession["ACC-77"]
        assert (mr["Patient"], mr["Study date"], mr["Modality"], mr["Description"], mr["Series"], mr["Slices"]) == (
            "P-0042", "20261201", "MR", "MR brain", "1", str(N_SLICES))
        upload = next(r for r in shown if r["Accession"] == "" and r["Slices"] == "3")
        assert upload["Series"] == "1" and upload["Status"] == "pending"
        # a DICOM's text fields are shown as text, never run
        xss = by_accession["ACC-9"]
        assert (xss["Patient"], xss["Description"]) == (HOSTILE["PatientID"], HOSTILE["StudyDescription"])
        assert xss["Name"] == HOSTILE["PatientName"]  # pacs.keep_patient_identity: the name, as text
        assert HOSTILE["SeriesDescription"] in page.locator("#studies").inner_text()
        assert page.locator("img[src='x']").count() == 0 and page.locator("main svg, main iframe").count() == 0
        # the pending list: referred studies first, a fully judged study is gone from it
        page.goto(f"{node_server.url}/review/studies")
        pending = study_rows(page)
        judged = rows(node_server.db, "SELECT count(*) FROM review_verdicts")[0][0] >= N_SLICES
        assert ("ACC-77" not in {r["Accession"] for r in pending}) == judged
        refer = [r["Refer"] == "refer" for r in pending]
        assert refer == sorted(refer, reverse=True)
        page.goto(f"{node_server.url}/review/studies?status=all&predicted={mr['Class']}")
        assert mr["Class"] and {r["Class"] for r in study_rows(page)} == {mr["Class"]}  # single-series studies here
        page.goto(f"{node_server.url}/review/studies?status=all")
        for width, height in ((1366, 768), (1920, 1080)):
            fits(page, width, height, artifacts / f"studies-{width}.png")
        page.goto(f"{node_server.url}/review/case/{mr_case}")
        page.wait_for_function("() => document.getElementById('viewer').dataset.drawn !== undefined")
        for width, height in ((1366, 768), (1920, 1080)):
            fits(page, width, height, artifacts / f"viewer-{width}.png")
        # the series row opens the viewer, where the same text fields stay text
        page.goto(f"{node_server.url}/review/studies?status=all")
        with page.expect_navigation():
            page.locator("#studies tbody.study", has_text="ACC-9").locator("a.open").click()
        page.wait_for_selector("#viewer.live")
        line = page.locator("#study-line").inner_text()
        assert all(v in line for v in HOSTILE.values())
        assert page.locator("img[src='x']").count() == 0 and page.locator("main svg, main iframe").count() == 0
        assert page.evaluate("document.body.dataset.pwned") is None


def test_the_patient_id_can_be_shown_as_a_short_one_way_hash(tmp_path):
    from review.studies import patient_shown, shown_facts

    hashed = patient_shown("P-0042", "hash")
    assert hashed.startswith("#") and "0042" not in hashed and hashed == patient_shown("P-0042", "hash")
    assert hashed != patient_shown("P-0043", "hash") and patient_shown("P-0042", "show") == "P-0042"
    assert patient_shown("", "hash") == ""  # no ID: nothing to hash, nothing made up
    path = tmp_path / "one.dcm"
    write_dicom(path, np.zeros((8, 8)), WINDOW, PatientID="P-0042", PatientName="Doe^Jane", PatientBirthDate="19700101")
    facts = shown_facts(path, "hash")
    assert facts["PatientID"] == hashed and "PatientName" not in facts and "PatientBirthDate" not in facts
    assert shown_facts(path, "show", keep_identity=True)["PatientName"] == "Doe^Jane"
    assert shown_facts(tmp_path / "missing.jpg") == {}

"""serve.py --review: the review page in a real Chromium (Debian's, driven by Playwright) against a real uvicorn
server on loopback with a real registered model, plus the refer rule, the security of the page's forms and
cookies, a prediction made elsewhere joining the worklist, and export-reviews read back by train.py.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from server_process import ROOT, ServerProcess, free_port, write_token

from conftest import run_script, write_dicom, write_overlay
from tests.slowest import slow_setup

MODEL = "brain-cancer-resnet18"
PASSWORD = "correct horse battery"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE_NAME = "<img src=x onerror=alert(1)>.jpg"
DICOM_WINDOW = (2048, 1024)  # narrower than the 12-bit range: both ends saturate, as a reader sets it


# ---- the model, the server, a reviewer ---------------------------------------------------------------------

@pytest.fixture(scope="module")
@slow_setup("evaluates the model (temperature fit) and registers it")
def registry(trained, tmp_path_factory):
    """The tiny model evaluated (with a fitted temperature) and registered @staging, forced (it fails the gates)."""
    overlay, _, ckpt_path = trained
    tmp = tmp_path_factory.mktemp("review_registry")
    out = tmp / "run" / "resnet18_outputs"
    out.mkdir(parents=True)
    shutil.copy(ckpt_path, out / "best_model.pth")
    store = ["--config", overlay, "--set", f"monitoring.mlflow.tracking_uri=sqlite:///{tmp / 'registry.db'}",
             "--set", f"monitoring.mlflow.artifact_location={tmp / 'mlartifacts'}",
             "--set", f"train.output_dir={out.parent}"]
    assert run_script("evaluate", store + ["--model", "resnet18", "--medical-validation", "--calibrate"]) in (0, 3)
    assert run_script("register_model", store + ["--model", "resnet18", "--version", "1.0.0", "--force",
                                                 "--alias", "staging"]) == 0
    mark_synthetic(tmp / "registry.db")
    return store


def mark_synthetic(registry_db: Path) -> None:
    """The tiny data set is generated phantoms: say so in the registry, as registering a --demo model does."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{registry_db}", f"sqlite:///{registry_db}")
    for name in (MODEL, MODEL + "-onnx"):
        for mv in client.search_model_versions(f"name='{name}'"):
            client.set_model_version_tag(name, mv.version, "demo_data", "true")


def serve_cli(args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "serve.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
@slow_setup("starts serve.py --review with its model loaded")
def station(registry, tmp_path_factory):
    """serve.py --review behind a bearer token (the page logs in on its own), a reviewer added by the CLI."""
    tmp = tmp_path_factory.mktemp("review_server")
    db = f"sqlite:///{tmp / 'audit.db'}"
    (tmp / "alice.pw").write_text(PASSWORD + "\n")
    added = serve_cli(["add-reviewer", "alice", "--password-file", tmp / "alice.pw", "--database", db], tmp)
    assert added.returncode == 0 and "Reviewer alice added" in added.stdout, added.stderr
    token_file, token = write_token(tmp)
    srv = ServerProcess([*registry, "--model", MODEL, "--alias", "staging", "--review", "--token-file", token_file,
                         "--database", db, "--poll-seconds", "0", "--set", f"review.store_dir={tmp / 'store'}",
                         "--set", "review.monitor.min_samples=3", "--set", "serving.max_upload_mb=2"], tmp, token)
    srv.db, srv.store = tmp / "audit.db", tmp / "store"
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def rows(db: Path, sql: str, args=()) -> list:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


@pytest.fixture(scope="module")
def files(tiny_data, tmp_path_factory) -> dict[str, bytes]:
    """A real JPEG of the data set and a DICOM written here (12-bit, with a narrow window), as uploaded."""
    folder = tmp_path_factory.mktemp("review_inputs")
    jpeg = sorted(tiny_data.rglob("*.jpg"))[0]
    gray = np.asarray(Image.open(jpeg).convert("L").resize((96, 80)), dtype=np.uint16) * 16
    write_dicom(folder / "scan.dcm", gray, DICOM_WINDOW)
    return {"slice.jpg": jpeg.read_bytes(), "scan.dcm": (folder / "scan.dcm").read_bytes()}


def windowed(stored: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1, the linear VOI function, to 8 bits."""
    x = (stored.astype(np.float64) - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(x, 0, 1) * 255


# ---- the browser ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
@slow_setup("launches Chromium")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("the review page's browser tests need Debian's chromium at /usr/bin/chromium "
                    "(.ci/run installs it when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """Where the screenshots go: $TEST_ARTIFACTS/review when set (CI keeps that folder), else a temporary one."""
    kept = os.environ.get("TEST_ARTIFACTS")
    folder = Path(kept) / "review" if kept else tmp_path_factory.mktemp("review_screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nreview page screenshots: {folder}")
    return folder


@contextlib.contextmanager
def browsing(browser, server):
    """A fresh browser context; on leaving, every request it made went to the server on 127.0.0.1 and no
    dialog (alert, confirm) ever opened."""
    context = browser.new_context(viewport={"width": 1280, "height": 960})
    requests, dialogs = [], []
    context.on("request", lambda r: requests.append(r.url))
    page = context.new_page()
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        yield page
    finally:
        context.close()
    assert requests and all(u.startswith(f"http://127.0.0.1:{server.port}/") for u in requests), \
        [u for u in requests if not u.startswith(f"http://127.0.0.1:{server.port}/")]
    assert dialogs == [], f"a script ran: {dialogs}"


def log_in(page, server) -> None:
    page.goto(server.url + "/")
    assert "/review/login" in page.url  # no session: the login first
    page.fill("input[name=name]", "alice")
    page.fill("input[name=password]", PASSWORD)
    with page.expect_navigation():
        page.click(".login button[type=submit]")
    assert page.url == server.url + "/review/studies"  # the reading room opens on the study list
    with page.expect_navigation():  # loaded: the file input's change handler is attached at DOMContentLoaded
        page.click("#to-slices")  # uploads are dropped on the slice worklist
    assert page.url == server.url + "/review/"


def upload(page, named: dict[str, bytes]) -> None:
    """Pick files in the page's file input (its change handler submits the form)."""
    payload = [{"name": n, "mimeType": "application/octet-stream", "buffer": b} for n, b in named.items()]
    with page.expect_navigation():
        page.set_input_files("#files", payload)


def drop(page, named: dict[str, bytes]) -> None:
    """Drop files on the worklist's drop zone, as from a file manager (its drop handler submits the form)."""
    with page.expect_navigation():
        page.evaluate("""files => {
            const dt = new DataTransfer();
            for (const [name, bytes] of files) dt.items.add(new File([new Uint8Array(bytes)], name));
            const zone = document.getElementById("drop-zone");
            for (const kind of ["dragenter", "dragover", "drop"])
                zone.dispatchEvent(new DragEvent(kind, {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""", [[n, list(b)] for n, b in named.items()])


def wait_loaded(page, element_id: str) -> int:
    """The natural width of an image once it has loaded (Grad-CAM may first load the PyTorch model)."""
    page.wait_for_function(f"() => {{ const i = document.getElementById('{element_id}'); "
                           "return i && i.complete && i.naturalWidth > 0; }", timeout=180_000)
    return page.evaluate(f"document.getElementById('{element_id}').naturalWidth")


def bars(page) -> dict[str, float]:
    names = page.locator("#bars .cls").all_inner_texts()
    values = [float(v) for v in page.locator("#bars progress").evaluate_all("els => els.map(e => e.value)")]
    return dict(zip(names, values))


def assert_registry_evidence(page, evaluation: dict) -> None:
    """The case view's validation table is the registered evaluation's: accuracy and per-class sensitivity with
    their bootstrap intervals."""
    want = {"Test accuracy": evaluation["accuracy"]} | {f"Sensitivity {name}": row["sensitivity"]
                                                       for name, row in evaluation["per_class"].items()}
    shown = page.locator("#model table.evidence tr").evaluate_all(
        "rs => rs.map(r => [...r.children].map(c => c.textContent.trim()))")
    assert {row[0]: row[1:] for row in shown} == {
        name: [f"{f['value']:.1%}", f"[{f['ci_low']:.1%}, {f['ci_high']:.1%}]"] for name, f in want.items()}


def assert_heat_map_controls(page) -> None:
    """The opacity slider sets the Grad-CAM layer's opacity; the toggle hides and shows it."""
    heat = page.locator("#heatmap")
    page.locator("#heat-opacity").fill("20")
    assert heat.evaluate("e => getComputedStyle(e).opacity") == "0.2"
    page.uncheck("#heat-toggle")
    assert heat.is_hidden() and page.locator("#view").is_visible()  # the viewer's canvas
    page.check("#heat-toggle")
    assert heat.is_visible()


def assert_shown_through_its_window(page, server, dicom: bytes) -> None:
    """The slice the page shows is the DICOM's stored values through its own window (not a min-max stretch)."""
    import pydicom

    picture = page.request.get(server.url + page.locator("#slice").get_attribute("src"))
    shown = np.asarray(Image.open(io.BytesIO(picture.body())), dtype=np.float64)
    stored = pydicom.dcmread(io.BytesIO(dicom)).pixel_array
    assert shown.shape == stored.shape and np.abs(shown - windowed(stored, *DICOM_WINDOW)).max() <= 1
    assert (shown == 255).mean() > (stored == stored.max()).mean()  # saturated above the window's top


def test_a_reviewer_uploads_reads_the_case_and_a_disagreement_is_kept(station, browser, files, artifacts):
    with httpx.Client(base_url=station.url, headers=station.headers) as api:
        evaluation = api.get("/v1/model").json()["evaluation"]
    with browsing(browser, station) as page:
        log_in(page, station)
        upload(page, files)
        assert "/review/case/" in page.url  # the first upload's case opens
        jpeg_case = page.url
        shown = bars(page)
        assert list(shown) == ["glioma", "meningioma", "pituitary"]
        assert abs(sum(shown.values()) - 1) < 1e-4
        assert page.locator("#bars-caption").inner_text().startswith("Calibrated probabilities (temperature")
        leading = max(shown, key=shown.get)
        if page.locator("#refer").count():
            assert leading in page.locator("#refer").inner_text()
        else:
            assert page.locator("#predicted-class").inner_text() == leading
        assert wait_loaded(page, "slice") > 0 and wait_loaded(page, "heatmap") > 0
        assert page.locator("#drift").inner_text().startswith("Intensity distance from the training data")
        page.screenshot(path=str(artifacts / "case-view.png"), full_page=True)
        assert_registry_evidence(page, evaluation)
        assert_heat_map_controls(page)

        others = [c for c in shown if c != leading]
        with page.expect_navigation():
            page.keyboard.press("d")
            page.keyboard.press(str(list(shown).index(others[0]) + 1))
        assert page.url != jpeg_case  # the next case opens
        page.goto(jpeg_case)
        page.reload()
        assert "disagree" in page.locator("#current-verdict").inner_text()
        assert others[0] in page.locator("#current-verdict").inner_text()

        page.goto(station.url + "/review/?status=all")
        page.click("#worklist tr:has(td.filename:text-is('scan.dcm')) a")
        page.wait_for_url("**/review/case/**")
        assert bars(page) and wait_loaded(page, "heatmap") > 0
        assert wait_loaded(page, "slice") == 96  # the DICOM at its own size ...
        assert_shown_through_its_window(page, station, files["scan.dcm"])  # ... through its window
    verdicts = rows(station.db, "SELECT v.agrees, v.reviewer, v.reviewer_class, p.filename, p.case_id FROM "
                                "review_verdicts v JOIN predictions p ON p.id = v.prediction_id")
    assert (0, "alice", others[0], "slice.jpg") in [v[:4] for v in verdicts]
    with httpx.Client(base_url=station.url, headers=station.headers) as api:  # the API says what the page said
        answer = api.post("/v1/predict", files={"files": ("slice.jpg", files["slice.jpg"])}).json()
    assert answer["predictions"][0]["predicted_class"] == leading


def test_keys_record_verdicts_and_a_changed_verdict_is_a_new_row(station, browser, files):
    with browsing(browser, station) as page:
        log_in(page, station)
        upload(page, {"again.jpg": files["slice.jpg"]})
        case_url = page.url
        referred = page.locator("#refer").count() == 1
        with page.expect_navigation():
            page.keyboard.press("a")  # agree at once ...
        assert "/review/case/" in page.url and page.url != case_url  # ... and the next case opens
        page.goto(case_url)
        shown = bars(page)
        leading = max(shown, key=shown.get)
        other = next(c for c in shown if c != leading)
        page.fill("#note", "lesion at the sella")
        with page.expect_navigation():
            page.click(f"#choices button[value='class:{other}']")
        page.goto(case_url)
        assert page.locator("#history tbody tr").count() == 2
        assert other in page.locator("#current-verdict").inner_text()
    history = rows(station.db, "SELECT v.agrees, v.reviewer_class, v.note FROM review_verdicts v JOIN predictions p "
                               "ON p.id = v.prediction_id WHERE p.filename = 'again.jpg' ORDER BY v.id")
    first = (1, "referral confirmed", None) if referred else (1, leading, None)  # A on a referred case confirms it
    assert history == [first, (0, other, "lesion at the sella")]
    with pytest.raises(sqlite3.DatabaseError, match="never changed"):
        with contextlib.closing(sqlite3.connect(station.db)) as conn:
            conn.execute("UPDATE review_verdicts SET agrees = 1")


def saved_verdicts(db: Path, filename: str) -> list[tuple]:
    return rows(db, "SELECT v.agrees, v.reviewer_class, v.finding FROM review_verdicts v JOIN predictions p ON "
                    "p.id = v.prediction_id WHERE p.filename = ? ORDER BY v.id", (filename,))


def exported(station, out: Path) -> dict[str, dict]:
    """export-reviews into `out`; verdicts.csv's current rows by the name they were uploaded as."""
    done = serve_cli(["export-reviews", out, "--database", f"sqlite:///{station.db}", "--store-dir", station.store],
                     out.parent)
    assert done.returncode == 0, done.stderr
    with open(out / "verdicts.csv", newline="") as fh:
        return {r["uploaded_as"]: r for r in csv.DictReader(fh) if r["current"] == "True"}


def test_the_page_says_what_the_model_is(station, browser):
    with browsing(browser, station) as page:
        log_in(page, station)
        assert page.locator("#support").inner_text() == "Decision support, not for primary diagnosis"
        assert page.locator("#synthetic").is_visible() and "SYNTHETIC" in page.locator("#synthetic").inner_text()
        said = page.locator("#model-classes").inner_text()
        assert "3 classes: glioma, meningioma, pituitary" in said and 'no "no tumour" class' in said


def test_findings_that_are_no_class_are_kept_apart_and_the_predicted_number_is_answered(station, browser, files,
                                                                                       tmp_path):
    with browsing(browser, station) as page:
        log_in(page, station)
        upload(page, {"normal.jpg": files["slice.jpg"]})
        assert page.locator("#choices button").all_inner_texts() == [
            "1 glioma", "2 meningioma", "3 pituitary", "4 no tumour / normal", "5 non-diagnostic", "6 other"]
        with page.expect_navigation():
            page.keyboard.press("d")
            page.keyboard.press("4")
        assert page.locator("#saved-what").inner_text() == "no tumour / normal"  # what was saved, said
        page.goto(station.url + "/review/")
        upload(page, {"same.jpg": files["slice.jpg"]})
        shown = bars(page)
        leading = max(shown, key=shown.get)
        with page.expect_navigation():
            page.keyboard.press("d")
            page.keyboard.press(str(list(shown).index(leading) + 1))  # the predicted class's own number
        assert page.locator("#saved-what").inner_text() == f"agree, {leading}"
    assert saved_verdicts(station.db, "normal.jpg") == [(0, "no tumour / normal", "no_tumour")]
    assert saved_verdicts(station.db, "same.jpg") == [(1, leading, None)]
    out = tmp_path / "reviewed"
    current = exported(station, out)
    assert current["normal.jpg"]["file"].startswith(".findings/no_tumour/")  # never in a tumour class folder
    assert current["normal.jpg"]["finding"] == "no_tumour" and (out / current["normal.jpg"]["file"]).is_file()
    assert current["same.jpg"]["file"].startswith(f"{leading}/")
    from data.manifest import list_classes

    assert set(list_classes(out)) <= {"glioma", "meningioma", "pituitary"}  # what train.py would read


def test_a_referred_case_is_confirmed_or_named_never_agreed_with(station, browser, files, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(buf, format="PNG")  # unlike any training slice
    with browsing(browser, station) as page:
        log_in(page, station)
        upload(page, {"white.png": buf.getvalue()})
        assert page.locator("#refer").is_visible()
        assert page.locator("#agree").inner_text().endswith("Confirm the referral (no class)")
        pid = page.locator("input[name=prediction_id]").get_attribute("value")
        with page.expect_navigation():
            page.keyboard.press("a")
        assert page.locator("#saved-what").inner_text() == "referral confirmed"
    client, csrf = session(station.url)
    with contextlib.closing(client):
        case_id = rows(station.db, "SELECT case_id FROM review_items WHERE prediction_id = ?", (pid,))[0][0]
        refused = client.post(f"/review/case/{case_id}/verdict", data={"csrf": csrf, "prediction_id": pid,
                                                                        "verdict": "agree"})
        assert refused.status_code == 422 and "referred" in refused.text
    assert saved_verdicts(station.db, "white.png") == [(1, "referral confirmed", "refer_confirmed")]
    current = exported(station, tmp_path / "reviewed")
    assert current["white.png"]["file"].startswith(".findings/refer_confirmed/")  # never exported as a class


def test_a_verdict_can_be_undone_for_a_few_seconds_and_skip_and_previous_move_along(station, browser, files):
    from sqlalchemy import create_engine

    from review.worklist import withdraw

    with browsing(browser, station) as page:
        log_in(page, station)
        upload(page, {"undo-me.jpg": files["slice.jpg"]})
        first = page.url
        with page.expect_navigation():
            page.keyboard.press("a")
        assert page.locator("#saved").is_visible() and page.locator("#undo").is_enabled()
        with page.expect_navigation():
            page.keyboard.press("u")
        assert page.url.split("?")[0] == first  # back on the case, pending again
        assert page.locator("#current-verdict").count() == 0
        assert page.locator("#history tbody tr.withdrawn").count() == 1
        page.goto(station.url + "/review/")  # pending, least certain first
        links = page.locator("#worklist tbody tr td:first-child a")
        second = links.nth(1).get_attribute("href")
        with page.expect_navigation():
            links.first.click()
        here = page.url
        with page.expect_navigation():
            page.keyboard.press("s")  # skip: the next pending case in the worklist's order
        assert page.url == station.url + second
        with page.expect_navigation():
            page.keyboard.press("p")  # previous: the case read before
        assert page.url == here
    [(vid, undone)] = rows(station.db, "SELECT v.id, w.verdict_id FROM review_verdicts v JOIN predictions p ON "
                                       "p.id = v.prediction_id LEFT JOIN review_withdrawn w ON w.verdict_id = v.id "
                                       "WHERE p.filename = 'undo-me.jpg'")
    assert undone == vid  # the row stays, marked withdrawn
    engine = create_engine(f"sqlite:///{station.db}")
    try:
        with pytest.raises(ValueError, match="can be undone for 0 seconds"):
            withdraw(engine, rows(station.db, "SELECT MIN(id) FROM review_verdicts")[0][0], 1, 0)
    finally:
        engine.dispose()


def test_upload_problems_are_sentences_on_the_page(station, browser, files):
    with browsing(browser, station) as page:
        log_in(page, station)
        drop(page, {"notes.jpg": b"hello, not an image", "fine.jpg": files["slice.jpg"]})
        said = page.locator("ul.intake").inner_text()
        assert "notes.jpg could not be read as an image; the page takes JPEG, PNG, BMP, TIFF or DICOM files." in said
        assert said.count("notes.jpg") == 1 and "Error" not in said and "{" not in said
        page.goto(station.url + "/review/")
        many = {f"{k}.jpg": files["slice.jpg"] for k in range(17)}  # serving.max_files is 16
        page.set_input_files("#files", [{"name": n, "mimeType": "image/jpeg", "buffer": b} for n, b in many.items()])
        assert page.locator("#upload-problem").inner_text().startswith(
            "Too many files at once: 17 were chosen, the page takes at most 16 per upload.")
        assert page.url == station.url + "/review/"  # nothing was sent
    client, csrf = session(station.url)
    with contextlib.closing(client):
        refused = client.post("/review/upload", data={"csrf": csrf},
                              files=[("files", (n, b)) for n, b in many.items()])
        assert refused.headers["content-type"].startswith("text/html") and "{" not in refused.text
        assert "Too many files at once: the page takes at most 16 files per upload." in refused.text


def test_the_heat_map_has_a_colour_scale_and_says_its_resolution(station, browser, files):
    with browsing(browser, station) as page:
        log_in(page, station)
        upload(page, {"heat.jpg": files["slice.jpg"]})
        assert page.locator("#heat-scale .ramp").is_visible()
        assert page.locator("#heatmap").evaluate("e => getComputedStyle(e).opacity") == "0.35"
        wait_loaded(page, "heatmap")
        page.wait_for_function("() => document.getElementById('heat-facts').textContent.includes('cells for a')")
        said = page.locator("#heat-facts").inner_text()
    rows_, cols, size = map(int, re.search(r"(\d+)×(\d+) cells for a (\d+) px input", said).groups())
    assert (rows_, cols, size) == (1, 1, 32)  # resnet18 at the tiny model's 32 px: one cell, no localisation
    assert "too coarse to localise a lesion" in said


def test_an_upload_named_like_markup_is_shown_as_text_and_runs_nothing(station, browser, files):
    with browsing(browser, station) as page:
        log_in(page, station)
        drop(page, {HOSTILE_NAME: files["slice.jpg"], "<svg onload=document.body.dataset.pwned=1>.jpg":
                    files["slice.jpg"]})  # dropped on the page, not picked
        assert page.locator("#case-name").inner_text() == HOSTILE_NAME
        page.goto(station.url + "/review/?status=all")
        assert HOSTILE_NAME in page.locator("#worklist").inner_text()
        assert page.locator("img[src='x']").count() == 0 and page.locator("main svg").count() == 0
        assert page.evaluate("document.body.dataset.pwned") is None
    stored = [p.name for p in station.store.iterdir()]
    assert stored and all(re.fullmatch(r"[0-9a-f]{32}\.(jpg|dcm|png)|heatmaps", n) for n in stored)


def listed(page) -> list[dict[str, str]]:
    """The worklist's rows as {column heading: text}, plus the row's classes."""
    heads = page.locator("#worklist thead th").all_inner_texts()
    cells = page.locator("#worklist tbody tr:not(:has(td.empty))").evaluate_all(
        "rs => rs.map(r => [r.className, ...[...r.children].map(c => c.textContent.trim())])")
    return [{"class": c[0], **dict(zip(heads, c[1:]))} for c in cells]


def certainty(rows: list[dict]) -> list[float]:
    return [float(r["Top probability"].split("%")[0]) for r in rows]


def test_the_worklist_filters_sorts_and_monitors(station, browser, files, artifacts):
    with browsing(browser, station) as page:
        log_in(page, station)
        pending = listed(page)  # the default: pending, least certain first
        assert len(pending) >= 2 and certainty(pending) == sorted(certainty(pending))
        assert all(r["class"].split()[0] == "pending" for r in pending)
        with page.expect_navigation():
            page.click("nav.tabs a:has-text('disagreements')")
        disagreed = listed(page)
        assert disagreed and all(r["Status"].startswith(("disagreed: ", "finding: ")) for r in disagreed)
        assert page.locator("nav.tabs a.current .count").inner_text() == str(len(disagreed))
        page.goto(station.url + "/review/?status=referred")
        assert all("referred" in r["class"].split() and r["Refer"] == "refer" for r in listed(page))
        page.goto(station.url + "/review/?status=all")
        everything = listed(page)
        assert len(everything) >= 5
        predicted = everything[0]["Predicted"]
        page.select_option("form.filters select[name=predicted]", predicted)
        page.select_option("form.filters select[name=order]", "desc")
        with page.expect_navigation():
            page.click("form.filters button[type=submit]")
        chosen = listed(page)
        assert chosen and {r["Predicted"] for r in chosen} == {predicted}
        assert certainty(chosen) == sorted(certainty(chosen), reverse=True)
        assert len(chosen) == sum(r["Predicted"] == predicted for r in everything)

        page.goto(station.url + "/review/?status=all")
        checks = page.locator("#monitor tr.check")
        assert checks.count() == 5
        text = page.locator("#monitor").inner_text()
        assert "test accuracy" in text and "not recorded" not in text  # the references of the evaluated version
        assert set(checks.locator("td.status").all_inner_texts()) <= {"ok", "warn", "too few"}
        page.screenshot(path=str(artifacts / "worklist.png"), full_page=True)


# ---- the page's security, without a browser ----------------------------------------------------------------

def session(url: str) -> tuple[httpx.Client, str]:
    """An httpx client logged in as alice, and the session's CSRF token."""
    client = httpx.Client(base_url=url, timeout=120)
    form = client.get("/review/login")
    login_csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    done = client.post("/review/login", data={"csrf": login_csrf, "name": "alice", "password": PASSWORD,
                                              "next": "/review/"})
    assert done.status_code == 303
    cookie = done.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/review" in cookie
    assert "Secure" not in cookie  # plain http on loopback; over https it is Secure
    page = client.get("/review/")
    return client, re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def test_forms_need_a_session_and_its_csrf_token_and_pages_allow_no_inline_script(station, files):
    import psutil

    listening = {c.laddr for c in psutil.Process(station.proc.pid).net_connections("inet") if c.status == "LISTEN"}
    assert listening == {("127.0.0.1", station.port)}  # no --host: loopback only, page and API alike
    with httpx.Client(base_url=station.url, timeout=120) as anon:
        assert anon.get("/").status_code == 303  # the page is exempt from the bearer token ...
        assert anon.get("/v1/model").status_code == 401  # ... the API is not
        assert anon.get("/review/").headers["location"].startswith("/review/login")
        before = rows(station.db, "SELECT COUNT(*) FROM predictions")
        refused = anon.post("/review/upload", files={"files": ("a.jpg", files["slice.jpg"])})
        assert refused.status_code == 303 and rows(station.db, "SELECT COUNT(*) FROM predictions") == before
        form = anon.get("/review/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        wrong = anon.post("/review/login", data={"csrf": token, "name": "alice", "password": "not it at all"})
        assert wrong.status_code == 401 and "Wrong name or password" in wrong.text
        no_cookie = httpx.post(station.url + "/review/login", data={"csrf": token, "name": "alice",
                                                                   "password": PASSWORD})
        assert no_cookie.status_code == 403  # the login form's token must match its cookie
    client, csrf = session(station.url)
    with contextlib.closing(client):
        page = client.get("/review/?status=all")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
        case = client.get(re.search(r'href="(/review/case/[0-9a-f]{32})', page.text).group(1))
        for html in (page.text, case.text):
            assert not re.search(r"<script(?![^>]*\bsrc=)", html) and not re.search(r"<[^>]*\son[a-z]+\s*=", html)
        pid = re.search(r'name="prediction_id" value="([0-9a-f]{32})"', case.text).group(1)
        url = case.url.path + "/verdict"
        for data in ({"prediction_id": pid, "verdict": "agree"}, {"prediction_id": pid, "verdict": "agree",
                                                                 "csrf": "forged-token-of-another-page"}):
            assert client.post(url, data=data).status_code == 403
        big = client.post("/review/upload", data={"csrf": csrf},
                          files={"files": ("big.jpg", b"\xff\xd8" + bytes(3 * 2**20))})
        assert big.status_code == 413  # the API's upload cap (serving.max_upload_mb) holds here too
        assert client.post("/review/logout", data={"csrf": csrf}).status_code == 303
        assert client.get("/review/").status_code == 303  # the session is gone


# ---- the refer rule ----------------------------------------------------------------------------------------

def test_the_refer_rule_flags_low_confidence_and_slices_unlike_the_training_data(trained):
    import torch

    from core.contract import Contract
    from data.intensity import REFERENCE_KEY, distance_to
    from deploy.refer import NO_REFERENCE, ReferRule, calibrated
    from evaluation.calibration import apply_temperature, logits_from_probs

    contract = Contract.from_checkpoint(torch.load(trained[2], weights_only=True))
    reference = contract.extra[REFERENCE_KEY]
    assert len(reference["histogram"]) == 256 and sum(reference["histogram"]) == reference["pixels"]
    spread = reference["validation_distances"]
    assert 0 <= spread["p50"] <= spread["p99"] <= spread["max"] <= 1
    rule = ReferRule.for_model(contract.to_dict(), None, threshold=0.6)
    assert rule.limit == spread["p99"]  # the model's own limit unless one is configured
    confident = {"glioma": 0.9, "meningioma": 0.05, "pituitary": 0.05}
    unsure = {"glioma": 0.4, "meningioma": 0.35, "pituitary": 0.25}
    counts = np.asarray(reference["histogram"], dtype=np.float64)
    typical = np.repeat(np.arange(256, dtype=np.uint8), np.round(counts / counts.sum() * 128 * 128).astype(int))
    typical = np.resize(typical, (128, 128))  # a slice with the training split's own intensities
    white = np.full((32, 32), 255, np.uint8)
    assert distance_to(reference, typical) < 0.05 < distance_to(reference, white)
    def refer(probabilities, gray):
        return rule.assess({"probabilities": probabilities}, gray).refer

    assert not refer(confident, typical) and refer(unsure, typical) and refer(confident, white)
    judged = rule.assess({"probabilities": confident}, white)
    assert [r.code for r in judged.reasons] == ["unlike_training"]
    assert [r.text for r in judged.reasons] == [f"unlike the training data: intensity distance {judged.distance:.3f} "
                                                f"is above the limit {judged.limit:.3f}"]
    old = ReferRule.for_model({k: v for k, v in contract.to_dict().items() if k != REFERENCE_KEY}, None, 0.6)
    unknown = old.assess({"probabilities": confident}, white)
    assert not unknown.refer and NO_REFERENCE in unknown.notes and unknown.distance is None  # said, never guessed
    p = unsure
    want = apply_temperature(logits_from_probs(np.array([list(p.values())])), 1.7)[0]
    assert np.allclose(list(calibrated(p, 1.7).values()), want, atol=1e-9)


# ---- one image through the three doors: the API, the review page, the DICOM receiver -------------------------

DOOR_FACTS = ("record_id", "file", "sha256")  # what differs by door in a record: its id, the name it came by, its bytes


@contextlib.contextmanager
def served_in_process(registry, tmp_path, *extra: str):
    """serve.py --review in this process under a real uvicorn on a free loopback port, reviewer alice added:
    (the app, its URL, the audit database), stopped on leaving."""
    import uvicorn

    import serve
    from serving.app import create_app

    db = tmp_path / "audit.db"
    args = serve.get_args_parser().parse_args([*map(str, registry), "--model", MODEL, "--alias", "staging",
                                               "--review", "--database", f"sqlite:///{db}", "--poll-seconds", "0",
                                               "--set", f"review.store_dir={tmp_path / 'store'}", *extra])
    options = serve.options_from_args(args)
    app = create_app(options, serve.build_extensions(options))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started and app.state.service.model is not None)
        (tmp_path / "alice.pw").write_text(PASSWORD)
        assert serve_cli(["add-reviewer", "alice", "--password-file", tmp_path / "alice.pw", "--database",
                          f"sqlite:///{db}"], tmp_path).returncode == 0
        yield app, f"http://127.0.0.1:{port}", db
    finally:
        server.should_exit = True
        thread.join(60)


def test_the_three_doors_record_one_image_alike_and_a_dicom_arrival_joins_the_worklist(registry, files, tmp_path,
                                                                                        capsys):
    """The same two-frame DICOM through POST /v1/predict, the review page's upload and a C-STORE: each audit row
    says the same prediction in the same columns (one function builds them all), with the same refer flag, reasons
    and answer checks, and differs only in who sent it and how; `inference_with_mlflow.py --json` flags it alike;
    the instance the DICOM receiver took is a case on the worklist, judged as its audit row says."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    with served_in_process(registry, tmp_path, "--dicom-port", str(free_port()), "--dicom-allow",
                           "SCANNER@127.0.0.1", "--set", f"pacs.spool_dir={tmp_path / 'spool'}") as (app, url, db):
        frames = np.stack([np.asarray(Image.open(io.BytesIO(files["slice.jpg"])).convert("L"))] * 2)
        frames[1] = 255 - frames[1]  # two frames the model tells apart
        mr = write_dicom(tmp_path / "cine.dcm", frames.astype(np.uint16) * 16, DICOM_WINDOW)
        data = (tmp_path / "cine.dcm").read_bytes()

        client, csrf = session(url)
        with contextlib.closing(client):
            assert client.post("/v1/predict", files=[("files", ("cine.dcm", data))]).status_code == 200
            assert client.post("/review/upload", data={"csrf": csrf},
                               files=[("files", ("cine.dcm", data))]).status_code == 303  # to the case
            ae = AE(ae_title="SCANNER")
            ae.add_requested_context(MRImageStorage)
            assoc = ae.associate("127.0.0.1", app.state.service.cfg.pacs.port, ae_title="MRI_AI")
            assert assoc.is_established
            assert assoc.send_c_store(dcmread(tmp_path / "cine.dcm")).Status == 0
            assoc.release()

            columns = ("source", "client", "case_id", "study_uid", "series_uid", "sop_instance_uid", "frame",
                       "filename", "model_name", "model_version", "model_alias", "flavor", "predicted_class",
                       "confidence", "output_json", "id")
            found = [dict(zip(columns, r)) for r in rows(db, f"SELECT {', '.join(columns)} FROM predictions "
                                                             "ORDER BY source, frame")]
            by_door = {door: [r for r in found if r["source"] == door] for door in ("api", "review", "dicom")}
            assert [len(v) for v in by_door.values()] == [2, 2, 2]

            def said(row: dict) -> dict:
                """What a row says of the prediction, apart from the door's own facts."""
                record = json.loads(row["output_json"])
                assert record["record_id"] == row["id"] and record["frame"] == row["frame"]
                kept = {k: v for k, v in row.items() if k not in ("source", "client", "case_id", "filename", "id",
                                                                  "output_json")}
                return {**kept, **{k: v for k, v in record.items() if k not in DOOR_FACTS}}

            api, review, dicom = ([said(r) for r in by_door[d]] for d in ("api", "review", "dicom"))
            assert api == review and review[0].keys() == dicom[0].keys()
            for a, d in zip(api, dicom):
                assert {k: v for k, v in a.items() if k not in ("confidence", "probabilities")} == \
                    {k: v for k, v in d.items() if k not in ("confidence", "probabilities")}
                assert abs(a["confidence"] - d["confidence"]) < 1e-6
            assert [r["frame"] for r in api] == [1, 2] and {r["sop_instance_uid"] for r in api} == {mr.SOPInstanceUID}
            assert isinstance(api[0]["refer"], bool) and api[0]["flavor"] == "onnx"
            assert all(isinstance(r["refer_reasons"], list) for r in api) and "ood_distance" in api[0]

            # The command line judges the same file with the same rule: the same flags, the same reasons.
            capsys.readouterr()
            assert run_script("inference_with_mlflow", [*registry, "--model", MODEL, "--alias", "staging",
                                                        "--image", tmp_path / "cine.dcm", "--json"]) == 0
            cli = json.loads(capsys.readouterr().out)["predictions"]
            flags = ("refer", "refer_reasons", "out_of_distribution", "prediction_set")
            assert [{k: r[k] for k in flags} for r in cli] == [{k: r[k] for k in flags} for r in api]
            assert [(r["client"], r["filename"]) for r in by_door["dicom"]] == [
                ("SCANNER@127.0.0.1", mr.SOPInstanceUID)] * 2

            # The DICOM arrival is a case on the worklist, one item per frame, flagged as its audit row says.
            case_id = by_door["dicom"][0]["case_id"]
            items = rows(db, "SELECT i.frame, i.refer, i.prediction_id FROM review_items i WHERE i.case_id = ? "
                             "ORDER BY i.frame", (case_id,))
            assert [(f, bool(refer), pid) for f, refer, pid in items] == [
                (r["frame"], json.loads(r["output_json"])["refer"], r["id"]) for r in by_door["dicom"]]
            assert client.get("/review/?status=all").text.count(f"/review/case/{case_id}?frame=") == 2
            case = client.get(f"/review/case/{case_id}?frame=2")
            assert case.status_code == 200 and "from SCANNER@127.0.0.1" in case.text
            assert client.get(f"/review/case/{case_id}/slice.png?frame=2").headers["content-type"] == "image/png"


def test_the_reading_room_opens_on_the_study_list_and_pages_it(registry, files, tmp_path, monkeypatch):
    """After the login (and at / and /review) the study list comes first; it shows studies.PAGE studies a page,
    with the next and previous pages linked, and a hostile page number is a 4xx."""
    from review import studies

    monkeypatch.setattr(studies, "PAGE", 2)
    with served_in_process(registry, tmp_path) as (_, url, _db):
        with httpx.Client(base_url=url) as anonymous:
            assert anonymous.get("/").headers["location"] == "/review/studies"
            form = anonymous.get("/review/login")
            login_csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
            landed = anonymous.post("/review/login", data={"csrf": login_csrf, "name": "alice", "password": PASSWORD})
            assert landed.headers["location"] == "/review/studies"  # no `next`: the study list
        client, csrf = session(url)
        with contextlib.closing(client):
            for k in range(3):  # three uploads: three studies
                made = client.post("/review/upload", data={"csrf": csrf},
                                   files=[("files", (f"scan{k}.jpg", files["slice.jpg"]))])
                assert made.status_code == 303, made.text
            first = client.get("/review/studies?status=all")
            assert first.text.count('class="study-row"') == 2 and "3 studies, 1–2 shown" in first.text
            assert 'id="studies-next"' in first.text and 'id="studies-previous"' not in first.text
            second = client.get("/review/studies?status=all&page_no=1")
            assert second.text.count('class="study-row"') == 1 and 'id="studies-previous"' in second.text
            assert 'id="studies-next"' not in second.text
            for hostile in ("-1", "99999999999999999999", "x"):
                answer = client.get(f"/review/studies?page_no={hostile}")
                assert 400 <= answer.status_code < 500 and "Traceback" not in answer.text


def test_the_page_prefix_is_written_once():
    """Every template link and every URL the page's code builds comes from review.urls.PREFIX: moving the page is
    one line."""
    written = [str(p.relative_to(ROOT)) for p in [*(ROOT / "review" / "templates").glob("*.html"),
                                                  *(ROOT / "review").glob("*.py")]
               if p.name != "urls.py" and re.search(r"""["'(]/review(?=[/"'])""", p.read_text())]
    assert written == []


def wait_for(condition, timeout: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# ---- back to training --------------------------------------------------------------------------------------

def test_export_reviews_is_a_training_set_train_py_reads(station, tiny_data, tmp_path):
    """Every tiny-data image reviewed (agreeing with its folder's class), exported, and trained on."""
    client, csrf = session(station.url)
    truth = {"brain_glioma": "glioma", "brain_menin": "meningioma", "brain_tumor": "pituitary"}
    images = sorted(tiny_data.rglob("*.jpg"))
    with contextlib.closing(client):
        for chunk in (images[:12], images[12:]):
            r = client.post("/review/upload", data={"csrf": csrf}, files=[("files", (p.name, p.read_bytes()))
                                                                          for p in chunk])
            assert r.status_code in (200, 303), r.text[:300]
        cases = rows(station.db, "SELECT p.id, p.filename, p.predicted_class, p.case_id FROM predictions p JOIN "
                                 "review_items i ON i.prediction_id = p.id")
        by_name = {p.name: truth[p.parent.name] for p in images}
        for pid, name, _, case_id in cases:
            if name in by_name:
                said = by_name[name]
                data = {"csrf": csrf, "prediction_id": pid, "verdict": f"class:{said}"}  # referred or not
                assert client.post(f"/review/case/{case_id}/verdict", data=data).status_code == 303
    out = tmp_path / "reviewed"
    done = serve_cli(["export-reviews", out, "--database", f"sqlite:///{station.db}", "--store-dir", station.store],
                     tmp_path)
    assert done.returncode == 0, done.stderr
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    with open(out / "verdicts.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    current = {r["file"]: r for r in table if r["current"] == "True" and r["file"]}
    assert written == set(current) | {"verdicts.csv"}
    for name, cls in by_name.items():  # each image under the reviewer's class, as uploaded
        [row] = [r for r in current.values() if r["uploaded_as"] == name]
        assert row["file"].startswith(f"{cls}/") and re.fullmatch(r"[0-9a-f]{32}_[0-9a-f]{32}\.jpg",
                                                                   row["file"].split("/")[1])
        assert (out / row["file"]).read_bytes() == next(p for p in images if p.name == name).read_bytes()
    assert len(table) == rows(station.db, "SELECT COUNT(*) FROM review_verdicts")[0][0]  # every verdict ever given
    overlay = write_overlay(tmp_path, out, **{"registry.auto_register": False})
    assert run_script("train", ["--config", overlay, "--model", "resnet18", "--set",
                                "dataset.group_pattern=^([^_]+)_"]) == 0
    manifest = json.loads(next((tmp_path / "splits").glob("*.json")).read_text())
    classed = [w for w in written if not w.startswith(".findings/") and w != "verdicts.csv"]
    assert sum(manifest["sizes"].values()) == len(classed) and manifest["class_folders"] == sorted(truth.values())


# ---- the monitoring panel's judgement ------------------------------------------------------------------------

def test_the_monitoring_checks_warn_past_their_limits_and_only_with_enough_samples():
    from core.config import MonitorLimits
    from deploy.refer import ReferRule
    from review.monitor import agreement_check, class_check, confidence_check, predicted_share, refer_check

    limits = MonitorLimits(min_samples=10)
    probs = json.dumps({"glioma": 0.5, "meningioma": 0.3, "pituitary": 0.2})
    evaluation = {"accuracy": {"value": 0.95, "ci_low": 0.92, "ci_high": 0.98},
                  "class_names": ["glioma", "meningioma", "pituitary"], "confusion_matrix": [[5, 0, 0], [1, 4, 0],
                                                                                          [0, 0, 10]]}
    assert predicted_share(evaluation) == {"glioma": 0.3, "meningioma": 0.2, "pituitary": 0.5}  # column sums
    ref = {"predicted_share": {"glioma": 1 / 3, "meningioma": 1 / 3, "pituitary": 1 / 3},
           "confidence": [0.9] * 90 + [0.5] * 10, "intensity_distance": [0.3] + [0.05] * 99}
    rule = ReferRule(threshold=0.6, limit=0.2)

    def recent(n, cls="glioma", confidence=0.9, refer=False):
        return [{"predicted_class": cls, "confidence": confidence, "refer": refer, "probabilities_json": probs}] * n

    drifted = recent(20)  # every recent slice glioma, as confident as the test split, none referred
    assert class_check(drifted, ref["predicted_share"], limits).status == "warn"
    assert confidence_check(drifted, ref["confidence"], limits).status == "ok"
    referred = refer_check(recent(20, confidence=0.5, refer=True), ref, rule, limits)
    assert referred.status == "warn" and referred.reference == "11%"  # 10 unsure + 1 far test slice
    assert confidence_check(recent(20, confidence=0.6), ref["confidence"], limits).status == "warn"
    assert class_check(drifted[:9], ref["predicted_share"], limits).status == "too few"
    assert agreement_check([True] * 16 + [False] * 4, evaluation, limits).status == "warn"  # 80% vs 95%
    assert agreement_check([True] * 19 + [False], evaluation, limits).status == "ok"
    assert agreement_check([True] * 20, None, limits).status == "no reference"  # never made up


def test_add_reviewer_refuses_a_short_password_and_a_taken_name(tmp_path):
    db = f"sqlite:///{tmp_path / 'audit.db'}"
    (tmp_path / "short.pw").write_text("abc\n")
    short = serve_cli(["add-reviewer", "bob", "--password-file", tmp_path / "short.pw", "--database", db], tmp_path)
    assert short.returncode == 2 and short.stderr.strip() == (
        f"error: the password in {tmp_path / 'short.pw'} has 3 characters; at least 10 please")
    (tmp_path / "bob.pw").write_text(PASSWORD)
    first = serve_cli(["add-reviewer", "bob", "--password-file", tmp_path / "bob.pw", "--database", db], tmp_path)
    again = serve_cli(["add-reviewer", "bob", "--password-file", tmp_path / "bob.pw", "--database", db], tmp_path)
    assert first.returncode == 0 and again.returncode == 2 and "exists already" in again.stderr
    stored = rows(tmp_path / "audit.db", "SELECT name, password_hash FROM reviewers")
    assert stored[0][0] == "bob" and stored[0][1].startswith("$argon2id$") and PASSWORD not in stored[0][1]

"""What the reader sends and what the page says back: a verdict read from its form, the choices a case offers, and
upload problems said as sentences (never raw JSON, an exception's class name, or the file's name twice)."""
from __future__ import annotations

import re

from review.worklist import FINDINGS, REFER_CONFIRMED, Verdict

NO_TUMOUR = re.compile(r"no.?tumou?r|normal|healthy", re.IGNORECASE)  # a class that says "nothing found"
READABLE = "JPEG, PNG, BMP, TIFF or DICOM"
EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Warning)\b:?\s*")
NOT_AN_IMAGE = re.compile(r"cannot identify image file|cannot decode|not a valid|truncated|unrecognized|"
                          r"invalid|no pixel data|not a JPEG, PNG", re.IGNORECASE)


def verdict_from_form(fields) -> Verdict:
    """The verdict form: `verdict` is agree, refer (confirm a referral), class:<name>, finding:<key>, or disagree
    with `reviewer_class`; `flagged` the prediction ids of the slices flagged with it."""
    said = str(fields.get("verdict", ""))
    kind, _, value = said.partition(":")
    pid, note = str(fields.get("prediction_id", "")), fields.get("note")
    flagged = tuple(str(v) for v in fields.getlist("flagged")) if hasattr(fields, "getlist") else ()
    if said == "agree":
        return Verdict(pid, True, None, note, flagged=flagged)
    if said == "refer":
        return Verdict(pid, False, None, note, REFER_CONFIRMED, flagged)
    if kind == "finding":
        return Verdict(pid, False, None, note, value, flagged)
    name = value if kind == "class" else str(fields.get("reviewer_class", ""))
    return Verdict(pid, False, name, note, flagged=flagged)


def finding_choices(classes: list[str]) -> list[tuple[str, str, int]]:
    """(key, label, number) of each finding offered after the classes (D + its number); "no tumour / normal" is
    left out when the model has such a class of its own."""
    keys = [k for k in FINDINGS if not (k == "no_tumour" and any(NO_TUMOUR.search(c) for c in classes))]
    return [(k, FINDINGS[k], len(classes) + i) for i, k in enumerate(keys, start=1)]


def readable(reason: str | None, filename: str) -> str:
    """An upload's problem as a sentence about the file (the page shows the file's name beside it)."""
    text = (reason or "").strip()
    for prefix in (f"{filename}: ", f"{filename}:"):
        text = text.removeprefix(prefix)
    text = EXCEPTION_NAME.sub("", text).replace(f"'{filename}'", "").strip(" :")
    if not text or NOT_AN_IMAGE.search(text):
        return f"could not be read as an image; the page takes {READABLE} files."
    if text == "empty file":
        return "is empty."
    return "was refused: " + text + ("" if text.endswith(".") else ".")


def form_problem(status: int, detail: str, max_files: int) -> str:
    """A refused upload form (before any file was read) in one sentence."""
    if "too many files" in detail.lower():
        return f"Too many files at once: the page takes at most {max_files} files per upload. Upload them in " \
               "smaller groups."
    if status == 413:
        return "The upload is too large for this server (serving.max_upload_mb). Upload fewer or smaller files."
    if status == 415 or "no file" in detail.lower():
        return f"No files arrived. Drop or pick {READABLE} files."
    return "The upload could not be read. Try again with fewer files."

"""The Key Object Selection document: the key slices of a series, flagged for the PACS viewer.

One KOS per series result (highdicom), titled "Of Interest", observed by the model as a device, in the series'
study, naming each key slice's instance and, for a multi-frame instance, its frames (ReferencedFrameNumber on the
image reference, which highdicom does not write itself). Its description carries the series' class, the refer flag
and the disclaimer, so a viewer that lists KOS documents shows why the slices were chosen.
"""
from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

from pacs.report import (
    DISCLAIMER,
    KO_SERIES_NUMBER,
    MANUFACTURER,
    ModelInfo,
    SeriesOutput,
    result_uid,
    series_description,
    study_header,
)


def key_description(result: dict) -> str:
    refer = "; REFER to a radiologist" if result["refer"] else ""
    return (f"AI key slices: {result['predicted_class']} {result['confidence']:.0%}{refer}; {DISCLAIMER}")[:1024]


def make_key_objects(headers: dict[str, Dataset], key_records: list[dict], result: dict, model: ModelInfo,
                     output: SeriesOutput) -> Dataset:
    """The KOS of one series: `headers` by SOP Instance UID (the key slices' instances), `key_records` the key
    slices (SOP Instance UID and frame)."""
    frames: dict[str, list[int]] = {}
    for r in key_records:
        frames.setdefault(r["sop_instance_uid"], [])
        if r["frame"]:
            frames[r["sop_instance_uid"]].append(int(r["frame"]))
    referenced = [study_header(headers[uid]) for uid in frames]
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=result_uid(model.name, model.version, "device"),
                                                       name=model.name, manufacturer_name=MANUFACTURER)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest, referenced_objects=referenced, description=key_description(result),
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                      observer_identifying_attributes=device))
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced, content=content, series_instance_uid=output.uid("KO", "series"),
        series_number=KO_SERIES_NUMBER, sop_instance_uid=output.uid("KO"), instance_number=output.revision + 1,
        manufacturer=MANUFACTURER)
    for item in kos.ContentSequence:  # the image references: add the key frames of multi-frame instances
        for ref in item.get("ReferencedSOPSequence", []):
            if frames.get(ref.ReferencedSOPInstanceUID):
                ref.ReferencedFrameNumber = frames[ref.ReferencedSOPInstanceUID]
    kos.SeriesDescription = series_description("key slices", model)
    return kos


def read_key_objects(kos: Dataset) -> list[tuple[str, int | None]]:
    """(SOP Instance UID, frame or None) of every slice a KOS flags."""
    out = []
    for item in kos.ContentSequence:
        for ref in item.get("ReferencedSOPSequence", []):
            numbers = ref.get("ReferencedFrameNumber")
            if numbers is None:
                out.append((str(ref.ReferencedSOPInstanceUID), None))
                continue
            numbers = list(numbers) if isinstance(numbers, MultiValue) else [numbers]
            out.extend((str(ref.ReferencedSOPInstanceUID), int(n)) for n in numbers)
    return out

"""The classification as a DICOM Comprehensive SR (TID 1500 measurement report, built with highdicom).

One SR per classified instance, one measurement group (TID 1501) per frame: the source image and frame, the
predicted class as the group's finding (DCM 121071), the refer flag, the out-of-distribution flag and each class of
the conformal prediction set as coded evaluations, every class
probability as a number, and the model name and version as its algorithm identification (TID 4019). Class,
probability and refer codes use the private coding scheme 99BCMRI. `read_report` reads the document back.
"""
from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

SCHEME = "99BCMRI"  # private coding scheme (PS3.16 8.2: designators starting with 99 are local)
MANUFACTURER = "Brain Cancer MRI toolkit"
DISCLAIMER = "AI result, not for primary diagnosis"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
REFER = hd.sr.CodedConcept("refer", SCHEME, "Refer to a radiologist")
OOD = hd.sr.CodedConcept("ood", SCHEME, "Out of distribution (image features unlike the training data)")
IN_SET = hd.sr.CodedConcept("set", SCHEME, "In the conformal prediction set")
YES, NO = codes.SCT.Yes, codes.SCT.No


@dataclass(frozen=True)
class ModelInfo:
    """The model that produced a result, as the registry names it (e.g. brain-cancer-resnet18, version 3)."""
    name: str
    version: str


def result_uid(*parts) -> str:
    """A UID derived from what a result is (source instance, frame, model version, kind): making the same
    result twice gives the same UID, so the PACS and the spool see one object, not two."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


# Patient and study attributes a result copies from its source; type 2, so present even when empty.
STUDY_ATTRIBUTES = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName")


def study_header(ds: Dataset) -> Dataset:
    """The source's attributes without its pixels, with the patient/study attributes a result copies present
    (empty when the source lacks them, or when patient identity was removed on receipt)."""
    header = Dataset()
    for element in ds:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            header.add(element)
    for keyword in STUDY_ATTRIBUTES:
        if keyword not in header:
            setattr(header, keyword, "")
    header.file_meta = getattr(ds, "file_meta", None) or Dataset()
    return header


def class_code(name: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(name, SCHEME, name)


def probability_code(name: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(f"p:{name}", SCHEME, f"Probability of {name}")


def frame_group(record: dict, model: ModelInfo) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    frame = record["frame"]
    source = hd.sr.SourceImageForMeasurementGroup(record["sop_class_uid"], record["sop_instance_uid"],
                                                  [frame] if frame else None)
    probabilities = [hd.sr.Measurement(name=probability_code(name), value=float(p), unit=codes.UCUM.NoUnits)
                     for name, p in record["probabilities"].items()]
    evaluations = [hd.sr.QualitativeEvaluation(REFER, YES if record["refer"] else NO)]
    if record.get("out_of_distribution") is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(OOD, YES if record["out_of_distribution"] else NO))
    evaluations += [hd.sr.QualitativeEvaluation(IN_SET, class_code(name)) for name in record.get("prediction_set")
                    or []]
    tracking = hd.sr.TrackingIdentifier(uid=result_uid(record["sop_instance_uid"], frame, "group"),
                                        identifier=f"frame {frame}" if frame else "image")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=class_code(record["predicted_class"]),
        algorithm_id=hd.sr.AlgorithmIdentification(model.name, str(model.version)),
        measurements=probabilities, qualitative_evaluations=evaluations, source_images=[source])


def make_report(ds: Dataset, records: list[dict], model: ModelInfo) -> Dataset:
    """The Comprehensive SR of one instance's records (each with a `refer` flag), in the instance's study."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=result_uid(model.name, model.version, "device"),
                                                       name=model.name, manufacturer_name=MANUFACTURER)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    content = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.SCT.ImagingProcedure,
                                      imaging_measurements=[frame_group(r, model) for r in records])
    sr = hd.sr.ComprehensiveSR(
        evidence=[study_header(ds)], content=content[0],
        series_instance_uid=result_uid(ds.StudyInstanceUID, ds.SeriesInstanceUID, model.name, model.version, "SR"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(ds.SOPInstanceUID, model.name, model.version, "SR"),
        instance_number=int(ds.get("InstanceNumber", 1) or 1), manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False)  # preliminary and unverified: an AI reading
    sr.SeriesDescription = series_description("SR", model)
    return sr


def series_description(kind: str, model: ModelInfo) -> str:
    return f"AI {kind}, not for primary diagnosis: {model.name} v{model.version}"[:64]  # LO


def _text(group, code) -> str | None:
    items = hd.sr.utils.find_content_items(group[0], name=code, recursive=True)
    return str(items[0].TextValue) if items else None


def read_report(sr: Dataset) -> list[dict]:
    """The frames of an SR made by make_report: source SOP instance UID, frame, class, probabilities, refer,
    model name and version."""
    doc = hd.sr.ComprehensiveSR.from_dataset(sr, copy=True)
    out = []
    for group in doc.content.get_image_measurement_groups():
        source = group.source_images[0]
        frames = source.referenced_frame_numbers
        found = group.get_qualitative_evaluations()
        evaluations = {e.name.value: e.value for e in found}
        out.append({
            "sop_instance_uid": source.referenced_sop_instance_uid,
            "frame": int(frames[0]) if frames else None,
            "predicted_class": group.finding_type.meaning,
            "refer": evaluations[REFER.value].value == YES.value,
            "out_of_distribution": None if OOD.value not in evaluations else evaluations[OOD.value].value == YES.value,
            "prediction_set": [e.value.value for e in found if e.name.value == IN_SET.value] or None,
            "probabilities": {m.name.value.removeprefix("p:"): float(m.value) for m in group.get_measurements()},
            "model": _text(group, codes.DCM.AlgorithmName),
            "version": _text(group, codes.DCM.AlgorithmVersion),
        })
    return out

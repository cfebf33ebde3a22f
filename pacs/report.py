"""The classification as a DICOM Comprehensive SR (TID 1500 measurement report, built with highdicom).

Per series (the default, `make_series_report`): one SR whose first measurement group (TID 1501) is the series'
reading: the series' class as its finding, its probabilities, the refer flag and each reason, the rule and the
disclaimer as text, and the key slices as its source images (SOP Instance UID and frame); then one group per key
slice with that slice's own reading. A later version of the series' result (late instances) names the earlier SR
as its predecessor. Per instance (`pacs.results: slice`, `make_report`): one measurement group per frame. A slice's
group carries its refer flag, its out-of-distribution flag and each class of its conformal prediction set as coded
evaluations (when the model has those checks). Each group carries the model name and version as its algorithm
identification (TID 4019). Class, probability, refer and text codes use the private coding scheme 99BCMRI.
`read_report` and `read_series_report` read them back.
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
KO_SERIES_NUMBER = 9903
REFER = hd.sr.CodedConcept("refer", SCHEME, "Refer to a radiologist")
OOD = hd.sr.CodedConcept("ood", SCHEME, "Out of distribution (image features unlike the training data)")
IN_SET = hd.sr.CodedConcept("set", SCHEME, "In the conformal prediction set")
REFER_REASON = hd.sr.CodedConcept("reason", SCHEME, "Reason to refer")
NOTE = hd.sr.CodedConcept("note", SCHEME, "Note")
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
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=class_code(record["predicted_class"]),
        algorithm_id=hd.sr.AlgorithmIdentification(model.name, str(model.version)),
        measurements=probabilities, qualitative_evaluations=evaluations, source_images=[source])
    group[0].ContentSequence.extend(_text(REFER_REASON, reason) for reason in record.get("refer_reasons", []))
    return group


def measurement_report(groups: list, model: ModelInfo) -> Dataset:
    """TID 1500 with the model as the observing device, around the given measurement groups."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=result_uid(model.name, model.version, "device"),
                                                       name=model.name, manufacturer_name=MANUFACTURER)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    return hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.SCT.ImagingProcedure,
                                   imaging_measurements=groups)[0]


def make_report(ds: Dataset, records: list[dict], model: ModelInfo) -> Dataset:
    """The Comprehensive SR of one instance's records (each with a `refer` flag), in the instance's study."""
    sr = hd.sr.ComprehensiveSR(
        evidence=[study_header(ds)], content=measurement_report([frame_group(r, model) for r in records], model),
        series_instance_uid=result_uid(ds.StudyInstanceUID, ds.SeriesInstanceUID, model.name, model.version, "SR"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(ds.SOPInstanceUID, model.name, model.version, "SR"),
        instance_number=int(ds.get("InstanceNumber", 1) or 1), manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False)  # preliminary and unverified: an AI reading
    sr.SeriesDescription = series_description("SR", model)
    return sr


@dataclass(frozen=True)
class SeriesOutput:
    """Where one version of a series' results goes: the UIDs of its result series and objects."""
    study_uid: str
    series_uid: str          # the source series
    model: ModelInfo
    revision: int            # 0 first; 1, 2 ... after late instances

    def uid(self, kind: str, what: str = "object") -> str:
        """A result UID: the same series, model version and revision always give the same one."""
        if what == "series":
            return result_uid(self.study_uid, self.series_uid, self.model.name, self.model.version, kind, "series")
        return result_uid(self.study_uid, self.series_uid, self.model.name, self.model.version, kind, self.revision)


def _text(name, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:1024], relationship_type="CONTAINS")


def series_group(result: dict, key_records: list[dict], model: ModelInfo, output: SeriesOutput):
    """The series' measurement group: class, probabilities, refer and reasons, the key slices as its sources."""
    sources = [hd.sr.SourceImageForMeasurementGroup(r["sop_class_uid"], r["sop_instance_uid"],
                                                    [r["frame"]] if r["frame"] else None) for r in key_records]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=output.uid("SR", "group"), identifier="series"),
        finding_type=class_code(result["predicted_class"]),
        algorithm_id=hd.sr.AlgorithmIdentification(model.name, str(model.version)),
        measurements=[hd.sr.Measurement(name=probability_code(n), value=float(p), unit=codes.UCUM.NoUnits)
                      for n, p in result["probabilities"].items()],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(REFER, YES if result["refer"] else NO)],
        source_images=sources)
    container = group[0]
    container.ContentSequence.extend(_text(REFER_REASON, reason) for reason in result["reasons"])
    container.ContentSequence.append(_text(NOTE, f"{DISCLAIMER}; a series of {result['n_slices']} slices; rule: "
                                                 f"{result['rule']}; its source images are the key slices"))
    return group


def make_series_report(headers: list[Dataset], result: dict, key_records: list[dict], model: ModelInfo,
                       output: SeriesOutput, previous: Dataset | None = None) -> Dataset:
    """The Comprehensive SR of one series (`result`: series.rule.SeriesResult.as_dict(); `key_records`: the key
    slices' records, each with its `refer` flag; `headers`: their instances), in the series' study; `previous`:
    the SR it amends."""
    groups = [series_group(result, key_records, model, output), *(frame_group(r, model) for r in key_records)]
    sr = hd.sr.ComprehensiveSR(
        evidence=[study_header(h) for h in headers], content=measurement_report(groups, model),
        series_instance_uid=output.uid("SR", "series"), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=output.uid("SR"), instance_number=output.revision + 1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        previous_versions=[previous] if previous is not None else None)
    sr.SeriesDescription = series_description("SR", model)
    return sr


def series_description(kind: str, model: ModelInfo) -> str:
    return f"AI {kind}, not for primary diagnosis: {model.name} v{model.version}"[:64]  # LO


def _texts(group, code) -> list[str]:
    return [str(i.TextValue) for i in hd.sr.utils.find_content_items(group[0], name=code, recursive=True)]


def _first_text(group, code) -> str | None:
    found = _texts(group, code)
    return found[0] if found else None


def read_report(sr: Dataset) -> list[dict]:
    """The frames of an SR made by make_report: source SOP instance UID, frame, class, probabilities, refer,
    model name and version."""
    doc = hd.sr.ComprehensiveSR.from_dataset(sr, copy=True)
    return [_read_group(group) for group in doc.content.get_image_measurement_groups()]


def _read_group(group) -> dict:
    sources = [(s.referenced_sop_instance_uid, int(s.referenced_frame_numbers[0]) if s.referenced_frame_numbers
                else None) for s in group.source_images]
    found = group.get_qualitative_evaluations()
    evaluations = {e.name.value: e.value for e in found}
    return {
        "sop_instance_uid": sources[0][0], "frame": sources[0][1], "sources": sources,
        "predicted_class": group.finding_type.meaning,
        "refer": evaluations[REFER.value].value == YES.value,
        "out_of_distribution": None if OOD.value not in evaluations else evaluations[OOD.value].value == YES.value,
        "prediction_set": [e.value.value for e in found if e.name.value == IN_SET.value] or None,
        "reasons": _texts(group, REFER_REASON),
        "probabilities": {m.name.value.removeprefix("p:"): float(m.value) for m in group.get_measurements()},
        "model": _first_text(group, codes.DCM.AlgorithmName),
        "version": _first_text(group, codes.DCM.AlgorithmVersion),
    }


def read_series_report(sr: Dataset) -> dict:
    """A series SR made by make_series_report: the series' reading ("key_slices": [(SOP Instance UID, frame)],
    class, probabilities, refer, reasons, model, version), its key slices' own readings ("slices") and the SOP
    Instance UIDs of the SRs it amends ("amends")."""
    groups = hd.sr.ComprehensiveSR.from_dataset(sr, copy=True).content.get_image_measurement_groups()
    series = _read_group(groups[0])
    series["key_slices"] = series.pop("sources")
    amends = [ref.ReferencedSOPInstanceUID for study in sr.get("PredecessorDocumentsSequence", [])
              for series_ref in study.ReferencedSeriesSequence for ref in series_ref.ReferencedSOPSequence]
    return {**series, "slices": [_read_group(g) for g in groups[1:]], "amends": amends}

"""DICOM results filed in the original study: one Comprehensive SR per study, and on request a Grad-CAM Secondary
Capture per image, both with new UIDs in new series of the study the images came from.

    dicom_headers(files)                          each file's DICOM header (no pixels), or why it gets no DICOM output
    image_findings(result, run)                   per predicted file: fracture suspected / not suspected / not assessed
    build_study_report(headers, findings, ...)    one study's highdicom ComprehensiveSR
    write_dicom_results(result, run, out, ...)    `bonefrac predict --dicom-out`: OUT/<study>/SR.dcm (+ overlay-<k>.dcm)
    read_study_report(ds)                         an SR written here, back as plain values (tests, `bonefrac pacs`)
    report_series_description(run)                the SR series' description: names the model version, so that a
                                                  study already answered by it can be found on a PACS

Why a study, not an image: a radiograph examination is read as a study (frontal and lateral views), and PACS users'
most common complaint about AI results is a result filed in a new study. So the SR copies the patient, study
(StudyInstanceUID, accession) and references every source instance from the images' own headers (highdicom's
`evidence`), and only the series and instance are new.

The SR's content tree (codes from DCM, LOINC and UCUM where one fits; the rest in the private scheme 99BONEFRAC):

    CONTAINER  Diagnostic Imaging Report (LN 18748-4)
      TEXT     Comment (DCM 121106): bonefrac.DISCLAIMER, the research-only statement
      TEXT     Algorithm Name (DCM 111001), Algorithm Version (DCM 111003): run name and architecture; bonefrac
               version and the weights' sha256
      TEXT     Operating point; NUM Decision threshold (on the calibrated p(positive), chosen on val)
      TEXT     Study aggregation rule (bonefrac.study: mean or max over the assessed images)
      CODE     Impression (DCM 121073): the study's finding; NUM Probability (DCM 122157): the study's p
      CONTAINER Image finding, one per source image:
        IMAGE  Source image (DCM 121324): the SOP instance
        CODE   Finding (DCM 121071): fracture suspected / fracture not suspected / not assessed
        NUM    Probability (DCM 122157): calibrated p(positive), when the image could be read
        TEXT   Reason not assessed: out of distribution (the OOD guard's reason) or unreadable (the read error)

A study's finding aggregates only the images that were assessed (readable and accepted by the OOD guard): a
photograph of a form filed in the study must not move its answer. A study with none is 'not assessed'. The study
probability follows bonefrac.study (`aggregate_studies`), the decision the run's image threshold applied to it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from bonefrac import DISCLAIMER, __version__
from bonefrac.choices import STUDY_AGGREGATE
from bonefrac.data.io import read_dicom_header, read_image
from bonefrac.errors import BonefracError, ImageReadError
from bonefrac.predict import PredictionResult, PredictionRow
from bonefrac.run import Run
from bonefrac.study import aggregate_studies, dicom_study_name, study_decisions

SCHEME = "99BONEFRAC"  # private coding scheme for the concepts DICOM's own resources do not name
# Code values stay within 16 characters (DICOM SH), so every reader finds them in CodeValue.
MANUFACTURER = "bonefrac"
SR_SERIES_NUMBER = 9701  # high, as result series usually are, out of the way of the modality's own numbering
OVERLAY_SERIES_NUMBER = 9702
SR_FILE = "SR.dcm"


def _code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


SUSPECTED = _code("suspected", "Fracture suspected")
NOT_SUSPECTED = _code("not-suspected", "Fracture not suspected")
NOT_ASSESSED = _code("not-assessed", "Not assessed")
FINDINGS = {code.value: code for code in (SUSPECTED, NOT_SUSPECTED, NOT_ASSESSED)}
IMAGE_FINDING = _code("image-finding", "Image finding")
OPERATING_POINT = _code("operating-point", "Operating point")
THRESHOLD = _code("threshold", "Decision threshold")
AGGREGATE = _code("study-aggregate", "Study aggregation rule")
REASON = _code("reason", "Reason not assessed")
UNITLESS = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")


# --- which files get DICOM output ----------------------------------------------------------------------------------


@dataclass
class DicomHeaders:
    """The header of each predicted file that can be filed back into its study, and why the others cannot."""

    headers: dict[str, Dataset]  # file -> header (no pixels)
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it gets no DICOM output


def dicom_header(source: str | Path | bytes) -> tuple[Dataset | None, str]:
    """(the header, "") of a DICOM file (or upload) that names the study and instance an SR must refer to; else
    (None, why it gets no DICOM output)."""
    try:
        header = read_dicom_header(source)
    except ImageReadError as err:
        return None, f"no DICOM header to file results under ({err.reason})"
    if header is None:
        return None, "not a DICOM file (results go into a DICOM study; this file has none)"
    try:
        missing = [key for key in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID") if not header.get(key)]
    except Exception as err:  # pydicom converts elements lazily; its message may quote header values
        return None, f"corrupt DICOM header ({type(err).__name__})"
    if missing:
        return None, f"DICOM without {', '.join(missing)}: no study to file results in"
    return header, ""


def dicom_headers(files: Sequence[str]) -> DicomHeaders:
    """Each file's DICOM header when it names the study and instance an SR must refer to; the reason otherwise."""
    found = DicomHeaders({})
    for file in files:
        header, reason = dicom_header(file)
        if header is None:
            found.skipped[file] = reason
        else:
            found.headers[file] = header
    return found


# --- findings ------------------------------------------------------------------------------------------------------


@dataclass
class ImageFinding:
    """One image's answer as the SR records it."""

    file: str
    finding: hd.sr.CodedConcept  # SUSPECTED, NOT_SUSPECTED or NOT_ASSESSED
    p_positive: float | None  # calibrated; None when unreadable
    reason: str = ""  # why it was not assessed

    @property
    def assessed(self) -> bool:
        return self.finding.value != NOT_ASSESSED.value


def image_finding(row: PredictionRow, positive_label: str) -> ImageFinding:
    """A prediction row as a finding: unreadable or out of distribution -> not assessed, else the decision."""
    if row.status != "ok":
        return ImageFinding(row.file, NOT_ASSESSED, None, f"unreadable: {row.error}")
    p = row.probabilities[positive_label]
    if not row.assessed:
        return ImageFinding(row.file, NOT_ASSESSED, p, f"out of distribution: {row.ood_reason}")
    return ImageFinding(row.file, SUSPECTED if row.prediction == positive_label else NOT_SUSPECTED, p)


def image_findings(result: PredictionResult, run: Run) -> list[ImageFinding]:
    """Every row of a binary run's predictions as an ImageFinding (an N-class run has no 'fracture suspected')."""
    if not run.binary:
        raise BonefracError("DICOM results need a binary run (fracture suspected or not)")
    return [image_finding(row, run.positive_label) for row in result.rows]


@dataclass
class StudyFinding:
    """A study's answer: the aggregated p over its assessed images and the decision at the image threshold."""

    finding: hd.sr.CodedConcept
    p_positive: float | None
    n_assessed: int
    rule: str


def study_finding(findings: Sequence[ImageFinding], run: Run, rule: str = STUDY_AGGREGATE) -> StudyFinding:
    """bonefrac.study's aggregation over the study's assessed images; not assessed when none was."""
    assessed = [finding for finding in findings if finding.assessed]
    if not assessed:
        return StudyFinding(NOT_ASSESSED, None, 0, rule)
    studies = aggregate_studies(["study"] * len(assessed), np.array([f.p_positive for f in assessed]), rule=rule)
    decision = study_decisions(studies, run.positive, run.calibration.threshold)[0]
    return StudyFinding(SUSPECTED if decision == run.positive else NOT_SUSPECTED, float(studies.p[0]),
                        len(assessed), rule)


# --- the SR --------------------------------------------------------------------------------------------------------


def model_name(run: Run) -> str:
    """Algorithm Name: the run directory's name and the architecture."""
    return f"bonefrac {Path(run.path).resolve().name} ({run.config.model.name})"


def model_version(run: Run) -> str:
    """Algorithm Version: the bonefrac release and the first 12 hex digits of the weights' sha256."""
    return f"bonefrac {__version__}; weights sha256 {run.weights_sha256()[:12]}"


def report_series_description(run: Run) -> str:
    """The SR series' description (at most 64 characters, DICOM LO): names the weights, so `bonefrac pacs` can
    tell a study this model has already answered."""
    return f"bonefrac fracture SR {run.weights_sha256()[:12]}"


def _text(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _num(name: hd.sr.CodedConcept, value: float) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=round(float(value), 6), unit=UNITLESS,
                                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _finding(name: hd.sr.CodedConcept, value: hd.sr.CodedConcept) -> hd.sr.CodeContentItem:
    return hd.sr.CodeContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _image_container(header: Dataset, finding: ImageFinding) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=IMAGE_FINDING,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    items = [
        hd.sr.ImageContentItem(name=codes.DCM.SourceImage, referenced_sop_class_uid=header.SOPClassUID,
                               referenced_sop_instance_uid=header.SOPInstanceUID,
                               relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        _finding(codes.DCM.Finding, finding.finding),
    ]
    if finding.p_positive is not None:
        items.append(_num(codes.DCM.Probability, finding.p_positive))
    if finding.reason:
        items.append(_text(REASON, finding.reason))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_study_report(
    headers: Sequence[Dataset], findings: Sequence[ImageFinding], run: Run, *, rule: str = STUDY_AGGREGATE,
    series_instance_uid: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """One study's SR: the images' headers (one study) and their findings, in the same order."""
    if len({str(header.StudyInstanceUID) for header in headers}) != 1:
        raise ValueError("build_study_report: the images must belong to one study")
    study = study_finding(findings, run, rule)
    threshold = run.calibration.threshold
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    items = [
        _text(codes.DCM.Comment, DISCLAIMER),
        _text(codes.DCM.AlgorithmName, model_name(run)),
        _text(codes.DCM.AlgorithmVersion, model_version(run)),
        _text(OPERATING_POINT, run.calibration.operating_point if run.calibration.fitted else "not calibrated"),
        _num(THRESHOLD, 0.5 if threshold is None else threshold),
        _text(AGGREGATE, f"{rule} of the assessed images' p({run.positive_label})"),
        _finding(codes.DCM.Impression, study.finding),
    ]
    if study.p_positive is not None:
        items.append(_num(codes.DCM.Probability, study.p_positive))
    items += [_image_container(header, finding) for header, finding in zip(headers, findings, strict=True)]
    root.ContentSequence = hd.sr.ContentSequence(items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom warns about attributes it fills in; nothing a user can act on
        report = hd.sr.ComprehensiveSR(
            evidence=list(headers),
            content=root,
            series_instance_uid=series_instance_uid or generate_uid(),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description=report_series_description(run),
        )
    # A private coding scheme is declared in the SOP Common module (PS3.3 C.12.1.1.5), so readers know whose it is.
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "bonefrac private codes"
    scheme.CodingSchemeResponsibleOrganization = "bonefrac (research software; see its docs/PACS.md)"
    report.CodingSchemeIdentificationSequence = [scheme]
    return report


def gradcam_overlays(predictor) -> Callable[[np.ndarray], np.ndarray]:
    """pixels (read_image's) -> the uint8 RGB Grad-CAM overlay of the predictor's decision: what --dicom-overlay
    files as a Secondary Capture (`bonefrac predict`, `bonefrac pacs run`)."""
    from bonefrac.explain import Explainer, overlay_rgb

    explainer = Explainer(predictor)
    return lambda pixels: overlay_rgb(pixels, explainer.explain(pixels).heatmap)


def overlay_image(header: Dataset, overlay: np.ndarray, *, series_instance_uid: str,
                  instance_number: int) -> hd.sc.SCImage:
    """A Grad-CAM overlay (uint8 RGB, the image's size) as a Secondary Capture in the source image's study."""
    orientation = _patient_orientation(header)
    laterality = str(header.get("Laterality") or header.get("ImageLaterality") or "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header, pixel_array=overlay, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=orientation or ("L", "F"),
            laterality=laterality if laterality in ("L", "R") else None,
            series_instance_uid=series_instance_uid, series_number=OVERLAY_SERIES_NUMBER,
            sop_instance_uid=generate_uid(), instance_number=instance_number, manufacturer=MANUFACTURER,
        )
    if orientation is None:
        # highdicom wants an orientation for a patient image; PatientOrientation is type 2 (may be empty), and
        # empty is the truth when the source image does not say it: never invent one.
        image.PatientOrientation = None
    if "Laterality" not in image:
        image.Laterality = None  # type 2C in General Series: present and empty when the source does not say
    image.SeriesDescription = "bonefrac Grad-CAM overlay (research only)"
    image.ImageComments = "A heatmap shows what moved the model's score, not where a fracture is. " + DISCLAIMER
    image.BurnedInAnnotation = "NO"
    return image


def _patient_orientation(header: Dataset) -> tuple[str, str] | None:
    """The source image's PatientOrientation (row, column directions) when it gives two that highdicom accepts."""
    values = list(header.get("PatientOrientation") or [])
    allowed = {value.value for value in hd.PatientOrientationValuesBiped}
    if len(values) == 2 and all(str(value) in allowed for value in values):
        return str(values[0]), str(values[1])
    return None


# --- writing -------------------------------------------------------------------------------------------------------


@dataclass
class DicomResults:
    """What write_dicom_results wrote, per study (named by dicom_study_name), and the files that got nothing."""

    reports: dict[str, Path]  # study name -> SR file
    overlays: dict[str, list[Path]]
    skipped: dict[str, str]  # file -> why it gets no DICOM output

    def summary(self) -> str:
        line = f"DICOM results: {len(self.reports)} structured reports"
        if self.overlays:
            line += f", {sum(map(len, self.overlays.values()))} Grad-CAM overlays"
        if self.skipped:
            line += f"; {len(self.skipped)} files without DICOM output"
        return line


def write_dicom_results(
    result: PredictionResult, run: Run, out: str | Path, *, rule: str = STUDY_AGGREGATE,
    overlay: Callable[[np.ndarray], np.ndarray] | None = None,
) -> DicomResults:
    """OUT/<study>/SR.dcm for every DICOM study among the predicted files, each file re-read to check it.

    overlay: pixels (read_image's) -> uint8 RGB overlay of the same size; when given, every assessed image also
    gets OUT/<study>/overlay-<k>.dcm, a Secondary Capture in a new series of its study.
    """
    findings = {finding.file: finding for finding in image_findings(result, run)}
    found = dicom_headers(list(findings))
    by_study: dict[str, list[str]] = {}
    for file, header in found.headers.items():
        by_study.setdefault(str(header.StudyInstanceUID), []).append(file)
    out = Path(out)
    written = DicomResults({}, {}, found.skipped)
    for uid, files in by_study.items():
        folder = out / dicom_study_name(uid)
        folder.mkdir(parents=True, exist_ok=True)
        headers = [found.headers[file] for file in files]
        report = build_study_report(headers, [findings[file] for file in files], run, rule=rule)
        written.reports[dicom_study_name(uid)] = _save(report, folder / SR_FILE)
        if overlay is not None:
            series = generate_uid()
            paths = []
            for k, file in enumerate((f for f in files if findings[f].assessed), start=1):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pixels, _ = read_image(file, allow_truncated=run.allow_truncated())
                image = overlay_image(found.headers[file], overlay(pixels), series_instance_uid=series,
                                      instance_number=k)
                paths.append(_save(image, folder / f"overlay-{k}.dcm"))
            written.overlays[dicom_study_name(uid)] = paths
    return written


def report_bytes(report: hd.sr.ComprehensiveSR) -> bytes:
    """An SR as the bytes of a DICOM file (what the API answers with), checked by reading them back."""
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    hd.sr.srread(io.BytesIO(data))
    return data


def _save(dataset: Dataset, path: Path) -> Path:
    """Write a DICOM file and read it back: what we hand to a PACS must parse."""
    dataset.save_as(path, enforce_file_format=True)
    hd.sr.srread(path) if dataset.Modality == "SR" else hd.imread(path)
    return path


# --- reading back --------------------------------------------------------------------------------------------------


def read_study_report(dataset: Dataset) -> dict:
    """An SR written by build_study_report as plain values: algorithm, threshold, study finding and p, and per
    image {sop_instance_uid, finding, p, reason}. Findings are the code values (SUSPECTED.value, ...)."""
    record: dict = {"images": []}
    for item in dataset.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "CONTAINER":
            record["images"].append(_read_image_container(item))
        else:
            record[name] = _value(item)
    return record


def _read_image_container(container: Dataset) -> dict:
    image: dict = {"p": None, "reason": ""}
    for item in container.ContentSequence:
        if item.ValueType == "IMAGE":
            image["sop_instance_uid"] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif item.ValueType == "CODE":
            image["finding"] = _value(item)
        elif item.ValueType == "NUM":
            image["p"] = _value(item)
        elif item.ValueType == "TEXT":
            image["reason"] = _value(item)
    return image


def _value(item: Dataset) -> str | float:
    if item.ValueType == "TEXT":
        return str(item.TextValue)
    if item.ValueType == "NUM":
        return float(item.MeasuredValueSequence[0].NumericValue)
    if item.ValueType == "CODE":
        return hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0]).value
    raise ValueError(f"unexpected SR value type {item.ValueType}")

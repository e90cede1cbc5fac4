"""A PACS round trip over DICOMweb: find studies, fetch their images, predict, store the SR back into each study.

    read_credentials(file, environ)     basic auth ('user:password') or a bearer token: a file, or BONEFRAC_PACS_AUTH
    connect(url, credentials)           a DICOMweb client for the server's root (Orthanc: URL/dicom-web), once it
                                        has answered a first request
    study_uids(client, ...)             the studies to look at: one, those since a date, or all
    answer_study(client, predictor, uid, ...)   one study end to end -> StudyOutcome (stored, skipped or failed)
    run_pacs(client, predictor, ...)    every study once (`bonefrac pacs run`); watch_pacs polls (--watch)

Why DICOMweb (dicomweb-client) and not DIMSE (pynetdicom C-FIND/C-MOVE/C-STORE): it is plain HTTP, so it goes
through proxies and TLS and takes basic auth or a token as any web service does; C-MOVE needs the PACS to know and
reach back to our own DICOM node (an AE title and an open port), which a research laptop rarely has.

Idempotent: before fetching anything, a study's series are queried; one whose description is this model's
(`dicom_sr.report_series_description`: the weights' sha256) means the study has been answered and it is skipped.
The SR is one instance sent in one STOW-RS request after everything else has worked, so a study is never
half-written: a study that fails (a server error, an image that cannot be fetched) has nothing stored and is tried
again next time. Only image instances are fetched: SRs, key objects and presentation states of a study, and what
bonefrac itself wrote, are not images to judge.

What is printed names a study by `study.dicom_study_name` (a digest of its UID), never by a header value, and
never shows the credentials.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pydicom
import requests
from pydicom.dataset import Dataset

from bonefrac.choices import STUDY_AGGREGATE
from bonefrac.dicom_sr import (
    MANUFACTURER,
    NOT_ASSESSED,
    SUSPECTED,
    read_study_report,
    report_series_description,
    write_dicom_results,
)
from bonefrac.errors import BonefracError
from bonefrac.predict import Predictor
from bonefrac.study import dicom_study_name

AUTH_ENV = "BONEFRAC_PACS_AUTH"  # 'user:password' (basic auth) or 'Bearer <token>'
DICOMWEB_ROOT = "/dicom-web"  # Orthanc's DicomWeb plugin default
NOT_IMAGES = frozenset({"SR", "KO", "PR", "SEG", "DOC", "REG", "RWV"})  # modalities of series with nothing to judge

# Tags of QIDO-RS JSON answers (DICOM PS3.18 F.2): keyword -> tag in the hex form the JSON uses.
_STUDY_UID, _SERIES_UID, _MODALITY, _SERIES_DESCRIPTION = "0020000D", "0020000E", "00080060", "0008103E"


class PacsError(BonefracError):
    """The PACS could not be reached, refused us, or answered what we did not expect."""


@dataclass(frozen=True)
class Credentials:
    """Basic auth (username, password) or a bearer token; repr never shows a secret."""

    username: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:
        return "Credentials(token)" if self.token else "Credentials(basic)"


def read_credentials(file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Credentials | None:
    """From `file` when given, else the environment variable BONEFRAC_PACS_AUTH; None when neither has any.

    The value is 'user:password' for basic auth or 'Bearer <token>'. Never from the command line: a command line is
    visible to every user of the machine (ps) and lands in shell histories.
    """
    if file is not None:
        try:
            value = Path(file).read_text().strip()
        except OSError as err:
            raise PacsError(f"credentials file {file}: {err.strerror or type(err).__name__}") from None
        where = f"credentials file {file}"
    else:
        value = (os.environ if environ is None else environ).get(AUTH_ENV, "").strip()
        where = AUTH_ENV
    if not value:
        return None
    if value.lower().startswith("bearer "):
        return Credentials(token=value[7:].strip())
    username, colon, password = value.partition(":")
    if not colon or not username:
        raise PacsError(f"{where}: expected 'user:password' or 'Bearer <token>'")
    return Credentials(username=username, password=password)


def shown_url(url: str) -> str:
    """The URL without any user:password@ part, for messages."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def connect(url: str, credentials: Credentials | None = None, *, root: str = DICOMWEB_ROOT, timeout: float = 60):
    """A DICOMweb client for URL + root (QIDO-RS, WADO-RS and STOW-RS under it), authenticated as given; PacsError
    at once when the server is down or refuses the credentials."""
    from dicomweb_client.api import DICOMwebClient

    # dicomweb-client logs every request at INFO (URLs with study UIDs); ours say what happened, once.
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    if not urlsplit(url).scheme or not urlsplit(url).hostname:
        raise PacsError(f"--url {url!r}: expected http(s)://host[:port]")
    session = requests.Session()
    if credentials is not None and credentials.token:
        session.headers["Authorization"] = f"Bearer {credentials.token}"
    elif credentials is not None:
        session.auth = (credentials.username, credentials.password)
    base = url.rstrip("/") + root
    # One plain request first: dicomweb-client retries a refused connection 5 times over 30 s (exponential back-off),
    # right for a server that is busy for a moment, too slow to say that the server is not there at all.
    answer = _calling("a first request", base, lambda: session.get(f"{base}/studies", params={"limit": 1},
                                                                    timeout=min(timeout, 10)))
    _calling("a first request", base, answer.raise_for_status)
    return DICOMwebClient(base, session=session, timeout=timeout)


def _calling(what: str, url: str, call: Callable):
    """Run one DICOMweb request; a connection failure or an HTTP error becomes one readable PacsError."""
    try:
        return call()
    except requests.exceptions.ConnectionError:
        raise PacsError(f"cannot reach the PACS at {shown_url(url)} ({what}): is the server running, and is the "
                        "URL right?") from None
    except requests.exceptions.Timeout:
        raise PacsError(f"the PACS at {shown_url(url)} did not answer in time ({what})") from None
    except requests.exceptions.HTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = " (the credentials were refused: see docs/PACS.md)" if status in (401, 403) else ""
        raise PacsError(f"the PACS at {shown_url(url)} answered HTTP {status} to {what}{hint}") from None


def _value(record: dict, tag: str) -> str:
    values = record.get(tag, {}).get("Value") or [""]
    return str(values[0])


def study_uids(client, *, study: str | None = None, since: str | None = None) -> list[str]:
    """The StudyInstanceUIDs to look at: `study` alone (checked to exist), those with StudyDate >= since
    (YYYYMMDD), or every study on the server."""
    filters = {"StudyInstanceUID": study} if study else {"StudyDate": f"{since}-"} if since else {}
    found = _calling("a study search", client.base_url,
                     lambda: client.search_for_studies(search_filters=filters, get_remaining=True))
    uids = [_value(record, _STUDY_UID) for record in found]
    if study and study not in uids:
        raise PacsError("--study: no such study on the server")
    return [uid for uid in uids if uid]


@dataclass
class StudyOutcome:
    """What happened to one study: 'stored' (an SR written), 'skipped' (already answered) or 'failed' (why)."""

    study: str  # dicom_study_name: never the UID itself
    status: str
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        timing = f" in {self.seconds:.1f} s" if self.status == "stored" else ""
        return f"{self.study}: {self.status}{timing}" + (f" ({self.detail})" if self.detail else "")


def answer_study(client, predictor: Predictor, uid: str, *, rule: str = STUDY_AGGREGATE,
                 overlay: Callable[[np.ndarray], np.ndarray] | None = None) -> StudyOutcome:
    """One study end to end: skip it when this model has answered it, else fetch its image series, predict, and
    store one SR in it (STOW-RS), with overlay (dicom_sr.gradcam_overlays) a Grad-CAM Secondary Capture of each
    assessed image in the same request. A PacsError for this study becomes a 'failed' outcome; nothing is stored
    then."""
    start = time.perf_counter()
    name = dicom_study_name(uid)
    url = client.base_url
    description = report_series_description(predictor.run)
    try:
        series = _calling("a series search", url, lambda: client.search_for_series(study_instance_uid=uid))
        if any(_value(s, _SERIES_DESCRIPTION) == description for s in series):
            return StudyOutcome(name, "skipped", "already answered by this model version",
                                time.perf_counter() - start)
        images = [_value(s, _SERIES_UID) for s in series if _value(s, _MODALITY) not in NOT_IMAGES]
        with tempfile.TemporaryDirectory(prefix="bonefrac-pacs-") as folder:
            files = _fetch_images(client, uid, images, Path(folder) / "in")
            if not files:
                return StudyOutcome(name, "failed", "no image instances in the study")
            result = predictor.predict_paths(files)
            written = write_dicom_results(result, predictor.run, Path(folder) / "out", rule=rule, overlay=overlay)
            report = written.reports.get(name)
            if report is None:
                return StudyOutcome(name, "failed", "no image could be filed (see bonefrac predict --dicom-out)")
            sr = pydicom.dcmread(report)
            overlays = [pydicom.dcmread(path) for path in written.overlays.get(name, [])]
            _calling("storing the SR (STOW-RS)", url,
                     lambda: client.store_instances([sr, *overlays], study_instance_uid=uid))
    except PacsError as err:
        return StudyOutcome(name, "failed", str(err), time.perf_counter() - start)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        # A header highdicom cannot build an SR from must not stop the other studies (nor --watch). Only the
        # exception's type is shown: its message may quote header values.
        return StudyOutcome(name, "failed", f"no SR could be built ({type(err).__name__})", time.perf_counter() - start)
    return StudyOutcome(name, "stored", _finding_words(sr, len(files)), time.perf_counter() - start)


def _fetch_images(client, uid: str, series: Sequence[str], folder: Path) -> list[Path]:
    """WADO-RS: every instance of these series, written as folder/<k>.dcm; what bonefrac wrote itself is left out."""
    folder.mkdir(parents=True)
    files = []
    for series_uid in series:
        instances: list[Dataset] = _calling("fetching a series (WADO-RS)", client.base_url,
                                            lambda s=series_uid: client.retrieve_series(uid, s))
        for instance in instances:
            if str(instance.get("Manufacturer", "")) == MANUFACTURER:
                continue  # an overlay bonefrac filed earlier: not a radiograph to judge
            path = folder / f"{len(files) + 1}.dcm"
            instance.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def _finding_words(sr: Dataset, n_images: int) -> str:
    """'fracture suspected, p 0.81, 2 images' from the SR's Impression and Probability (no header value)."""
    report = read_study_report(sr)
    finding = report.get("Impression")
    words = {SUSPECTED.value: "fracture suspected", NOT_ASSESSED.value: "not assessed"}.get(finding,
                                                                                          "fracture not suspected")
    p = report.get("Probability")
    return words + (f", p {p:.2f}" if p is not None else "") + f", {n_images} images"


def run_pacs(client, predictor: Predictor, *, study: str | None = None, since: str | None = None,
             rule: str = STUDY_AGGREGATE, overlay: Callable[[np.ndarray], np.ndarray] | None = None,
             say: Callable[[str], None] = print) -> list[StudyOutcome]:
    """Every study to look at, once (`bonefrac pacs run`): one line per study on `say`."""
    outcomes = []
    for uid in study_uids(client, study=study, since=since):
        outcome = answer_study(client, predictor, uid, rule=rule, overlay=overlay)
        say(outcome.line())
        outcomes.append(outcome)
    return outcomes


def watch_pacs(client, predictor: Predictor, *, interval: float, since: str | None = None,
               rule: str = STUDY_AGGREGATE, overlay: Callable[[np.ndarray], np.ndarray] | None = None,
               say: Callable[[str], None] = print,
               sleep: Callable[[float], None] = time.sleep) -> None:
    """`bonefrac pacs run --watch`: run_pacs every `interval` seconds until Ctrl+C (KeyboardInterrupt, left to the
    caller). A server that goes down between polls is said once per poll, and the next poll tries again."""
    while True:
        try:
            outcomes = run_pacs(client, predictor, since=since, rule=rule, overlay=overlay, say=say)
            stored = sum(outcome.status == "stored" for outcome in outcomes)
            say(f"{len(outcomes)} studies, {stored} answered now; next look in {interval:g} s (Ctrl+C stops)")
        except PacsError as err:
            say(f"{err}; trying again in {interval:g} s")
        sleep(interval)

"""An archive (PACS) seen by ``infer-pacs``: find image series, retrieve them with their study's reports, store
segmentations back, and recognise the segmentations stored before.

:class:`DicomWebArchive` speaks DICOMweb (QIDO-RS, WADO-RS, STOW-RS) through ``dicomweb-client``; requests go
through one ``requests`` session that carries the credentials, verifies TLS and retries with backoff where that is
safe. :class:`DimseArchive` speaks DIMSE (C-FIND, C-GET, C-STORE) through ``pynetdicom``, for archives without
DICOMweb. Every failure is a :class:`PacsError` that names the request (what, where, the status).

Credentials never come from the command line (it shows in ``ps`` and shell histories): :meth:`Credentials.from_env`
reads a bearer token or a user and password from environment variables, each value either in the variable or in a
file it names.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from scripts.io import atomic_write
from scripts.outputs import SEG_MANUFACTURER

__all__ = ["Credentials", "DicomWebArchive", "DimseArchive", "PacsError", "SeriesRef", "parse_dimse_address",
           "parse_query"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# series of these modalities hold no image to segment (segmentations, reports, presentation states, key objects ...)
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "DOC", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG",
                                  "FID", "AU", "ECG"})
# DICOM tags as DICOMweb's JSON keys
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_MODALITY, _MANUFACTURER, _REFERENCED_SERIES = "00080060", "00080070", "00081115"
_PAGE = 100  # QIDO-RS results per request


class PacsError(RuntimeError):
    """A request to the archive failed; the message names it (method, URL, status) and what was being done."""


@dataclass(frozen=True)
class SeriesRef:
    """One series of the archive."""

    study_uid: str
    series_uid: str
    modality: str = ""


@dataclass(frozen=True)
class Credentials:
    """A bearer token, or a user and password (HTTP basic auth), or nothing."""

    token: str | None = None
    user: str | None = None
    password: str | None = None

    @classmethod
    def from_env(cls, prefix: str = "PACS", environ: Mapping[str, str] | None = None) -> Credentials:
        """``<prefix>_TOKEN``, or ``<prefix>_USER`` with ``<prefix>_PASSWORD``; each may instead be given as
        ``<prefix>_TOKEN_FILE`` / ``<prefix>_PASSWORD_FILE``, a file holding the value (trailing newline ignored).

        Raises:
            ValueError: a user without a password (or the reverse), both a token and a user, or an unreadable file;
                naming the variables.
        """
        env = os.environ if environ is None else environ

        def value(name: str) -> str | None:
            if env.get(f"{prefix}_{name}"):
                return env[f"{prefix}_{name}"]
            path = env.get(f"{prefix}_{name}_FILE")
            if not path:
                return None
            try:
                return Path(path).read_text().rstrip("\r\n")
            except OSError as e:
                raise ValueError(f"{prefix}_{name}_FILE={path}: cannot read it ({e.strerror})") from None

        token, user, password = value("TOKEN"), value("USER"), value("PASSWORD")
        if token and (user or password):
            raise ValueError(f"{prefix}_TOKEN and {prefix}_USER/{prefix}_PASSWORD are both set: give one of them")
        if bool(user) != bool(password):
            raise ValueError(f"{prefix}_USER and {prefix}_PASSWORD (or {prefix}_PASSWORD_FILE) go together")
        return cls(token=token, user=user, password=password)

    def describe(self) -> str:
        """What kind of credentials, never their value (for the log)."""
        return "bearer token" if self.token else f"user {self.user}" if self.user else "no credentials"


def parse_query(query: str | None) -> dict[str, str]:
    """A QIDO-RS study query as given on the command line, ``'ModalitiesInStudy=CR&StudyDate=20261130'``.

    Raises:
        ValueError: a part without ``=``.
    """
    if not query:
        return {}
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    bad = [part for part in query.split("&") if part and "=" not in part]
    if bad:
        raise ValueError(f"--query {query!r}: {bad[0]!r} is not KEY=VALUE")
    return dict(pairs)


def _value(item: Mapping[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


class DicomWebArchive:
    """A DICOMweb server: ``url`` is its root (Orthanc: ``http://host:8042/dicom-web``).

    Args:
        url: the DICOMweb root.
        credentials: sent with every request (basic auth or ``Authorization: Bearer``).
        verify: TLS verification: True (default, the system's CAs), a CA bundle path, or False (logged as a
            warning: the server's identity is not checked).
        retries: attempts after the first for connection errors and 429/5xx answers (dicomweb-client's retry).
        backoff: seconds before the first retry, doubling after each.
        timeout: seconds per request (connect and read).
    """

    def __init__(
        self,
        url: str,
        credentials: Credentials | None = None,
        verify: bool | str = True,
        retries: int = 3,
        backoff: float = 0.5,
        timeout: float = 60.0,
    ) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        credentials = credentials or Credentials()
        session = requests.Session()
        if credentials.token:
            session.headers["Authorization"] = f"Bearer {credentials.token}"
        elif credentials.user:
            session.auth = (credentials.user, credentials.password or "")
        session.verify = verify
        if verify is False:
            logger.warning("%s: TLS certificates are not verified (--insecure)", self.url)
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout)
        # dicomweb-client's own retry: a connection error, or 429/500/502/503/504, is tried again after
        # backoff·2^n seconds; for a store too, which is safe here: the SEG has a fixed SOP Instance UID, so a
        # repeated store replaces it rather than adding a copy
        self.client.set_http_retry_params(retry=retries > 0, max_attempts=retries + 1,
                                          wait_exponential_multiplier=int(backoff * 1000),
                                          retriable_error_codes=(429, 500, 502, 503, 504))
        logger.info("archive %s (DICOMweb, %s)", self.url, credentials.describe())

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` with the errors of requests (and of dicomweb-client's retry, once its attempts
        are spent) turned into a :class:`PacsError` naming the request and the status."""
        import requests
        from retrying import RetryError

        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as e:
            raise PacsError(f"{what}: {_described(e.response, self.url)}") from e
        except requests.RequestException as e:
            raise PacsError(f"{what}: {self.url}: {type(e).__name__}: {e}") from e
        except RetryError as e:  # the last attempt still answered a retriable status (or raised)
            last = e.last_attempt
            if last.has_exception:
                error = last.value[1]
                raise PacsError(f"{what}: {self.url}: {type(error).__name__}: {error}") from error
            raise PacsError(f"{what}: {_described(last.value, self.url)} "
                            f"(after {last.attempt_number} attempts)") from None

    def _search(self, what: str, fn: Callable[..., list], *args: Any, **kwargs: Any) -> list[dict]:
        """Every result of a QIDO-RS search, page by page. Not dicomweb-client's ``get_remaining``: it pages until
        an empty page, and a server that ignores ``offset`` for some filters (Orthanc 1.10 with
        ``ModalitiesInStudy``) returns the same page for ever; here a page that brings nothing new ends it."""
        results: list[dict] = []
        seen: set[str] = set()
        while True:
            page = self._call(what, fn, *args, offset=len(results), limit=_PAGE, **kwargs)
            new = [item for item in page if repr(sorted(item.items())) not in seen]
            seen.update(repr(sorted(item.items())) for item in new)
            results += new
            if len(page) < _PAGE or not new:
                return results

    def find_series(self, query: Mapping[str, str] | None = None) -> list[SeriesRef]:
        """The image series of the studies that match ``query`` (QIDO-RS study attributes), in study order;
        segmentations, reports and other non-image series are left out."""
        studies = self._search("QIDO-RS studies", self.client.search_for_studies, search_filters=dict(query or {}))
        found, seen = [], set()
        for study in studies:
            study_uid = _value(study, _STUDY_UID)
            if study_uid in seen:  # Orthanc lists a study twice when its instances name different patients
                continue
            seen.add(study_uid)
            series = self._search(f"QIDO-RS series of study {study_uid}", self.client.search_for_series, study_uid)
            refs = [SeriesRef(study_uid, _value(s, _SERIES_UID), _value(s, _MODALITY)) for s in series
                    if _value(s, _MODALITY).upper() not in NON_IMAGE_MODALITIES]
            found += [ref for ref in dict.fromkeys(refs) if ref not in found]
        return found

    def retrieve_series(self, ref: SeriesRef, folder: str | os.PathLike) -> list[Path]:
        """WADO-RS: the series' instances written to ``folder`` as ``<SOPInstanceUID>.dcm`` (each atomically)."""
        datasets = self._call(f"WADO-RS series {ref.series_uid}", self.client.retrieve_series, ref.study_uid,
                              ref.series_uid)
        return [_save(ds, Path(folder)) for ds in datasets]

    def retrieve_reports(self, study_uid: str, folder: str | os.PathLike) -> list[Path]:
        """WADO-RS: the study's structured reports (SR series) written to ``folder``; their TEXT content items
        become the report (``datalist pacs``)."""
        series = self._search(f"QIDO-RS SR series of study {study_uid}", self.client.search_for_series, study_uid,
                              search_filters={"Modality": "SR"})
        files = []
        for s in series:
            files += self.retrieve_series(SeriesRef(study_uid, _value(s, _SERIES_UID), "SR"), folder)
        return files

    def stored_segmentation(self, ref: SeriesRef) -> str | None:
        """The SOP Instance UID of a segmentation of ``ref`` that this bundle stored before (a SEG of the same
        study whose Manufacturer is this bundle's and whose ReferencedSeriesSequence names the series), or None."""
        segs = self._search(f"QIDO-RS SEG series of study {ref.study_uid}", self.client.search_for_series,
                            ref.study_uid, search_filters={"Modality": "SEG"})
        for s in segs:
            seg_series = _value(s, _SERIES_UID)
            instances = self._call(f"WADO-RS metadata of SEG series {seg_series}",
                                   self.client.retrieve_series_metadata, ref.study_uid, seg_series)
            for meta in instances:
                referenced = {_value(item, _SERIES_UID) for item in meta.get(_REFERENCED_SERIES, {}).get("Value", [])}
                if _value(meta, _MANUFACTURER) == SEG_MANUFACTURER and ref.series_uid in referenced:
                    return _value(meta, _SOP_UID)
        return None

    def store(self, path: str | os.PathLike) -> str:
        """STOW-RS: stores the DICOM file ``path`` into its study; returns its SOP Instance UID.

        Raises:
            PacsError: the request failed, or the server answered that it did not store the instance.
        """
        import pydicom

        ds = pydicom.dcmread(path)
        response = self._call(f"STOW-RS {Path(path).name}", self.client.store_instances, [ds],
                              study_instance_uid=str(ds.StudyInstanceUID))
        failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
        if failed:
            reason = getattr(failed[0], "FailureReason", "unknown")
            raise PacsError(f"STOW-RS {Path(path).name}: {self.url} refused instance {ds.SOPInstanceUID} "
                            f"(failure reason {reason})")
        return str(ds.SOPInstanceUID)


def _described(response: Any, url: str) -> str:
    """``METHOD URL: HTTP status reason`` of a ``requests`` response (``url`` when there is none)."""
    if response is None:
        return url
    return f"{response.request.method} {response.url}: HTTP {response.status_code} {response.reason}"


def _save(ds: Any, folder: Path) -> Path:
    """A retrieved instance as ``<folder>/<SOPInstanceUID>.dcm``, written atomically."""
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    atomic_write(path, lambda f: ds.save_as(f, enforce_file_format=True))
    return path


# what a C-GET may bring back (the SCU takes the storage SCP role for these): the image classes the bundle reads,
# the reports it reads and the segmentations it recognises. A named subset, not pynetdicom's StoragePresentationContexts:
# an association holds at most 128 presentation contexts, and the C-GET model's own context must fit beside them.
_GET_STORAGE_CLASSES = (
    "CTImageStorage", "EnhancedCTImageStorage", "MRImageStorage", "EnhancedMRImageStorage",
    "ComputedRadiographyImageStorage", "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing", "DigitalMammographyXRayImageStorageForPresentation",
    "SecondaryCaptureImageStorage", "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage", "BasicTextSRStorage", "EnhancedSRStorage",
    "ComprehensiveSRStorage", "SegmentationStorage",
)


def parse_dimse_address(address: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` → (AE title, host, port).

    Raises:
        ValueError: naming the address and the form expected.
    """
    aet, at, rest = address.rpartition("@")
    host, colon, port = rest.rpartition(":")
    if not (at and aet and colon and host and port.isdigit()):
        raise ValueError(f"--dimse {address!r}: expected AET@HOST:PORT, e.g. ORTHANC@pacs.example.org:4242")
    return aet, host, int(port)


class DimseArchive:
    """A DICOM archive over DIMSE (``pynetdicom``): C-FIND to query, C-GET to retrieve (the SCU takes the
    storage role in the same association, so the archive needs no route back to this machine, unlike C-MOVE),
    C-STORE to store. The archive must know this bundle's AE title (``calling_aet``) as a modality allowed to
    find, get and store.

    Args:
        called_aet, host, port: the archive's AE title and address.
        calling_aet: this bundle's AE title.
        retries: new attempts when the association cannot be set up (no answer, refused), with backoff.
        backoff: seconds before the first retry, doubling after each.
        timeout: seconds for the association and each DIMSE answer.
    """

    def __init__(
        self,
        called_aet: str,
        host: str,
        port: int,
        calling_aet: str = "LGSEG",
        retries: int = 3,
        backoff: float = 0.5,
        timeout: float = 60.0,
    ) -> None:
        self.called_aet, self.host, self.port, self.calling_aet = called_aet, host, int(port), calling_aet
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.url = f"dicom://{called_aet}@{host}:{port}"
        logger.info("archive %s (DIMSE, calling AE title %s)", self.url, calling_aet)

    @contextmanager
    def _association(self, what: str, contexts: list, ext_neg: list | None = None,
                     handlers: list | None = None) -> Iterator[Any]:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for context in contexts:
            ae.add_requested_context(context)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            assoc = ae.associate(self.host, self.port, ae_title=self.called_aet, ext_neg=ext_neg or [],
                                 evt_handlers=handlers or [])
            if assoc.is_established:
                break
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
            if assoc.is_rejected or attempt == self.retries:  # a rejection is the archive's answer: no retry
                raise PacsError(f"{what}: {self.url}: association {why} (is {self.calling_aet} a known modality "
                                "of the archive?)" if assoc.is_rejected else f"{what}: {self.url}: association {why}")
            logger.warning("%s: %s: association %s, retrying in %.1f s", what, self.url, why, delay)
            time.sleep(delay)
            delay *= 2
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _status(self, code: int | None) -> str:
        if code is None:  # the association ended without a status: how archives refuse an AE title they do not know
            return (f"got no answer (the archive ended the association: does it let AE title {self.calling_aet} "
                    "do this?)")
        return f"status 0x{code:04X}"

    def _find(self, what: str, level: str, keys: Mapping[str, str]) -> list[Any]:
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        query = Dataset()
        query.QueryRetrieveLevel = level
        for key, value in keys.items():
            setattr(query, key, value)
        found = []
        with self._association(what, [FIND]) as assoc:
            for status, identifier in assoc.send_c_find(query, FIND):
                code = getattr(status, "Status", None)
                if code in (0xFF00, 0xFF01):
                    found.append(identifier)
                elif code != 0x0000:
                    raise PacsError(f"{what}: {self.url}: C-FIND {self._status(code)}")
        return found

    def _get(self, what: str, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        from pydicom.dataset import Dataset
        from pynetdicom import build_role, evt, sop_class
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        storage = [getattr(sop_class, name) for name in _GET_STORAGE_CLASSES]
        files: list[Path] = []

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            files.append(_save(ds, folder))
            return 0x0000

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID, query.SeriesInstanceUID = study_uid, series_uid
        with self._association(what, [GET, *storage], [build_role(uid, scp_role=True) for uid in storage],
                               [(evt.EVT_C_STORE, on_store)]) as assoc:
            last = None
            for last, _ in assoc.send_c_get(query, GET):
                pass
        final = getattr(last, "Status", None)
        failed = int(getattr(last, "NumberOfFailedSuboperations", 0) or 0)
        if final not in (0x0000, 0xB000) or failed:
            raise PacsError(f"{what}: {self.url}: C-GET {self._status(final)}"
                            f"{f', {failed} instance(s) not sent' if failed else ''}")
        return files

    def find_series(self, query: Mapping[str, str] | None = None) -> list[SeriesRef]:
        """As :meth:`DicomWebArchive.find_series`, by C-FIND at study then series level."""
        studies = self._find("C-FIND studies", "STUDY", {"StudyInstanceUID": "", **dict(query or {})})
        found: list[SeriesRef] = []
        for study_uid in dict.fromkeys(str(s.StudyInstanceUID) for s in studies):
            series = self._find(f"C-FIND series of study {study_uid}", "SERIES",
                                {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "", "Modality": ""})
            found += [ref for ref in dict.fromkeys(
                SeriesRef(study_uid, str(s.SeriesInstanceUID), str(s.get("Modality", ""))) for s in series
                if str(s.get("Modality", "")).upper() not in NON_IMAGE_MODALITIES) if ref not in found]
        return found

    def retrieve_series(self, ref: SeriesRef, folder: str | os.PathLike) -> list[Path]:
        """C-GET: the series' instances written to ``folder`` as ``<SOPInstanceUID>.dcm`` (each atomically)."""
        return self._get(f"C-GET series {ref.series_uid}", ref.study_uid, ref.series_uid, Path(folder))

    def retrieve_reports(self, study_uid: str, folder: str | os.PathLike) -> list[Path]:
        """C-GET: the study's SR series written to ``folder``."""
        files: list[Path] = []
        for s in self._find(f"C-FIND SR series of study {study_uid}", "SERIES",
                            {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "", "Modality": "SR"}):
            files += self._get(f"C-GET SR series {s.SeriesInstanceUID}", study_uid, str(s.SeriesInstanceUID),
                               Path(folder))
        return files

    def stored_segmentation(self, ref: SeriesRef) -> str | None:
        """As :meth:`DicomWebArchive.stored_segmentation`; the SEG series of the study are fetched (C-GET) to
        read their references, which C-FIND does not return."""
        import tempfile

        import pydicom

        for s in self._find(f"C-FIND SEG series of study {ref.study_uid}", "SERIES",
                            {"StudyInstanceUID": ref.study_uid, "SeriesInstanceUID": "", "Modality": "SEG"}):
            with tempfile.TemporaryDirectory() as tmp:
                for path in self._get(f"C-GET SEG series {s.SeriesInstanceUID}", ref.study_uid,
                                      str(s.SeriesInstanceUID), Path(tmp)):
                    seg = pydicom.dcmread(path, stop_before_pixels=True)
                    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
                    if seg.get("Manufacturer") == SEG_MANUFACTURER and ref.series_uid in referenced:
                        return str(seg.SOPInstanceUID)
        return None

    def store(self, path: str | os.PathLike) -> str:
        """C-STORE of the DICOM file ``path``; returns its SOP Instance UID.

        Raises:
            PacsError: no association, or a status other than success.
        """
        import pydicom

        ds = pydicom.dcmread(path)
        with self._association(f"C-STORE {Path(path).name}", [ds.SOPClassUID]) as assoc:
            status = assoc.send_c_store(ds)
        code = getattr(status, "Status", None)
        if code != 0x0000:
            raise PacsError(f"C-STORE {Path(path).name}: {self.url}: C-STORE {self._status(code)}")
        return str(ds.SOPInstanceUID)

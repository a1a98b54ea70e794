"""An archive (PACS) seen by ``infer-pacs``: find image series, retrieve them with their study's reports, store
segmentations back, and recognise the segmentations stored before.

:class:`DicomWebArchive` speaks DICOMweb (QIDO-RS, WADO-RS, STOW-RS) through ``dicomweb-client``; requests go
through one ``requests`` session that carries the credentials, verifies TLS and retries with backoff where that is
safe. Every failure is a :class:`PacsError` that names the request (method, URL) and the HTTP status.

Credentials never come from the command line (it shows in ``ps`` and shell histories): :meth:`Credentials.from_env`
reads a bearer token or a user and password from environment variables, each value either in the variable or in a
file it names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from scripts.io import atomic_write
from scripts.outputs import SEG_MANUFACTURER

__all__ = ["Credentials", "DicomWebArchive", "PacsError", "SeriesRef", "parse_query"]

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
        retries: attempts after the first for connection errors, and for 429/5xx answers to reads (GET); a store
            (POST) is retried only when it never reached the server.
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
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

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
        retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=backoff,
                      status_forcelist=(429, 500, 502, 503, 504), allowed_methods=frozenset({"GET", "HEAD"}),
                      raise_on_status=False)
        for scheme in ("http://", "https://"):
            session.mount(scheme, HTTPAdapter(max_retries=retry))
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout)
        logger.info("archive %s (DICOMweb, %s)", self.url, credentials.describe())

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` with requests' errors turned into a :class:`PacsError` naming the request."""
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as e:
            response = e.response
            request = f"{response.request.method} {response.url}" if response is not None else self.url
            status = f"HTTP {response.status_code} {response.reason}" if response is not None else str(e)
            raise PacsError(f"{what}: {request}: {status}") from e
        except requests.RequestException as e:
            raise PacsError(f"{what}: {self.url}: {type(e).__name__}: {e}") from e

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


def _save(ds: Any, folder: Path) -> Path:
    """A retrieved instance as ``<folder>/<SOPInstanceUID>.dcm``, written atomically."""
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    atomic_write(path, lambda f: ds.save_as(f, enforce_file_format=True))
    return path

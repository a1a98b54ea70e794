"""``infer-pacs`` against a real archive: Orthanc with its DICOMweb plugin on 127.0.0.1 (Debian's ``orthanc`` and
``orthanc-dicomweb``, which the repository's test command installs where apt-get and root are available)."""

import csv
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from test_datalist import _sr
from test_dicom import make_ct_series

from bundle.__main__ import main
from bundle.pacs import Credentials, DicomWebArchive, DimseArchive, PacsError, parse_dimse_address, parse_query

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "alice", "s3cret"
CALLING_AET = "LGSEG"
REPORT = "Patchy opacity in the left lower zone; the right lung is clear."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A fresh Orthanc (HTTP with basic auth, DICOMweb at /dicom-web) for this module; yields its HTTP root."""
    if ORTHANC is None or not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Orthanc and its DICOMweb plugin are not installed (Debian: apt-get install orthanc "
                    "orthanc-dicomweb; the repository's test command does it where apt-get and root are there)")
    root = tmp_path_factory.mktemp("orthanc")
    http, dimse = _free_port(), _free_port()
    config = {
        "Name": "test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "HttpPort": http, "DicomPort": dimse, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        # the bundle's AE title as a known modality, allowed to C-FIND and C-GET (its port is never used)
        "DicomAet": "ORTHANC", "DicomModalities": {"bundle": [CALLING_AET, "127.0.0.1", 11112]},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("w")
    proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], cwd=root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    for _ in range(100):
        try:
            if requests.get(f"{url}/system", auth=(USER, PASSWORD), timeout=1).ok:
                break
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"Orthanc exited at start: {(root / 'orthanc.log').read_text()[-2000:]}")
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("Orthanc did not answer within 20 s")
    yield url, dimse
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _upload(url: str, paths) -> None:
    for path in paths:
        r = requests.post(f"{url}/instances", data=Path(path).read_bytes(), auth=(USER, PASSWORD), timeout=30)
        r.raise_for_status()


def _studies(url: str, root: Path) -> dict:
    """A real radiograph (pydicom's RG1_UNCR.dcm, CR, no report) and a 3-slice CT series with an SR report of its
    study, under new UIDs, stored in the archive. Returns {modality: (study_uid, series_uid, folder of its files)}."""
    ct_uid = make_ct_series(root / "ct", n=3, gap=2.0, study_uid=generate_uid())
    ct = pydicom.dcmread(next((root / "ct").iterdir()), stop_before_pixels=True)
    _sr(root / "sr" / "sr.dcm", str(ct.StudyInstanceUID), REPORT)
    sr = pydicom.dcmread(root / "sr" / "sr.dcm")
    sr.PatientID, sr.PatientName = ct.PatientID, ct.PatientName  # one patient, as in a real archive
    sr.save_as(root / "sr" / "sr.dcm", enforce_file_format=True)
    cr = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    cr.StudyInstanceUID, cr.SeriesInstanceUID = generate_uid(), generate_uid()
    cr.SOPInstanceUID = cr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    (root / "cr").mkdir()
    cr.save_as(root / "cr" / "cr.dcm", enforce_file_format=True)
    _upload(url, [*(root / "ct").iterdir(), root / "sr" / "sr.dcm", root / "cr" / "cr.dcm"])
    return {"CT": (str(ct.StudyInstanceUID), ct_uid, root / "ct"),
            "CR": (str(cr.StudyInstanceUID), str(cr.SeriesInstanceUID), root / "cr")}


@pytest.fixture(scope="module")
def studies(orthanc, tmp_path_factory):
    return _studies(orthanc[0], tmp_path_factory.mktemp("upload"))


def _archive(url: str) -> DicomWebArchive:
    return DicomWebArchive(f"{url}/dicom-web", Credentials(user=USER, password=PASSWORD))


def _segs(url: str, study_uid: str) -> list[pydicom.Dataset]:
    """Every SEG instance of the study, read back through DICOMweb."""
    client = _archive(url).client
    out = []
    for series in client.search_for_series(study_uid, search_filters={"Modality": "SEG"}):
        out += client.retrieve_series(study_uid, series["0020000E"]["Value"][0])
    return out


def _rows(out: Path) -> dict[str, dict]:
    with (out / "summary.csv").open(newline="") as f:
        return {row["series_uid"]: row for row in csv.DictReader(f)}


def _round_trip(args: list[str], url: str, studies: dict, out: Path) -> None:
    """Runs ``infer-pacs`` twice: the first run stores one SEG per series, checked by reading it back from the
    archive (references, geometry, pixels); the second stores nothing."""
    assert main(args) == 0
    rows = _rows(out)
    assert {rows[uid]["modality"] for _, uid, _ in studies.values()} == {"CT", "CR"}
    assert rows[studies["CT"][1]]["report"] == REPORT  # from the study's SR, retrieved with the series
    assert rows[studies["CR"][1]]["report"] == ""
    assert not (out / "retrieved").exists() or not any((out / "retrieved").iterdir())  # the cache is cleared

    for modality, (study_uid, series_uid, folder) in studies.items():
        row = rows[series_uid]
        assert row["status"] == "done" and float(row["retrieve_seconds"]) >= 0 and float(row["store_seconds"]) >= 0
        (stored,) = _segs(url, study_uid)
        assert stored.SOPInstanceUID == row["seg_sop_uid"]
        seg = hd.seg.Segmentation.from_dataset(stored)
        (ref_study, ref_series, ref_instance), = seg.get_source_image_uids()
        assert (ref_study, ref_series) == (study_uid, series_uid)
        sources = {d.SOPInstanceUID: d for d in (pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir())}
        source = sources[ref_instance]
        assert (stored.Rows, stored.Columns) == (source.Rows, source.Columns)
        if modality == "CT":  # the middle slice, at its place in the patient
            position = stored.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
            assert np.allclose([float(v) for v in position], [float(v) for v in source.ImagePositionPatient])
        # the pixels stored are the ones written here, and the summary's lesion fraction is theirs
        local = pydicom.dcmread(row["dicom_seg"])
        assert np.array_equal(stored.pixel_array, local.pixel_array)
        assert float(row["lesion_fraction"]) == pytest.approx(np.asarray(stored.pixel_array, bool).mean(), abs=1e-5)

    # idempotent: the second run finds both SEGs in the archive and stores nothing
    assert main(args) == 0
    rows_again = _rows(out)
    for study_uid, series_uid, _ in studies.values():
        assert len(_segs(url, study_uid)) == 1
        assert rows_again[series_uid]["seg_sop_uid"] == rows[series_uid]["seg_sop_uid"]
        assert rows_again[series_uid]["status"] == "done"


def test_dicomweb_query_retrieve_segment_store_and_a_rerun_stores_nothing_twice(orthanc, studies, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("PACS_USER", USER)
    monkeypatch.setenv("PACS_PASSWORD", PASSWORD)
    url, _ = orthanc
    out = tmp_path / "out"
    _round_trip(["infer-pacs", "--dicomweb", f"{url}/dicom-web", "--output", str(out), "--device", "cpu"], url,
                studies, out)


def test_dimse_find_get_segment_store_and_a_rerun_stores_nothing_twice(orthanc, tmp_path):
    url, port = orthanc
    studies = _studies(url, tmp_path / "upload")
    out = tmp_path / "out"
    query = "StudyInstanceUID=" + "\\".join(uid for uid, _, _ in studies.values())  # C-FIND's UID list matching
    _round_trip(["infer-pacs", "--dimse", f"ORTHANC@127.0.0.1:{port}", "--calling-aet", CALLING_AET, "--query", query,
                 "--output", str(out), "--device", "cpu"], url, studies, out)


def test_a_query_selects_the_studies(orthanc, studies):
    url, port = orthanc
    dimse = DimseArchive("ORTHANC", "127.0.0.1", port, calling_aet=CALLING_AET)
    for refs in (_archive(url).find_series(parse_query("ModalitiesInStudy=CR")),
                 dimse.find_series({"ModalitiesInStudy": "CR"})):
        assert {r.modality for r in refs} == {"CR"} and studies["CR"][:2] in {(r.study_uid, r.series_uid) for r in refs}
    assert parse_query("StudyDate=20261130&ModalitiesInStudy=CT") == {"StudyDate": "20261130",
                                                                      "ModalitiesInStudy": "CT"}
    with pytest.raises(ValueError, match="'CT' is not KEY=VALUE"):
        parse_query("StudyDate=20261130&CT")
    assert parse_dimse_address("ORTHANC@pacs.example.org:4242") == ("ORTHANC", "pacs.example.org", 4242)
    with pytest.raises(ValueError, match="expected AET@HOST:PORT"):
        parse_dimse_address("pacs.example.org:4242")


def test_wrong_credentials_and_a_wrong_url_name_the_request_and_the_status(orthanc, studies, tmp_path, capsys,
                                                                             monkeypatch):
    url, port = orthanc
    archive = DicomWebArchive(f"{url}/dicom-web", Credentials(user=USER, password="wrong"), retries=0)
    with pytest.raises(PacsError, match=r"QIDO-RS studies: GET http://127\.0\.0\.1:\d+/dicom-web/studies.*HTTP 401"):
        archive.find_series()
    monkeypatch.setenv("PACS_USER", USER)
    monkeypatch.setenv("PACS_PASSWORD", PASSWORD)
    assert main(["infer-pacs", "--dicomweb", f"{url}/no-such-root", "--output", str(tmp_path / "o")]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    closed = _free_port()
    with pytest.raises(PacsError, match=f"QIDO-RS studies: http://127.0.0.1:{closed}/dicom-web: ConnectionError"):
        DicomWebArchive(f"http://127.0.0.1:{closed}/dicom-web", retries=1, backoff=0.01).find_series()
    # DIMSE: an AE title the archive does not know may not query; nobody listening
    refused = f"C-FIND studies: dicom://ORTHANC@127.0.0.1:{port}: C-FIND got no answer .*STRANGER"
    with pytest.raises(PacsError, match=refused):
        DimseArchive("ORTHANC", "127.0.0.1", port, calling_aet="STRANGER").find_series()
    with pytest.raises(PacsError, match=f"C-FIND studies: dicom://ORTHANC@127.0.0.1:{closed}: association"):
        DimseArchive("ORTHANC", "127.0.0.1", closed, retries=1, backoff=0.01, timeout=5).find_series()


def test_credentials_come_from_the_environment_or_files_never_the_command_line(tmp_path):
    token = tmp_path / "token"
    token.write_text("abc\n")
    assert Credentials.from_env(environ={"PACS_TOKEN_FILE": str(token)}) == Credentials(token="abc")
    assert Credentials.from_env(environ={"PACS_USER": "u", "PACS_PASSWORD": "p"}) == Credentials(user="u", password="p")
    assert Credentials.from_env(environ={}) == Credentials()
    with pytest.raises(ValueError, match="PACS_USER and PACS_PASSWORD"):
        Credentials.from_env(environ={"PACS_USER": "u"})
    with pytest.raises(ValueError, match="both set"):
        Credentials.from_env(environ={"PACS_TOKEN": "t", "PACS_USER": "u", "PACS_PASSWORD": "p"})
    with pytest.raises(ValueError, match="PACS_TOKEN_FILE=.*cannot read it"):
        Credentials.from_env(environ={"PACS_TOKEN_FILE": str(tmp_path / "missing")})
    assert "p" not in Credentials(user="u", password="p").describe()


def test_a_series_that_fails_is_counted_and_retried_by_the_next_run(orthanc, tmp_path, monkeypatch, capsys):
    from test_dicom import make_dx

    url, _ = orthanc
    (tmp_path / "dx").mkdir()
    dx = make_dx(tmp_path / "dx" / "IM1", np.full((40, 40), 3000), with_pixels=False)
    dx.StudyInstanceUID = generate_uid()
    dx.save_as(tmp_path / "dx" / "IM1", enforce_file_format=True)
    _upload(url, [tmp_path / "dx" / "IM1"])
    monkeypatch.setenv("PACS_USER", USER)
    monkeypatch.setenv("PACS_PASSWORD", PASSWORD)
    args = ["infer-pacs", "--dicomweb", f"{url}/dicom-web", "--query", f"StudyInstanceUID={dx.StudyInstanceUID}",
            "--output", str(tmp_path / "out"), "--device", "cpu"]
    for _ in range(2):  # the second run tries it again: no SEG of it is in the archive
        assert main(args) == 1
        assert "segmented: 0, already done: 0, failed: 1" in capsys.readouterr().out
        row = _rows(tmp_path / "out")[dx.SeriesInstanceUID]
        assert row["status"] == "failed" and "no pixel data" in row["reason"]
    assert _segs(url, dx.StudyInstanceUID) == []


class _Flaky:
    """A local HTTP server answering 503 to the first ``failures`` requests, then ``body`` (DICOM JSON)."""

    def __init__(self, failures: int, body: bytes = b"[]") -> None:
        import http.server
        import threading

        self.requests: list[str] = []
        flaky = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                flaky.requests.append(self.command)
                if len(flaky.requests) <= failures:
                    self.send_response(503)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"


def test_busy_servers_and_lost_connections_are_retried_with_backoff(tmp_path):
    flaky = _Flaky(failures=2)
    try:
        assert DicomWebArchive(flaky.url, retries=3, backoff=0.01).find_series() == []
        assert flaky.requests == ["GET", "GET", "GET"]  # two 503s, then the answer
        flaky.requests.clear()
        with pytest.raises(PacsError, match=r"QIDO-RS studies: GET .*: HTTP 503"):
            DicomWebArchive(flaky.url, retries=1, backoff=0.01).find_series()  # out of retries: the status, named
    finally:
        flaky.server.shutdown()

    seg = tmp_path / "seg.dcm"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(seg, enforce_file_format=True)
    flaky = _Flaky(failures=1, body=b"{}")  # a busy archive, then an empty STOW-RS answer (nothing failed)
    try:
        assert DicomWebArchive(flaky.url, retries=3, backoff=0.01).store(seg) == ds.SOPInstanceUID
        assert flaky.requests == ["POST", "POST"]  # the same instance again: a fixed UID, no second copy
    finally:
        flaky.server.shutdown()
    closed = _free_port()  # nobody listening: tried 1 + 2 times, then the error, promptly
    start = time.perf_counter()
    with pytest.raises(PacsError, match=f"QIDO-RS studies: http://127.0.0.1:{closed}/dicom-web: ConnectionError"):
        DicomWebArchive(f"http://127.0.0.1:{closed}/dicom-web", retries=2, backoff=0.01).find_series()
    assert time.perf_counter() - start < 10


def test_a_report_sidecar_guides_a_study_without_sr(orthanc, tmp_path, monkeypatch):
    url, _ = orthanc
    cr = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    cr.StudyInstanceUID, cr.SeriesInstanceUID = generate_uid(), generate_uid()
    cr.SOPInstanceUID = cr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    cr.save_as(tmp_path / "cr.dcm", enforce_file_format=True)
    _upload(url, [tmp_path / "cr.dcm"])
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / f"{cr.StudyInstanceUID}.txt").write_text("Opacity in the right upper zone.\n")
    monkeypatch.setenv("PACS_USER", USER)
    monkeypatch.setenv("PACS_PASSWORD", PASSWORD)
    assert main(["infer-pacs", "--dicomweb", f"{url}/dicom-web", "--query", f"StudyInstanceUID={cr.StudyInstanceUID}",
                 "--reports", str(tmp_path / "reports"), "--output", str(tmp_path / "out"), "--device", "cpu"]) == 0
    row = _rows(tmp_path / "out")[cr.SeriesInstanceUID]
    assert row["status"] == "done" and row["report"] == "Opacity in the right upper zone."
    (stored,) = _segs(url, cr.StudyInstanceUID)
    # the SEG records the report as found, although the network read it in the training template (report_template)
    assert "Opacity in the right upper zone" in stored.ContentDescription


def test_tls_is_verified_unless_turned_off_loudly(tmp_path):
    from conftest import captured_logs

    assert DicomWebArchive("https://pacs.example.org/dicomweb").client._session.verify is True
    ca = tmp_path / "ca.pem"
    assert DicomWebArchive("https://pacs.example.org/dicomweb", verify=str(ca)).client._session.verify == str(ca)
    with captured_logs("bundle.pacs") as records:
        assert DicomWebArchive("https://pacs.example.org/dicomweb", verify=False).client._session.verify is False
    assert any("not verified" in r.getMessage() and r.levelname == "WARNING" for r in records)

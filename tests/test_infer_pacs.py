"""`python -m bundle infer-pacs` on a PACS-like export: DICOM SEG per series with the report when there is one,
overlays, a summary CSV, logged skips, and a rerun that skips what is done."""

import csv
import shutil

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from test_dicom import make_ct_series, make_dx

from bundle.__main__ import main
from bundle.infer_pacs import infer_pacs


def _export(root):
    """Nested folders, meaningless names: a CT series (5 slices), a radiograph with its report beside it, a file
    that is not DICOM but named .dcm, and a radiograph without pixel data."""
    ct_uid = make_ct_series(root / "a" / "b", n=5, gap=2.0)
    (root / "c").mkdir()
    dx = make_dx(root / "c" / "IM1", np.full((96, 80), 3000), spacing=(0.3, 0.2))
    (root / "c" / "report.txt").write_text("Bilateral pulmonary infection, lower left lung and lower right lung.")
    (root / "broken.dcm").write_bytes(b"not a DICOM file")
    (root / "d").mkdir()
    empty = make_dx(root / "d" / "IM2", np.full((40, 40), 3000), with_pixels=False)
    return ct_uid, dx, empty


def _rows(out):
    with (out / "summary.csv").open(newline="") as f:
        return {row["series_uid"]: row for row in csv.DictReader(f)}


def test_infer_pacs_writes_seg_and_overlay_per_series_and_skips_what_it_cannot_read(tmp_path, caplog):
    ct_uid, dx, empty = _export(tmp_path / "export")
    out = tmp_path / "out"
    run = infer_pacs(tmp_path / "export", out, device="cpu")
    assert (run.done, run.already_done, run.failed, run.unreadable_files) == (2, 0, 1, 1)
    rows = _rows(out)
    assert set(rows) == {ct_uid, dx.SeriesInstanceUID, empty.SeriesInstanceUID}
    assert rows[empty.SeriesInstanceUID]["status"] == "failed"
    assert "no pixel data" in rows[empty.SeriesInstanceUID]["reason"]
    assert "no pixel data" in caplog.text and "broken.dcm" in caplog.text  # logged, naming the file
    assert rows[dx.SeriesInstanceUID]["report"].startswith("Bilateral")  # the report beside the image was used
    assert rows[ct_uid]["modality"] == "CT" and rows[ct_uid]["report"] == ""

    for uid in (ct_uid, dx.SeriesInstanceUID):
        row = rows[uid]
        assert row["status"] == "done" and 0.0 <= float(row["lesion_fraction"]) <= 1.0
        assert row["overlay"].endswith(f"{uid}_overlay.png")
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(row["dicom_seg"]))
        (study, series, instance), = seg.get_source_image_uids()
        assert series == uid and study == row["study_uid"]
        source = next(pydicom.dcmread(p) for p in (tmp_path / "export").rglob("*")
                      if p.is_file() and p.name != "broken.dcm" and p.suffix != ".txt"
                      and pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == instance)
        assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
        assert float(row["lesion_fraction"]) == pytest.approx(np.asarray(seg.pixel_array, bool).mean(), abs=1e-5)


def test_a_rerun_skips_the_series_done_and_retries_the_rest(tmp_path):
    ct_uid, dx, empty = _export(tmp_path / "export")
    out = tmp_path / "out"
    infer_pacs(tmp_path / "export", out, device="cpu")
    first = _rows(out)
    (out / f"{ct_uid}_overlay.png").unlink()  # an output lost since: that series is made again
    run = infer_pacs(tmp_path / "export", out, device="cpu")
    assert (run.done, run.already_done, run.failed) == (1, 1, 1)
    assert _rows(out)[dx.SeriesInstanceUID] == first[dx.SeriesInstanceUID]
    assert (out / f"{ct_uid}_overlay.png").is_file()

    shutil.rmtree(tmp_path / "export" / "d")  # fixed at the source: nothing fails any more
    assert main(["infer-pacs", "--input", str(tmp_path / "export"), "--output", str(out), "--device", "cpu"]) == 0
    assert set(_rows(out)) == {ct_uid, dx.SeriesInstanceUID}


def test_weights_of_another_network_stop_the_run_naming_the_file(tmp_path):
    (tmp_path / "export").mkdir()
    make_dx(tmp_path / "export" / "IM1", np.full((64, 64), 3000))
    ckpt = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), ckpt)
    with pytest.raises(RuntimeError, match="does not fit TMCA") as raised:
        infer_pacs(tmp_path / "export", tmp_path / "out", ckpt=ckpt, device="cpu")
    assert str(ckpt) in str(raised.value)


def test_which_text_files_are_reports_follows_the_documented_rule(tmp_path):
    """README.txt/INDEX.txt at the export root were once every series' report, two of them skipped the whole
    export with exit 0, and a latin-1 notes file dropped a valid series (issue 20)."""
    from bundle.datalist import build_datalist

    root = tmp_path / "export"
    make_ct_series(root / "a" / "b", n=3, gap=2.0)
    (root / "c").mkdir()
    dx = make_dx(root / "c" / "IM1", np.full((64, 64), 3000))
    (root / "README.txt").write_text("Exported by PACS viewer 3.1")
    (root / "INDEX.txt").write_text("a/b: CT, c: DX")
    (root / "c" / "notes.txt").write_bytes("Patient transferred from Zürich".encode("latin-1"))
    (root / "c" / "radiology_report.txt").write_text("Opacity in the left lower zone.")
    entries = {e["id"]: e for e in build_datalist("pacs", root).splits["test"]}
    assert entries[dx.SeriesInstanceUID]["report"] == "Opacity in the left lower zone."
    assert all("report" not in e for uid, e in entries.items() if uid != dx.SeriesInstanceUID)  # README ignored
    (root / "c" / "findings.txt").write_text("Something else.")
    from bundle.datalist import DatalistError

    with pytest.raises(DatalistError, match=r"/c: 2 report files"):
        build_datalist("pacs", root)


def test_nothing_segmented_exits_non_zero(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "broken.dcm").write_bytes(b"not a DICOM file")
    assert main(["infer-pacs", "--input", str(tmp_path / "export"), "--output", str(tmp_path / "out")]) == 1


@pytest.mark.slow
def test_two_instances_on_one_output_folder_keep_every_row(tmp_path):
    """Two `infer-pacs` processes at once, each on its own export, writing to one output folder: both succeed,
    summary.csv ends with every series of both (neither drops the other's rows) and no temporary file is left."""
    import os
    import subprocess
    import sys

    from conftest import BUNDLE_ROOT

    uids = set()
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        for i in range(4):
            uids.add(make_dx(tmp_path / name / f"IM{i}", np.full((48, 40), 1000 + 400 * i)).SeriesInstanceUID)
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "bundle", "infer-pacs", "--input", str(tmp_path / name),
                               "--output", str(out), "--device", "cpu"], cwd=BUNDLE_ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for name in ("one", "two")]
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
    rows = _rows(out)
    assert set(rows) == uids and {r["status"] for r in rows.values()} == {"done"}
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

"""`python -m bundle datalist`: real layouts from ../shared, and every kind of bad input named by file."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle.datalist import DatalistError, build_datalist, read_report, write_datalist
from conftest import BUNDLE_ROOT, SHARED_DATA

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")


@needs_shared
def test_lvit_layout_on_the_real_monuseg_sample():
    import openpyxl

    dl = build_datalist("lvit", SHARED_DATA / "monuseg")
    assert [len(dl.splits[s]) for s in ("training", "validation", "test")] == [0, 6, 0]
    sheet = openpyxl.load_workbook(SHARED_DATA / "monuseg/Val_Folder/Val_text.xlsx", read_only=True).worksheets[0]
    expected = {row[0]: row[1] for row in list(sheet.iter_rows(values_only=True))[1:]}
    for e in dl.splits["validation"]:
        mask_name = e["label"].rsplit("/", 1)[1]
        assert e["report"] == expected[mask_name]
        assert e["image"].endswith(f"img/{mask_name}")


@needs_shared
def test_folder_layout_on_the_real_qata_copy(tmp_path):
    dl = build_datalist("folder", SHARED_DATA / "qata")
    split = json.loads((SHARED_DATA / "qata/split.json").read_text())
    assert len(dl.splits["training"]) == 5713 and len(dl.splits["validation"]) == 1429 and not dl.splits["test"]
    assert {e["id"] for e in dl.splits["validation"]} == set(split["val"])
    for e in dl.splits["training"][::97] + dl.splits["validation"][::53]:
        text = (SHARED_DATA / "qata/reports" / f"{e['id']}.txt").read_text()
        assert e["report"] == " ".join(text.split())
        assert e["image"].endswith(f"images/{e['id']}.png") and e["label"].endswith(f"masks/{e['id']}.png")
    out = write_datalist(dl, tmp_path / "qata.json")
    written = json.loads(out.read_text())
    assert written["validation"][0]["image"].startswith("/")  # data outside the datalist's folder: absolute


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _folder_set(root, n=4):
    for i in range(n):
        _png(root / "images" / f"c{i}.png", np.full((16, 16), 100 + i))
        mask = np.zeros((16, 16))
        mask[4:8, 4:8] = 255
        _png(root / "masks" / f"c{i}.png", mask)
        (root / "reports").mkdir(exist_ok=True)
        (root / "reports" / f"c{i}.txt").write_text(f"lower  left lung {i}.\n")
    return root


def test_folder_layout_without_split_is_split_by_seed(tmp_path):
    root = _folder_set(tmp_path / "d", n=20)
    a = build_datalist("folder", root, val_fraction=0.2, test_fraction=0.1, seed=3)
    b = build_datalist("folder", root, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert [len(a.splits[s]) for s in ("training", "validation", "test")] == [14, 4, 2]
    assert a.splits == b.splits
    assert a.splits["training"][0]["report"].startswith("lower left lung")  # whitespace normalised
    out = write_datalist(a, root / "datalist.json")
    entry = json.loads(out.read_text())["training"][0]
    assert entry["image"].startswith("images/")  # relative to the datalist's folder



def test_images_without_masks_all_go_to_the_test_list_and_infer_split_all_reads_every_list(tmp_path):
    """A folder of 4 images to segment was split 2/1/1 by chance, so inference segmented only 1 of them."""
    from scripts.data import inference_datalist

    root = _folder_set(tmp_path / "d")
    rows = "".join(f"images/c{i}.png,lower left lung.\n" for i in range(4))
    (root / "list.csv").write_text("image,report\n" + rows)
    dl = build_datalist("csv", root / "list.csv", mask_column=None)
    assert [len(dl.splits[s]) for s in ("training", "validation", "test")] == [0, 0, 4]

    labelled = write_datalist(build_datalist("folder", root), root / "datalist.json")  # 4 with masks: split 2/1/1
    assert len(inference_datalist(root, labelled, "test")) == 1
    every = inference_datalist(root, labelled, "all")
    assert sorted(Path(e["image"]).name for e in every) == [f"c{i}.png" for i in range(4)]
    assert all("label" not in e and e["report"] for e in every)


def test_folder_layout_finds_images_in_every_format_the_readers_load(tmp_path):
    """A .dicom image was not looked for (the inline suffix list had .dcm only) and the entry failed."""
    from test_dicom import make_dx

    root = _folder_set(tmp_path / "d")
    for i, suffix in ((1, ".tif"), (2, ".bmp")):
        (root / "images" / f"c{i}.png").unlink()
        _png(root / "images" / f"c{i}{suffix}", np.full((16, 16), 100 + i))
    (root / "images" / "c3.png").unlink()
    make_dx(root / "images" / "c3.dicom", np.full((16, 16), 3000))
    entries = {e["id"]: e for s in build_datalist("folder", root, val_fraction=0.0, test_fraction=0.0).splits.values()
               for e in s}
    assert sorted(entries) == ["c0", "c1", "c2", "c3"]
    assert [Path(entries[f"c{i}"]["image"]).suffix for i in range(4)] == [".png", ".tif", ".bmp", ".dicom"]

@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: (r / "reports/c1.txt").unlink(), r"c1\.txt: missing report"),
        (lambda r: (r / "reports/c1.txt").write_text("  \n"), r"c1\.txt: empty report"),
        (lambda r: (r / "reports/c1.txt").write_bytes(b"lower left lung \xff\xfe."), r"c1\.txt: report is not UTF-8"),
        (lambda r: (r / "images/c1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken"), r"c1\.png: unreadable or corrupt"),
        (lambda r: (r / "masks/c1.png").unlink(), r"c1\.\*: missing mask"),
        (lambda r: _png(r / "masks/c1.png", np.zeros((16, 20))), r"masks/c1\.png: mask size \(20, 16\) differs"),
        (lambda r: _png(r / "masks/c1.png", np.arange(256).reshape(16, 16)), r"masks/c1\.png: mask is not binary"),
    ],
)
def test_bad_input_is_named_or_skipped_and_counted(tmp_path, breakage, message):
    root = _folder_set(tmp_path / "d")
    breakage(root)
    with pytest.raises(DatalistError, match=message):
        build_datalist("folder", root)
    dl = build_datalist("folder", root, skip_bad=True)
    assert sum(len(v) for v in dl.splits.values()) == 3
    assert len(dl.skipped) == 1 and "c1" in dl.skipped[0][0]
    assert "skipped: 1" in dl.summary()


def test_non_utf8_report_can_be_decoded_with_a_warning(tmp_path, caplog):
    p = tmp_path / "r.txt"
    p.write_bytes(b"lower left lung \xff.")
    assert read_report(p, encoding_errors="replace") == "lower left lung \ufffd."
    assert "r.txt" in caplog.text and "not UTF-8" in caplog.text


def test_excel_with_unexpected_columns(tmp_path):
    import openpyxl

    folder = tmp_path / "Val_Folder"
    (folder / "img").mkdir(parents=True)
    wb = openpyxl.Workbook()
    wb.active.append(["Name", "Text"])
    wb.active.append(["a.png", "x"])
    wb.save(folder / "Val_text.xlsx")
    with pytest.raises(DatalistError, match=r"Val_text\.xlsx: expected columns 'Image' and 'Description'"):
        build_datalist("lvit", tmp_path)


def test_csv_layout_and_duplicate_ids(tmp_path):
    root = _folder_set(tmp_path / "d", n=3)
    rows = ["Image,Mask,Description"] + [f"images/c{i}.png,masks/c{i}.png,left lung {i}" for i in range(3)]
    (root / "prompts.csv").write_text("\n".join(rows) + "\n")
    dl = build_datalist("csv", root / "prompts.csv", image_column="Image", mask_column="Mask",
                        report_column="Description", val_fraction=0, test_fraction=0)
    assert [e["report"] for e in dl.splits["training"]] and len(dl.splits["training"]) == 3
    (root / "dup.csv").write_text("\n".join(rows + [rows[1]]) + "\n")
    with pytest.raises(DatalistError, match=r"c0\.png: duplicate id 'c0'"):
        build_datalist("csv", root / "dup.csv", image_column="Image", mask_column="Mask", report_column="Description")
    with pytest.raises(DatalistError, match=r"prompts\.csv: expected columns"):
        build_datalist("csv", root / "prompts.csv")


def test_unknown_layout_and_cli_exit_code(tmp_path):
    with pytest.raises(DatalistError, match="not a 'folder' layout"):
        build_datalist("folder", tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "bundle", "datalist", "folder", "--root", str(tmp_path)],
        cwd=BUNDLE_ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "not a 'folder' layout" in proc.stderr
    root = _folder_set(tmp_path / "ok")
    proc = subprocess.run(
        [sys.executable, "-m", "bundle", "datalist", "folder", "--root", str(root)],
        cwd=BUNDLE_ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0 and "training:" in proc.stdout and (root / "datalist.json").is_file()


def _sr(path, study_uid, text):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = BasicTextSRStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, generate_uid(), "SR"
    finding = Dataset()
    finding.ValueType, finding.TextValue = "TEXT", text
    container = Dataset()
    container.ValueType, container.ContentSequence = "CONTAINER", [finding]
    ds.ValueType, ds.ContentSequence = "CONTAINER", [container]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_pacs_export_one_entry_per_series_with_reports(tmp_path):
    from test_dicom import make_dx

    root = tmp_path / "export"
    a = make_dx(_mkdir(root / "x1" / "y7") / "0001", np.zeros((8, 8)))  # no suffix, meaningless names
    (root / "x1" / "report.txt").write_text("Right  lower lung opacity.")
    b = make_dx(_mkdir(root / "x2") / "IM0", np.zeros((8, 8)))
    _sr(root / "x2" / "SR0", b.StudyInstanceUID, "left upper lung consolidation.")
    c = make_dx(root / "x2" / "IM1", np.zeros((8, 8)))  # a second series in the same folder
    (root / "x2" / "viewer.exe").write_bytes(b"MZ not dicom")
    dl = build_datalist("pacs", root)
    entries = {e["id"]: e for e in dl.splits["test"]}
    assert set(entries) == {a.SeriesInstanceUID, b.SeriesInstanceUID, c.SeriesInstanceUID}
    assert entries[a.SeriesInstanceUID]["report"] == "Right lower lung opacity."
    assert entries[b.SeriesInstanceUID]["report"] == "left upper lung consolidation."
    assert "report" not in entries[c.SeriesInstanceUID]  # another study, no report: inference without text
    assert entries[b.SeriesInstanceUID]["image"].endswith("IM0") and entries[c.SeriesInstanceUID]["image"].endswith("IM1")

    (root / "x3").mkdir()
    (root / "x3" / "bad.dcm").write_bytes(b"\x00" * 200)
    with pytest.raises(DatalistError, match=r"bad\.dcm: unreadable or corrupt DICOM"):
        build_datalist("pacs", root)
    skipped = build_datalist("pacs", root, skip_bad=True)
    assert len(skipped.splits["test"]) == 3 and len(skipped.skipped) == 1


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Inference outputs: overlays, DICOM Segmentation objects read back with highdicom, the readers' DICOM hand-off and
the report inferer MONAI Label relies on."""

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from conftest import config
from monai.bundle import ConfigParser
from monai.transforms import Compose, EnsureChannelFirstd, LoadImage, LoadImaged
from pydicom.data import get_testdata_file
from test_dicom import make_ct_series, make_dx

from scripts.dicom import DicomImageReader
from scripts.inferers import ReportInferer
from scripts.outputs import SaveOutputsd, contour, dicom_segmentation, dicom_sources, overlay_image
from scripts.transforms import SelectSlabd


def test_contour_is_the_boundary_of_the_mask():
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    edge = contour(mask)
    assert edge.sum() == 16 and not edge[3:6, 3:6].any() and (edge <= mask).all()
    assert contour(mask, width=2).sum() == 24


@pytest.mark.parametrize("caption", ["bilateral pulmonary infection, lower left lung.", None])
def test_overlay_outlines_the_mask_and_prints_the_caption(caption):
    image = np.full((60, 80), 0.5, np.float32)
    mask = np.zeros((60, 80), bool)
    mask[10:30, 20:50] = True
    picture = np.asarray(overlay_image(image, mask, caption, color=(255, 0, 0)))
    assert picture.shape[1] == 80 and picture.shape[0] > 60  # the caption band below the image
    top, band = picture[:60], picture[60:]
    assert (top[10, 30] == [255, 0, 0]).all()  # on the contour
    assert top[20, 35, 0] > top[20, 35, 1]  # tinted inside
    assert (top[45, 10] == [127, 127, 127]).all()  # untouched outside
    assert (band > 200).any()  # white text, also "no report (image-only inference)" when there is none


def test_overlay_of_a_large_film_is_scaled_down_with_a_visible_contour():
    mask = np.zeros((3000, 2000), bool)
    mask[1000:2000, 500:1500] = True
    picture = overlay_image(np.random.rand(3000, 2000).astype(np.float32), mask, "x", max_side=1024)
    assert picture.size[0] == round(2000 * 1024 / 3000)
    assert (np.asarray(picture)[:1024] == [255, 90, 0]).all(axis=-1).sum() > 4 * 300


def _mask(rows, cols):
    mask = np.zeros((rows, cols), bool)
    mask[rows // 4 : rows // 2, cols // 3 : cols // 2] = True
    return mask


def test_dicom_seg_of_a_radiograph_references_it_and_round_trips(tmp_path):
    src = make_dx(tmp_path / "dx.dcm", np.full((96, 80), 3000), spacing=(0.3, 0.2))
    mask = _mask(96, 80)
    dicom_segmentation([pydicom.dcmread(tmp_path / "dx.dcm")], mask, algorithm_name="TMCA").save_as(tmp_path / "s.dcm")
    ds = pydicom.dcmread(tmp_path / "s.dcm")
    seg = hd.seg.Segmentation.from_dataset(ds)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert (ds.StudyInstanceUID, ds.PatientID) == (src.StudyInstanceUID, src.PatientID)
    assert ds.SeriesInstanceUID not in (src.SeriesInstanceUID, "")
    assert seg.get_source_image_uids() == [(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)]
    pixels = seg.get_pixels_by_source_instance([src.SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, ..., 0].astype(bool), mask)
    description = seg.get_segment_description(1)
    assert description.segment_label == "lesion" and description.algorithm_identification[0].AlgorithmName == "TMCA"


@pytest.mark.parametrize("report, expected", [
    ("Bilateral pulmonary infection, two infected areas.", "report: Bilateral pulmonary infection, two infected areas."),
    ("Patchy opacity in the left lower zone; the right lung is clear and the heart is normal in size.",
     "report: Patchy opacity in the left lower zone; the right lung..."),
    (None, "no report: image-only path"),
])
def test_the_seg_records_the_report_that_guided_it_and_the_patient_orientation(tmp_path, report, expected):
    make_dx(tmp_path / "dx.dcm", np.full((40, 50), 3000))
    src = pydicom.dcmread(tmp_path / "dx.dcm")
    src.PatientOrientation = ["L", "F"]
    dicom_segmentation([src], _mask(40, 50), report=report).save_as(tmp_path / "s.dcm")
    ds = pydicom.dcmread(tmp_path / "s.dcm")
    assert ds.ContentDescription == expected and len(ds.ContentDescription) <= 64
    assert list(ds.PatientOrientation) == ["L", "F"]  # type 2C for a projection radiograph


def test_a_seg_passes_dciodvfy(tmp_path):
    """The SEG checked by a DICOM validator (Debian's dicom3tools: `apt-get install dicom3tools`)."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    make_dx(tmp_path / "dx.dcm", np.full((40, 50), 3000))
    dicom_segmentation([pydicom.dcmread(tmp_path / "dx.dcm")], _mask(40, 50), report="left lung.").save_as(
        tmp_path / "s.dcm")
    proc = subprocess.run(["dciodvfy", str(tmp_path / "s.dcm")], capture_output=True, text=True)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


def test_an_empty_prediction_is_still_a_valid_seg(tmp_path):
    make_dx(tmp_path / "dx.dcm", np.full((40, 50), 3000))
    seg = dicom_segmentation([pydicom.dcmread(tmp_path / "dx.dcm")], np.zeros((40, 50), bool))
    assert seg.NumberOfFrames == 1 and not seg.pixel_array.any()


def test_a_mask_of_the_wrong_size_is_refused_naming_the_source(tmp_path):
    make_dx(tmp_path / "dx.dcm", np.full((40, 50), 3000))
    with pytest.raises(ValueError, match=r"does not match 1 source image\(s\) of 40×50 .*dx.dcm"):
        dicom_segmentation([pydicom.dcmread(tmp_path / "dx.dcm")], np.zeros((50, 40), bool))


def test_dicom_seg_of_a_ct_slab_lies_on_the_slab_slices(tmp_path):
    """A slab of 3 of 5 slices: SelectSlab records their SOPInstanceUIDs, the SEG has one frame per slice, each in
    the frame of reference and at the position of its source slice."""
    make_ct_series(tmp_path / "ct", n=5, gap=2.0, orientation=(0.8660254, 0.5, 0, -0.5, 0.8660254, 0))
    files = sorted(str(p) for p in (tmp_path / "ct").iterdir())
    load = Compose([LoadImaged("image", reader=DicomImageReader()), EnsureChannelFirstd("image"),
                    SelectSlabd("image", index="middle", thickness=3)])
    image = load({"image": files})["image"]
    uids = image.meta["SourceSOPInstanceUIDs"].split("\\")
    assert len(uids) == 3
    sources = dicom_sources(image.meta["filename_or_obj"], uids)  # only the first file name is kept: found beside it
    mask = _mask(int(sources[0].Rows), int(sources[0].Columns))
    seg = dicom_segmentation(sources, mask)
    assert seg.NumberOfFrames == 3 and seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    by_uid = {src.SOPInstanceUID: src for src in sources}
    referenced = []
    for frame in seg.PerFrameFunctionalGroupsSequence:  # highdicom orders frames itself: match them by reference
        src = by_uid[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        referenced.append(src.SOPInstanceUID)
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient,
                                   src.ImagePositionPatient, atol=1e-3)
    assert sorted(referenced) == sorted(uids)
    # in slice order along the normal
    orientation = np.asarray(sources[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [float(np.asarray(s.ImagePositionPatient, float) @ normal) for s in sources]
    assert positions == sorted(positions)
    with pytest.raises(ValueError, match="not found among the input's files"):
        dicom_sources(files[0], ["1.2.3.4"])


def _real_film():
    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data is not installed (pip install -r requirements-dev.txt)")
    return path


def test_a_real_film_with_a_zero_pixel_spacing_gives_a_readable_seg(tmp_path, caplog):
    src = pydicom.dcmread(_real_film(), stop_before_pixels=True)
    with caplog.at_level("WARNING"):
        dicom_segmentation([src], _mask(src.Rows, src.Columns)).save_as(tmp_path / "s.dcm")
    assert "PixelSpacing ['0.000', '0.000'] is not usable" in caplog.text
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(tmp_path / "s.dcm"))
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns) and seg.PatientName == src.PatientName


def test_the_config_readers_give_a_dual_personality_dicom_to_the_dicom_reader():
    """RG1_UNCR.dcm carries a TIFF header in its preamble: PIL alone would read it as a TIFF, un-inverted and
    without UIDs."""
    parser = ConfigParser()
    parser.read_config(config("inference.yaml"))
    load = parser.get_parsed_content("preprocessing").transforms[0]
    image = load({"image": _real_film()})["image"]
    assert image.meta["SOPInstanceUID"] == pydicom.dcmread(_real_film(), stop_before_pixels=True).SOPInstanceUID
    assert image.meta["Modality"] == "CR"


class _Recorder(torch.nn.Module):
    def forward(self, image, text_ids=None, text_mask=None):
        self.text_ids, self.text_mask = text_ids, text_mask
        return image


def test_report_inferer_adds_its_report_only_when_the_caller_brings_none():
    net, image = _Recorder(), torch.zeros(2, 1, 8, 8)
    ReportInferer("")(image, net)
    assert net.text_ids is None  # no report: image only, as MONAI Label calls it by default
    ReportInferer("left lower lung opacity.")(image, net)
    assert net.text_ids.shape == (2, 24) and net.text_mask[:, 0].tolist() == [1, 1] and net.text_mask.sum() < 48
    own = torch.ones(2, 24, dtype=torch.long)
    ReportInferer("left lower lung opacity.")(image, net, text_ids=own, text_mask=own)
    assert net.text_ids is own  # the sample's own report (the bundle's workflows) wins


@pytest.mark.parametrize(
    "file_name, entry_id, mask_name, prob_name",
    [
        ("case_7.png", None, "case_7_seg.png", "case_7_prob.png"),
        ("case_7.nii.gz", None, "case_7_seg.nii.gz", "case_7_prob.nii.gz"),
        ("IM0001.nii.gz", "1.2.840.99", "1.2.840.99_seg.nii.gz", "1.2.840.99_prob.nii.gz"),  # named by its id
    ],
)
def test_mask_and_probability_are_written_like_the_input_and_their_paths_returned(
    tmp_path, file_name, entry_id, mask_name, prob_name
):
    import nibabel as nib
    from PIL import Image

    source = tmp_path / file_name
    if file_name.endswith(".png"):
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(source)
    else:
        nib.save(nib.Nifti1Image(np.zeros((12, 10), np.float32), np.eye(4)), source)
    image = Compose([LoadImaged("image"), EnsureChannelFirstd("image")])({"image": str(source)})["image"]
    pred = image.clone()  # on the input's grid, as Invertd leaves it
    pred[:] = 0
    pred[0, 2:5, 3:6] = 1
    sample = {"image": image, "pred": pred, "prob": pred * 0.8, **({"id": entry_id} if entry_id else {})}
    out = tmp_path / "out"
    files = SaveOutputsd("pred", out, formats=("mask", "probability"))(sample)["output_files"]
    assert files == {"mask": str(out / mask_name), "probability": str(out / prob_name)}
    scale = 255 if mask_name.endswith(".png") else 1  # PNG masks are 0/255
    written = LoadImage(image_only=True, ensure_channel_first=True)(files["mask"])
    np.testing.assert_array_equal(np.asarray(written), pred.numpy() * scale)


@pytest.mark.parametrize(
    "report, as_written, caption",
    [
        ("unilateral pulmonary infection, one infected area, lower left lung.", "Opacity at the left base.",
         "Opacity at the left base. [read as: unilateral pulmonary infection, one infected area, lower left lung.]"),
        ("", "Lungs are clear.", "Lungs are clear. [read as: no report]"),  # dropped: the no-report path
        ("lower left lung.", "lower left lung.", "lower left lung."),  # passed as it is
        ("lower left lung.", None, "lower left lung."),  # no ReportToTemplated in the pipeline
    ],
)
def test_overlay_shows_the_report_as_found_and_as_read(report, as_written, caption, tmp_path, monkeypatch):
    """A report written in the training template (ReportToTemplated) is shown as found and as the network read it,
    so that a misread location is visible next to the mask."""
    from PIL import Image

    import scripts.outputs as outputs

    seen = {}

    def fake_overlay(image, mask, text, max_side):
        seen["caption"] = text
        return Image.new("RGB", (4, 4))

    monkeypatch.setattr(outputs, "overlay_image", fake_overlay)
    source = tmp_path / "x.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(source)
    image = Compose([LoadImaged("image"), EnsureChannelFirstd("image")])({"image": str(source)})["image"]
    sample = {"image": image, "pred": image * 0, "report": report}
    if as_written is not None:
        sample["report_as_written"] = as_written
    SaveOutputsd("pred", tmp_path / "out", formats=("overlay",))(sample)
    assert seen["caption"] == caption

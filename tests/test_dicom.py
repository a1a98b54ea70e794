"""Single-frame DICOM reading: rescale, window, MONOCHROME1, spacing, UIDs, and named errors."""

import copy

import numpy as np
import pytest
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from scripts.dicom import DicomImageReader
from scripts.errors import error_chain


def _load(path, **kwargs):
    load = Compose([LoadImaged("image", reader=DicomImageReader(**kwargs)), EnsureChannelFirstd("image")])
    return load({"image": path if isinstance(path, list) else str(path)})["image"]


def make_dx(path, pixels, mono1=True, spacing=(0.2, 0.25), with_pixels=True):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "DX", "ANON"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.ImagerPixelSpacing = list(spacing)
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_ct_slice_gets_hounsfield_units_spacing_and_uids():
    import pydicom
    from pydicom.pixels import apply_modality_lut

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    image = _load(path, apply_window=False)
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert image.shape == (1, ds.Columns, ds.Rows)
    np.testing.assert_allclose(image[0, 10, 3].item(), hu[3, 10])  # MONAI order: column first
    np.testing.assert_allclose(image.meta["spacing"], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])
    assert image.meta["SeriesInstanceUID"] == ds.SeriesInstanceUID and image.meta["Modality"] == "CT"


def test_monochrome1_radiograph_is_inverted_with_imager_spacing(tmp_path):
    pixels = np.full((30, 40), 4000)
    pixels[5:10, 2:8] = 100  # low values are bright in MONOCHROME1: the lesion
    make_dx(tmp_path / "dx.dcm", pixels, mono1=True, spacing=(0.2, 0.25))
    image = _load(tmp_path / "dx.dcm")
    assert image.shape == (1, 40, 30)
    assert image[0, 3, 7] > image[0, 30, 20]  # the lesion is the bright part after inversion
    np.testing.assert_allclose(image.meta["spacing"], [0.25, 0.2])
    plain = make_dx(tmp_path / "dx2.dcm", pixels, mono1=False)
    assert _load(tmp_path / "dx2.dcm")[0, 3, 7] < _load(tmp_path / "dx2.dcm")[0, 30, 20]
    assert plain.PhotometricInterpretation == "MONOCHROME2"


@pytest.mark.parametrize("photometric, shape, inverted", [
    ("MONOCHROME2", "INVERSE", True),  # was read as is: the presentation LUT shape was ignored
    ("MONOCHROME1", "INVERSE", True),
    ("MONOCHROME1", "IDENTITY", False),
    ("MONOCHROME2", "IDENTITY", False),
])
def test_the_presentation_lut_shape_decides_the_inversion_as_highdicom_reads_it(tmp_path, photometric, shape,
                                                                               inverted):
    import highdicom as hd
    import pydicom

    pixels = np.full((30, 40), 4000)
    pixels[5:10, 2:8] = 100
    make_dx(tmp_path / "dx.dcm", pixels, mono1=photometric == "MONOCHROME1")
    ds = pydicom.dcmread(tmp_path / "dx.dcm")
    ds.PresentationLUTShape = shape
    ds.save_as(tmp_path / "dx.dcm")
    image = np.asarray(_load(tmp_path / "dx.dcm", percentiles=None)[0])
    assert (image[3, 7] > image[30, 20]) == inverted  # [column, row]: the low-valued patch brighter if inverted
    reference = hd.imread(str(tmp_path / "dx.dcm")).get_frame(1, dtype=np.float32, apply_presentation_lut=True)
    assert (reference[7, 3] > reference[20, 30]) == inverted  # highdicom agrees


def _messages(error: BaseException) -> str:
    # MONAI wraps a transform's error ("applying transform ..."); the reader's message is in the chain
    return "\n".join(map(str, error_chain(error)))


def test_corrupt_dicom_and_missing_pixel_data_are_named(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\x00" * 64 + b"not a dicom file")
    with pytest.raises(Exception) as error:
        _load(bad)
    assert "broken.dcm: unreadable or corrupt DICOM" in _messages(error.value)
    make_dx(tmp_path / "sr.dcm", np.zeros((4, 4)), with_pixels=False)
    with pytest.raises(Exception) as error:
        _load(tmp_path / "sr.dcm")
    assert "sr.dcm: DICOM file has no pixel data" in _messages(error.value)


def test_a_folder_mixing_two_series_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    make_dx(folder / "a", np.zeros((8, 8)))
    make_dx(folder / "b", np.zeros((8, 8)))
    with pytest.raises(Exception) as error:
        _load(folder)
    assert f"{folder}: folder mixes 2 DICOM series" in _messages(error.value)
    single = tmp_path / "one"
    single.mkdir()
    make_dx(single / "x", np.zeros((8, 12)))
    assert _load(single).shape == (1, 12, 8)


def test_a_slab_of_a_ct_volume_becomes_one_2d_image(tmp_path):
    import nibabel as nib

    from scripts.transforms import SelectSlab

    data = np.random.default_rng(0).normal(size=(16, 12, 5)).astype(np.float32)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ct.nii.gz")
    load = Compose([LoadImaged("image", reader="NibabelReader"), EnsureChannelFirstd("image")])
    volume = load({"image": str(tmp_path / "ct.nii.gz")})["image"]
    assert volume.shape == (1, 16, 12, 5)
    middle = SelectSlab("middle", thickness=3, reduce="mean")(volume)
    assert middle.shape == (1, 16, 12)
    np.testing.assert_allclose(np.asarray(middle[0]), data[..., 1:4].mean(axis=-1), rtol=1e-5, atol=1e-6)
    mip = SelectSlab(4, thickness=3, reduce="max")(volume)  # clipped to the last three slices
    np.testing.assert_allclose(np.asarray(mip[0]), data[..., 2:5].max(axis=-1))
    assert float(middle.meta["affine"][2, 3]) == pytest.approx(2.5 * 1)  # moved to the slab's first slice
    assert SelectSlab()(middle) is middle  # 2D passes unchanged
    with pytest.raises(ValueError, match="slice 9 requested from a series of 5"):
        SelectSlab(9)(volume)


def make_ct_series(folder, n=6, gap=2.5, orientation=(1, 0, 0, 0, 1, 0), series_uid=None, study_uid=None):
    """n slices of CT_small.dcm as one series, written under shuffled file names with InstanceNumbers that do not
    follow the slice positions; slice k (in position order) has its pixels raised by 10·k."""
    import pydicom

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    orientation = np.asarray(orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.asarray(template.ImagePositionPatient, dtype=float)
    series_uid, study_uid = series_uid or generate_uid(), study_uid or template.StudyInstanceUID
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(1).permutation(n)
    base = template.pixel_array.copy()
    for k in range(n):
        ds = copy.deepcopy(template)  # a shallow copy shares the data elements: PixelData would leak between slices
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + normal * gap * k]
        ds.InstanceNumber = int(n - k)
        ds.PixelData = (base + 10 * k).astype(base.dtype).tobytes()
        ds.save_as(folder / f"IM{order[k]:04d}", enforce_file_format=True)
    return series_uid


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (0.8660254, 0.5, 0, -0.5, 0.8660254, 0)])
def test_a_ct_series_folder_is_one_volume_in_slice_order_with_the_itk_geometry(tmp_path, orientation):
    import pydicom
    from monai.data import ITKReader
    from pydicom.pixels import apply_modality_lut

    make_ct_series(tmp_path / "ct", n=6, gap=2.5, orientation=orientation)
    volume = _load(tmp_path / "ct", apply_window=False)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = apply_modality_lut(template.pixel_array, template).astype(np.float32)
    assert volume.shape == (1, template.Columns, template.Rows, 6)
    for k in range(6):  # position order, whatever the file names and InstanceNumbers say
        np.testing.assert_allclose(np.asarray(volume[0, :, :, k]), hu.T + 10 * k * float(template.RescaleSlope))
    np.testing.assert_allclose(volume.meta["spacing"][2], 2.5, rtol=1e-4)
    # MONAI's ITK reader (GDCM series sorting, LPS -> RAS) agrees on the voxels and on the geometry
    reference = Compose([LoadImaged("image", reader=ITKReader()), EnsureChannelFirstd("image")])(
        {"image": str(tmp_path / "ct")})["image"]
    np.testing.assert_allclose(np.asarray(volume), np.asarray(reference), atol=1e-3)
    np.testing.assert_allclose(np.asarray(volume.meta["affine"]), np.asarray(reference.meta["affine"]), atol=1e-3)


def test_a_series_as_a_file_list_and_lists_mixing_series(tmp_path):
    make_ct_series(tmp_path / "a", n=4)
    make_ct_series(tmp_path / "b", n=3)
    files_a = sorted(str(p) for p in (tmp_path / "a").iterdir())
    assert _load(files_a, apply_window=False).shape[-1] == 4
    with pytest.raises(Exception) as error:
        _load(files_a + [str(next((tmp_path / "b").iterdir()))])
    assert "the files belong to 2 DICOM series" in _messages(error.value)


def test_a_series_with_two_slices_at_one_position_is_refused(tmp_path):
    import pydicom

    make_ct_series(tmp_path / "ct", n=3)
    files = sorted((tmp_path / "ct").iterdir())
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "ct" / "copy", enforce_file_format=True)
    with pytest.raises(Exception) as error:
        _load(tmp_path / "ct")
    assert f"{tmp_path / 'ct'} (4 files of series" in _messages(error.value)
    assert "two slices at the same position" in _messages(error.value)


def test_a_real_monochrome1_chest_radiograph(caplog):
    """RG1_UNCR.dcm (pydicom-data): a CR chest film, MONOCHROME1, 15-bit, window 15000/30000, and an
    ImagerPixelSpacing of 0 — the reader must invert it, keep the film's window and refuse the zero spacing."""
    import pydicom

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data is not installed (pip install -r requirements-dev.txt)")
    ds = pydicom.dcmread(path)
    with caplog.at_level("WARNING"):
        image = _load(path)
    assert "no usable PixelSpacing" in caplog.text
    assert image.shape == (1, ds.Columns, ds.Rows)
    np.testing.assert_allclose(image.meta["spacing"], [1.0, 1.0])
    raw = ds.pixel_array.astype(np.float32).T
    # MONOCHROME1: the highest stored values are the darkest after reading, and the mapping is monotone
    flat_raw, flat = raw.ravel()[::97], np.asarray(image[0]).ravel()[::97]
    rank = np.argsort(flat_raw)
    assert np.all(np.diff(flat[rank]) <= 1e-3)
    assert flat[rank[-1]] < flat[rank[0]]
    # and the anatomy reads as a radiologist expects: mediastinum and spine brighter than the lung fields
    a, w = np.asarray(image[0]), image.shape[1]
    rows = slice(int(0.3 * ds.Rows), int(0.55 * ds.Rows))
    centre = a[int(0.47 * w):int(0.53 * w), rows].mean()
    lungs = (a[int(0.22 * w):int(0.32 * w), rows].mean() + a[int(0.68 * w):int(0.78 * w), rows].mean()) / 2
    assert centre > lungs + 0.1 * (a.max() - a.min())


def test_percentile_window_for_a_radiograph_without_a_window(tmp_path):
    pixels = np.random.default_rng(0).integers(1000, 2000, size=(40, 50))
    pixels[0, :4] = 4095  # a burned-in marker: alone it would set the top of the intensity range
    make_dx(tmp_path / "dx.dcm", pixels, mono1=False)
    clipped = np.asarray(_load(tmp_path / "dx.dcm")[0])
    assert clipped.max() < 2000 and clipped.min() >= 1000
    full = np.asarray(_load(tmp_path / "dx.dcm", percentiles=None)[0])
    assert full.max() == 4095

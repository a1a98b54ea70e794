"""Single-frame DICOM reading: rescale, window, MONOCHROME1, spacing, UIDs, and named errors."""

import numpy as np
import pytest
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from scripts.dicom import DicomImageReader


def _load(path, **kwargs):
    load = Compose([LoadImaged("image", reader=DicomImageReader(**kwargs)), EnsureChannelFirstd("image")])
    return load({"image": str(path)})["image"]


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


def _messages(error: BaseException) -> str:
    # MONAI wraps a transform's error ("applying transform ..."); the reader's message is in the chain
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


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

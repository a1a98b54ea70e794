"""Which files are images: one suffix list (``scripts/image_files.py``) for inference over a folder, the datalist
builders, the DICOM reader and the mask writer, and every listed format loads through the inference config."""

from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import config
from monai.bundle import ConfigParser
from PIL import Image
from test_dicom import make_dx

from scripts.data import inference_datalist
from scripts.image_files import IMAGE_SUFFIXES, image_stem, is_image, is_raster

ROWS, COLS = 10, 12


def _write_every_format(folder: Path) -> list[str]:
    """One ROWS×COLS image per suffix of IMAGE_SUFFIXES (a raster one in upper case), and two files that are not
    images; returns the image names."""
    pixels = np.arange(ROWS * COLS, dtype=np.uint8).reshape(ROWS, COLS)
    names = []
    for i, suffix in enumerate(IMAGE_SUFFIXES):
        name = f"i{i}{suffix.upper() if suffix == '.jpg' else suffix}"
        if suffix.startswith(".nii"):
            nib.save(nib.Nifti1Image(pixels.T.astype(np.float32), np.eye(4)), folder / name)  # MONAI order: x first
        elif suffix in (".dcm", ".dicom"):
            make_dx(folder / name, pixels.astype(np.uint16) * 10)
        else:
            Image.fromarray(pixels).save(folder / name)
        names.append(name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "DICOMDIR.json").write_text("{}")
    return names


def test_inference_over_a_folder_takes_every_format_the_config_reads(tmp_path):
    """.bmp, .tif, .tiff and .dicom images were left out of a folder without a datalist, though the readers load
    them (and the mask writer knew them)."""
    names = _write_every_format(tmp_path)
    items = inference_datalist(tmp_path, None, "test")
    assert sorted(Path(item["image"]).name for item in items) == sorted(names)
    parser = ConfigParser()
    parser.read_config(config("inference.yaml"))
    preprocessing = parser.get_parsed_content("preprocessing")
    for item in items:
        sample = preprocessing(item)
        assert tuple(sample["image_display"].shape) == (1, COLS, ROWS), item["image"]  # read at its own size
        assert tuple(sample["image"].shape) == (1, *parser.get_parsed_content("spatial_size"))


def test_image_suffixes_are_matched_whole_and_in_any_case():
    assert image_stem("/data/scan.NII.GZ") == "scan" and image_stem("case.v2.png") == "case.v2"
    assert image_stem("IM0001") == "IM0001" and image_stem("notes.txt") == "notes.txt"
    assert is_raster("x.TIFF") and not is_raster("x.dcm") and not is_raster("x.nii.gz")
    assert is_image("x.dicom") and is_image("x.nii") and not is_image("x.gz") and not is_image("x.txt")

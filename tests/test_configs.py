"""Values that train.yaml and inference.yaml must agree on.

MONAI Label reads each of them alone (its train task train.yaml, its infer task inference.yaml), so each must be
complete and the network and data settings stand in both; this test keeps them from drifting apart."""

import pytest
from conftest import config
from monai.bundle import ConfigParser

SHARED = [
    "network_def", "spatial_size", "max_report_tokens", "text_encoder_dir", "image_encoder_size", "image_encoder_dir",
    "report_left_is_image_left", "volume_slice", "volume_slab_thickness", "precision", "compute_dtype",
    "channels_last", "memory_format", "tokenizer",
]


def _raw(name: str) -> dict:
    return ConfigParser.load_config_file(config(name))


@pytest.mark.parametrize("key", SHARED)
def test_train_and_inference_configs_agree(key):
    train, infer = _raw("train.yaml"), _raw("inference.yaml")
    assert key in train and key in infer
    assert train[key] == infer[key], f"{key}: train.yaml {train[key]!r} != inference.yaml {infer[key]!r}"


def test_no_network_file_restates_the_default_network():
    """networks/tmca.yaml once repeated train.yaml's whole network_def; the ablation files change one switch."""
    import glob
    from pathlib import Path

    for path in glob.glob(config("networks/tmca*.yaml")):
        keys = set(ConfigParser.load_config_file(path))
        assert "network_def" not in keys, f"{Path(path).name} restates network_def; override its keys instead"
        # network_def#... or a top-level switch: these files merge on top of inference.yaml too, which has no loss
        assert all(k.startswith("network_def#") or "#" not in k for k in keys), (Path(path).name, keys)


def test_multi_gpu_config_adds_only_what_distribution_changes():
    """multi_gpu_train.yaml once repeated train.yaml's initialize and run lists word for word."""
    train, multi = _raw("train.yaml"), _raw("multi_gpu_train.yaml")
    for key in multi:
        if key in train and not key.startswith(("device", "network")):
            assert multi[key] != train[key], f"multi_gpu_train.yaml repeats train.yaml's {key}"
    assert not {"initialize", "run", "training"} & set(multi)

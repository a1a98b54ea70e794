"""bundle/load.py: the configs as ``monai.bundle run`` reads them, and the one checkpoint contract of the tooling
(weights only, bare state dict or training checkpoint, strict, errors that name the file and the problem)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT, config
from torch import nn

from bundle.load import bundle_parser, checkpoint_weights, fit_weights, load_checkpoint


def _net() -> nn.Module:
    # a parameter and buffers (BatchNorm's running statistics and its integer counter), as real networks have
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = _net()
    with torch.no_grad():
        net[1].running_mean.uniform_()
    return net.state_dict()


# -- bundle_parser --------------------------------------------------------------------------------------------------

def test_parser_merges_the_configs_in_order_with_metadata_root_and_overrides():
    parser = bundle_parser([config("train.yaml"), config("networks/unet.yaml")], {"max_epochs": 3})
    meta = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
    assert parser["_meta_"]["version"] == meta["version"]
    assert parser["bundle_root"] == str(BUNDLE_ROOT)
    assert parser["network_def"]["_target_"] == "UNet"  # the later file wins
    assert parser["learning_rate"] == 0.001  # the earlier file's keys stay
    assert parser["max_epochs"] == 3


def test_parser_reads_the_metadata_of_the_root_it_is_given_and_overrides_win(tmp_path):
    shutil.copytree(BUNDLE_ROOT / "configs", tmp_path / "configs")
    meta = json.loads((tmp_path / "configs" / "metadata.json").read_text())
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps({**meta, "version": "9.9.9"}))
    parser = bundle_parser(tmp_path / "configs" / "inference.yaml", root=tmp_path)  # one file, not a list
    assert parser["_meta_"]["version"] == "9.9.9" and parser["bundle_root"] == str(tmp_path)
    assert parser.get_parsed_content("ckpt_dir") == f"{tmp_path}/models"
    other = bundle_parser(tmp_path / "configs" / "inference.yaml", {"bundle_root": "/elsewhere"}, root=tmp_path)
    assert other["bundle_root"] == "/elsewhere"


# -- checkpoints: what loads ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["state dict", "training checkpoint"])
def test_loads_a_state_dict_and_the_model_entry_of_a_training_checkpoint(tmp_path, layout):
    state = _state()
    path = tmp_path / "model.pt"
    if layout == "state dict":
        torch.save(state, path)
    else:  # as CheckpointSaver writes checkpoint_epoch=N.pt
        torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "trainer": {"epoch": 2}}, path)
    net = _net()
    assert load_checkpoint(net, path) is net
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)


def test_float16_weights_load_into_a_float32_network(tmp_path):
    state = _state()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "half.pt")
    net = load_checkpoint(_net(), tmp_path / "half.pt")
    assert net[0].weight.dtype == torch.float32
    torch.testing.assert_close(net[0].weight, state["0.weight"], atol=1e-3, rtol=1e-3)


def test_weights_read_once_fit_several_networks(tmp_path):
    torch.save({"model": _state()}, tmp_path / "model.pt")
    weights = checkpoint_weights(tmp_path / "model.pt")
    first, second = fit_weights(_net(), weights, "model.pt"), fit_weights(_net(), weights, "model.pt")
    torch.testing.assert_close(first[1].running_mean, second[1].running_mean)


# -- checkpoints: what does not, and says which file and why --------------------------------------------------------

class _NotWeights:
    """A pickled Python object: ``weights_only`` refuses to run the code that rebuilds it."""


def _write(builder: Callable[[Path], None]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "model.pt"
        builder(path)
        return path
    return make


def _without_first_key(path: Path) -> None:
    state = _state()
    state.pop(min(state))
    torch.save(state, path)


def _truncated(path: Path) -> None:
    torch.save(_state(), path)
    path.write_bytes(path.read_bytes()[:100])


BAD = {
    "missing file": (lambda folder: folder / "absent.pt", FileNotFoundError, "no such file"),
    "a folder": (lambda folder: folder, FileNotFoundError, "a folder, not a file"),
    "text file": (_write(lambda p: p.write_text("not a checkpoint")), ValueError, "cannot be read as a PyTorch"),
    "truncated file": (_write(_truncated), ValueError, "cannot be read as a PyTorch"),
    "pickled object": (_write(lambda p: torch.save({"net": _NotWeights()}, p)), ValueError, "cannot be read as a Py"),
    "a tensor": (_write(lambda p: torch.save(torch.zeros(3), p)), ValueError, "holds a Tensor, not network weights"),
    "a list": (_write(lambda p: torch.save([_state()], p)), ValueError, "holds a list, not network weights"),
    "integer keys": (_write(lambda p: torch.save({0: torch.zeros(1)}, p)), ValueError, "holds a dict, not network"),
    "missing key": (_write(_without_first_key), RuntimeError, "Missing key(s)"),
    "unexpected key": (_write(lambda p: torch.save({**_state(), "extra": torch.zeros(1)}, p)), RuntimeError,
                       "Unexpected key(s)"),
    "wrong shape": (_write(lambda p: torch.save({**_state(), "0.weight": torch.zeros(2, 1, 5, 5)}, p)), RuntimeError,
                    "size mismatch for 0.weight"),
    "training checkpoint of another network": (
        _write(lambda p: torch.save({"model": nn.Linear(2, 2).state_dict()}, p)), RuntimeError, "Missing key(s)"),
    "training checkpoint without a model entry": (
        _write(lambda p: torch.save({"network": _state(), "optimizer": {}}, p)), RuntimeError, "Unexpected key(s)"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_checkpoint_is_refused_naming_the_file_and_the_problem(tmp_path, case):
    make, error, problem = BAD[case]
    path = make(tmp_path)
    with pytest.raises(error) as raised:
        load_checkpoint(_net(), path)
    message = str(raised.value)
    assert str(path) in message and problem in message
    if error is RuntimeError:
        assert "does not fit Sequential" in message

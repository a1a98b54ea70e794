"""`python -m bundle ship`: the steps that refuse a run before anything in the bundle changes (the end-to-end
shipping of a trained demo run is in test_workflows.py, beside its training)."""

import hashlib
import json
import shutil

import pytest
import torch
from conftest import BUNDLE_ROOT

from bundle.load import bundle_parser
from bundle.ship import ShipError, half_weights, ship


def _bundle_copy(tmp_path):
    """A bundle root to ship into: its configs and a models/model.pt to be replaced."""
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE_ROOT / "configs", root / "configs")
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(b"the shipped model before")
    return root


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_half_weights_casts_floats_only_and_refuses_what_float16_cannot_hold():
    weights = {"w": torch.tensor([1.5, -2.25]), "steps": torch.tensor([3]), "flag": torch.tensor([True])}
    half = half_weights(weights, "run/models/model.pt")
    assert half["w"].dtype == torch.float16 and torch.equal(half["w"].float(), weights["w"])
    assert half["steps"].dtype == torch.int64 and half["flag"].dtype == torch.bool
    # an inf that was there stays (not a new overflow); a large finite value would become inf: refused by name
    assert torch.isinf(half_weights({"b": torch.tensor([float("inf")])}, "x")["b"]).all()
    with pytest.raises(ShipError, match=r"run/models/model.pt: big holds values up to 7e\+04"):
        half_weights({"big": torch.tensor([1.0, 70000.0])}, "run/models/model.pt")


def test_ship_refuses_a_run_trained_with_other_switches_and_changes_nothing(tmp_path):
    root = _bundle_copy(tmp_path)
    run = tmp_path / "run"
    parser = bundle_parser(root / "configs" / "inference.yaml", {"network_def#alignment_position": False}, root=root)
    (run / "models").mkdir(parents=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), run / "models" / "model.pt")
    before = _digest(root)
    with pytest.raises(RuntimeError, match=r"(?s)run/models/model.pt: does not fit TMCA.*align_position.*"
                                           r"make the defaults the run's"):
        ship(run, tmp_path, root=root)
    assert _digest(root) == before and not (run / "shipped").exists()


def test_ship_refuses_a_run_without_weights(tmp_path):
    root = _bundle_copy(tmp_path)
    before = _digest(root)
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*run/models/model.pt: no such file"):
        ship(tmp_path / "run", tmp_path, root=root)
    assert _digest(root) == before


def test_ship_refuses_weights_over_the_size_limit(tmp_path):
    root = _bundle_copy(tmp_path)
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    network = bundle_parser(root / "configs" / "inference.yaml", root=root).get_parsed_content("network_def")
    torch.save(network.state_dict(), run / "models" / "model.pt")
    before = _digest(root)
    with pytest.raises(ShipError, match=r"shipped/model.pt is \d+\.\d MB, over the 1.0 MB limit"):
        ship(run, tmp_path, root=root, max_model_mb=1.0)
    assert _digest(root) == before
    assert json.loads((root / "configs" / "metadata.json").read_text()) == json.loads(
        (BUNDLE_ROOT / "configs" / "metadata.json").read_text())


def test_the_command_line_passes_extra_lists_and_evaluation_overrides(monkeypatch, capsys):
    import bundle.ship
    from bundle.__main__ import main

    seen = {}
    monkeypatch.setattr(bundle.ship, "ship", lambda *a, **k: seen.update(args=a, **k) or {"val_dice_mean": 0.5})
    assert main(["ship", "runs/r", "--dataset-dir", "runs", "--extra", "without_reports=a.json", "free=b.json",
                 "--max-model-mb", "0", "--", "--device", "cuda:0"]) == 0
    assert seen["args"] == ("runs/r", "runs")
    assert seen["extra_datalists"] == {"without_reports": "a.json", "free": "b.json"}
    assert seen["overrides"] == ["--device", "cuda:0"] and seen["max_model_mb"] is None
    assert '"val_dice_mean": 0.5' in capsys.readouterr().out
    assert main(["ship", "runs/r", "--dataset-dir", "runs", "--extra", "no_equals_sign"]) == 2
    assert "--extra 'no_equals_sign': expected NAME=DATALIST" in capsys.readouterr().err


def test_an_undefined_figure_ships_as_null_with_a_warning(caplog):
    from bundle.ship import _figure

    assert _figure("val_dice_mean", 0.789666) == 0.7897
    with caplog.at_level("WARNING", logger="bundle.ship"):
        assert _figure("val_outside_named", float("nan")) is None
    assert "val_outside_named is nan" in caplog.text and "written as null" in caplog.text

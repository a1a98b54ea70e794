"""The bad-input matrix (issue 20): each row is an input a PACS export, a research folder or a typo can contain,
the command path it goes through, and what it must get — an error that names the file and the problem, or a
logged, counted skip. Never a silent wrong result."""

import json
import logging
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import FAST, captured_logs, config
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from scripts.errors import error_chain


def _nifti(path, value=None, where=(3, 4)):
    data = np.random.rand(64, 64).astype(np.float32)
    if value is not None:
        data[where] = value
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _mask(path, size=None):
    data = np.zeros(size or (64, 64), dtype=np.float32)
    data[10:30, 10:30] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _dataset(tmp_path, bad_image=None, bad_label=None, label_size=None):
    """A 6-sample NIfTI data set; sample 2's image or label holds the given non-finite value, or its label has
    another size."""
    entries = []
    for i in range(6):
        image = _nifti(tmp_path / f"img{i}.nii.gz", bad_image if i == 2 else None)
        label = _mask(tmp_path / f"seg{i}.nii.gz", label_size if i == 2 else None)
        if i == 2 and bad_label is not None:
            data = np.asarray(nib.load(label).dataobj).copy()
            data[0, 0] = bad_label
            nib.save(nib.Nifti1Image(data, np.eye(4)), label)
        entries.append({"id": f"s{i}", "image": image.name, "label": label.name, "report": "lower left lung."})
    (tmp_path / "datalist.json").write_text(
        json.dumps({"training": entries[:4], "validation": entries[4:], "test": entries[:3]})
    )
    return tmp_path


def _train(root, data):
    wf = ConfigWorkflow(
        config_file=config("train.yaml"), meta_file=config("metadata.json"), workflow_type="train",
        bundle_root=str(root), dataset_dir=str(data), **FAST,
    )
    wf.initialize()
    wf.run()


def _infer(root, data):
    from conftest import BUNDLE_ROOT

    wf = ConfigWorkflow(
        config_file=config("inference.yaml"), meta_file=config("metadata.json"), workflow_type="infer",
        bundle_root=str(BUNDLE_ROOT), dataset_dir=str(data), output_dir=str(root / "out"),
    )
    wf.initialize()
    wf.run()


# input | command path | expected error text (the file and the problem)
MATRIX = [
    pytest.param({"bad_image": np.nan}, _train, r"img2\.nii\.gz \(image\): 1 of 4096 values are not finite \(1 NaN",
                 id="nan-pixel-train"),
    pytest.param({"bad_image": np.inf}, _train, r"img2\.nii\.gz \(image\): 1 of 4096 values are not finite \(0 NaN, 1",
                 id="inf-pixel-train"),
    pytest.param({"bad_label": np.nan}, _train, r"seg2\.nii\.gz \(label\): 1 of 4096 values are not finite",
                 id="nan-label-train"),
    pytest.param({"label_size": (64, 48)}, _train,
                 r"seg2\.nii\.gz \(label\) is 64×48 pixels but .*img2\.nii\.gz \(image\) is 64×64: they must be "
                 "pixel-aligned", id="mask-of-another-size-train"),
]


def _messages(exc: BaseException) -> str:
    """The messages of an exception and of every exception it was raised from (MONAI's config instantiation and
    datasets wrap the original error)."""
    return "\n".join(map(str, error_chain(exc)))


@pytest.mark.parametrize("case, command, expected", MATRIX)
def test_bad_input_gets_an_error_naming_the_file(case, command, expected, tmp_path):
    (tmp_path / "data").mkdir()
    data = _dataset(tmp_path / "data", **case)
    with pytest.raises(Exception) as info:
        command(tmp_path / "root", data)
    assert re.search(expected, _messages(info.value)), _messages(info.value)


def _png(path, size=(64, 64)):
    from PIL import Image

    Image.fromarray((np.random.rand(*size) * 255).astype(np.uint8)).save(path)
    return path


def _truncated_png(path):
    data = _png(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy cut off mid-transfer
    return path


# inference goes on image by image: input | the problem named in its warning. Each bad image sits among good ones.
INFER_SKIP_MATRIX = [
    pytest.param(lambda d: _nifti(d / "bad.nii.gz", np.nan), r"bad\.nii\.gz: .*1 of 4096 values are not finite",
                 id="nan-pixel"),
    pytest.param(lambda d: _nifti(d / "bad.nii.gz", np.inf), r"bad\.nii\.gz: .*not finite \(0 NaN, 1", id="inf-pixel"),
    pytest.param(lambda d: _truncated_png(d / "bad.png"),
                 r"bad\.png: .*bad\.png: cannot decode the pixels, the file is truncated or corrupt", id="truncated-png"),
    pytest.param(lambda d: _png(d / "bad.png", (1, 1)), r"bad\.png: .*1×1", id="one-pixel-png"),
    pytest.param(lambda d: (d / "bad.png").write_bytes(b"") or d / "bad.png", r"bad\.png: ", id="empty-file"),
    pytest.param(lambda d: (d / "bad.dcm").write_bytes(b"not a dicom file" * 20) or d / "bad.dcm", r"bad\.dcm: ",
                 id="not-dicom"),
]


@pytest.mark.parametrize("make_bad, expected", INFER_SKIP_MATRIX)
def test_inference_names_skips_and_counts_a_bad_image_and_segments_the_rest(make_bad, expected, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "a_good.png")
    make_bad(data)
    _png(data / "z_good.png")  # after the bad one: must still be done
    with captured_logs("scripts.data", "scripts.engine") as records:
        _infer(tmp_path, data)
    messages = [r.getMessage() for r in records]
    skipped = [m for m in messages if m.startswith("inference: skipped")]
    assert len(skipped) == 1 and re.search(expected, skipped[0]), skipped
    assert any(m.startswith("inference: 2 image(s) segmented, 1 skipped") for m in messages), messages
    outputs = {p.name for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert any("a_good" in n for n in outputs) and any("z_good" in n for n in outputs), outputs
    assert not any(n.startswith("bad") for n in outputs), outputs


def test_inference_fails_when_no_image_could_be_segmented(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _truncated_png(data / "a.png")
    _nifti(data / "b.nii.gz", np.nan)
    with pytest.raises(Exception) as info:
        _infer(tmp_path, data)
    assert "inference: none of the 2 image(s) could be segmented" in _messages(info.value)


def _engine(network, loss_values, optimizer):
    """A MONAI SupervisedTrainer whose loss takes the given values in turn (NaN for a broken step)."""
    from monai.engines import SupervisedTrainer

    from scripts.guards import FiniteWeightsGuard, NonFiniteLossGuard

    values = iter(loss_values)

    def loss(pred, target):
        return pred.mean() * 0 + next(values)

    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[{"image": torch.rand(2, 3), "label": None}] *
        len(loss_values), network=network, optimizer=optimizer, loss_function=loss,
        prepare_batch=lambda b, d, nb, **k: (b["image"], torch.zeros(2, 2)), decollate=False,
    )
    NonFiniteLossGuard(max_consecutive=3, log_every=2).attach(trainer)
    FiniteWeightsGuard(network).attach(trainer)
    return trainer


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw-on-device", "plain-sgd-host-check"])
def test_a_nan_loss_skips_its_step_and_is_counted(fused, caplog):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True) if fused else torch.optim.SGD(net.parameters(), 0.1)
    before = [p.detach().clone() for p in net.parameters()]
    trainer = _engine(net, [float("nan"), float("nan")], opt)
    with caplog.at_level(logging.WARNING, logger="scripts.guards"):
        trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # no NaN reached the weights
    assert "2 training iteration(s) skipped for a non-finite loss" in caplog.text
    net2 = torch.nn.Linear(3, 2)
    _engine(net2, [1.0, float("nan"), 1.0], torch.optim.AdamW(net2.parameters(), lr=0.1, fused=True)).run()
    assert all(torch.isfinite(p).all() for p in net2.parameters())


def test_too_many_nan_losses_in_a_row_stop_the_run():
    net = torch.nn.Linear(3, 2)
    trainer = _engine(net, [float("nan")] * 4, torch.optim.AdamW(net.parameters(), lr=0.1, fused=True))
    with pytest.raises(RuntimeError, match="iterations in a row had a non-finite loss"):
        trainer.run()


def test_non_finite_weights_stop_the_run_before_anything_is_saved(tmp_path):
    net = torch.nn.Linear(3, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    trainer = _engine(net, [1.0], torch.optim.SGD(net.parameters(), 0.0))
    saved = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: saved.append(e.state.epoch))  # as the savers
    with pytest.raises(RuntimeError, match=r"epoch 1: 1 weight tensor\(s\) are not finite \(first: weight\)"):
        trainer.run()
    assert saved == []  # handlers attached after the guard (the savers) never ran


def test_files_kept_aside_within_one_second_never_overwrite_each_other(tmp_path, monkeypatch):
    """Two shipped models replaced in the same second (the clock stands still here): both are kept."""
    from scripts import io

    monkeypatch.setattr(io.time, "strftime", lambda fmt: "20261208-010203")
    dest = tmp_path / "model.pt"
    kept = []
    for content in (b"first", b"second", b"third"):
        dest.write_bytes(content)
        kept.append(io.keep_aside(dest))
    assert [p.name for p in kept] == ["model.replaced-20261208-010203.pt", "model.replaced-20261208-010203-1.pt",
                                      "model.replaced-20261208-010203-2.pt"]
    assert [p.read_bytes() for p in kept] == [b"first", b"second", b"third"]
    assert not dest.exists()


def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one(tmp_path):
    """SIGKILL in the middle of writing model.pt and checkpoint_epoch=2.pt: both previous files stay complete."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import BUNDLE_ROOT

    from scripts.engine import _AtomicDiskSaver, latest_checkpoint

    saver = _AtomicDiskSaver(tmp_path, "model.pt")
    saver({"model": {"w": torch.ones(3)}}, "ignored")
    epochs = _AtomicDiskSaver(tmp_path)
    epochs({"epoch": 1}, "checkpoint_epoch=1.pt")
    script = f"""
import sys, time, torch
sys.path.insert(0, {str(BUNDLE_ROOT)!r})
from scripts.engine import _AtomicDiskSaver

class Slow:
    def __reduce__(self):
        open({str(tmp_path / "writing")!r}, "w").close()
        time.sleep(60)  # killed here, half-way through torch.save
        return (dict, ())

saver = _AtomicDiskSaver({str(tmp_path)!r}, "model.pt")
saver.remove("model.pt")  # as ignite does before it saves
saver({{"model": Slow()}}, "ignored")
"""
    for target in ("model.pt", "checkpoint_epoch=2.pt"):
        (tmp_path / "writing").unlink(missing_ok=True)
        code = script if target == "model.pt" else script.replace('"model.pt")', 'None)').replace(
            'saver.remove(None)', 'saver.remove("checkpoint_epoch=1.pt")').replace('"ignored"', '"checkpoint_epoch=2.pt"')
        proc = subprocess.Popen([sys.executable, "-c", code])
        for _ in range(3000):  # up to 150 s: imports are slow on a loaded 2-core machine
            if (tmp_path / "writing").exists():
                break
            time.sleep(0.05)
        assert (tmp_path / "writing").exists(), "the writer never started"  # killed mid-write, not before
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert torch.load(tmp_path / "model.pt")["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert not (tmp_path / "checkpoint_epoch=2.pt").exists()
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=1.pt")


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path, caplog):
    from scripts.engine import latest_checkpoint

    torch.save({"epoch": 1}, tmp_path / "checkpoint_epoch=1.pt")
    torch.save({"epoch": 2, "w": torch.ones(1000)}, tmp_path / "checkpoint_epoch=2.pt")
    data = (tmp_path / "checkpoint_epoch=2.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="scripts.engine"):
        assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=1.pt")
    assert "checkpoint_epoch=3.pt is truncated or corrupt" in caplog.text
    assert "checkpoint_epoch=2.pt is truncated or corrupt" in caplog.text
    (tmp_path / "checkpoint_epoch=1.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="every 'checkpoint\\*.pt' training checkpoint .* is truncated"):
        latest_checkpoint(tmp_path)


def test_resume_from_a_checkpoint_written_before_it_kept_the_best_score(tmp_path, caplog):
    """A training checkpoint of an earlier version holds no best score and no early-stop state: the run resumes,
    saying that it starts both afresh."""
    from ignite.engine import Engine

    from scripts.engine import AtomicCheckpointSaver, BestMetricState, ResumableEarlyStopHandler, ResumeLoader

    net = torch.nn.Linear(2, 1)
    torch.save({"model": {k: v + 1 for k, v in net.state_dict().items()}}, tmp_path / "checkpoint_epoch=1.pt")
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True,
                                  key_metric_filename="model.pt")
    early_stop = ResumableEarlyStopHandler(patience=2, score_function=lambda e: 0.0)
    evaluator = Engine(lambda e, b: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1, -1  # as MONAI's workflow starts them
    loader = ResumeLoader(load_path=str(tmp_path / "checkpoint_epoch=1.pt"),
                          load_dict={"model": net, "best_model": saver, "early_stop": early_stop,
                                     "best_metric": BestMetricState(evaluator), "other_rank": None})
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs = 2
    with caplog.at_level(logging.WARNING, logger="scripts.engine"):
        loader(engine)
    assert torch.equal(net.weight, torch.load(tmp_path / "checkpoint_epoch=1.pt")["model"]["weight"])
    assert "written before the checkpoint kept 'best_model'" in caplog.text and "replaces model.pt" in caplog.text
    assert "'early_stop'" in caplog.text and "patience counts from 0" in caplog.text
    assert "'best_metric'" in caplog.text and "best value counts from the resume" in caplog.text
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (-1, -1)
    assert saver.state_dict() == {"best": []}


def _qata_like(root):
    from test_datalist import _folder_set

    return _folder_set(root, n=3)


def _csv(root, body: bytes):
    (root / "list.csv").write_bytes(b"image,mask,report\n" + body)
    return root / "list.csv"


# datalist builders: input | layout | expected error text (file and problem)
DATALIST_MATRIX = [
    pytest.param(lambda r: _csv(r, b"../../../../etc/passwd,masks/c0.png,left lung.\n"), "csv",
                 r"list\.csv: line 2: '\.\./\.\./\.\./\.\./etc/passwd' leaves", id="csv-image-path-traversal"),
    pytest.param(lambda r: _csv(r, b"images/c0.png,/etc/passwd,left lung.\n"), "csv",
                 r"list\.csv: line 2: '/etc/passwd' leaves", id="csv-absolute-label-outside"),
    pytest.param(lambda r: _csv(r, b"images/c0.png,,left lung.\n"), "csv",
                 r"list\.csv: line 2: empty 'mask' cell", id="csv-empty-cell"),
    pytest.param(lambda r: _csv(r, b"images/c0.png,masks/c0.png,left \xff lung.\n"), "csv",
                 r"list\.csv: not UTF-8 text", id="csv-not-utf8"),
    pytest.param(lambda r: (r / "split.json").write_text('{"train": "c0"}') and r, "folder",
                 r"split\.json: split 'train' must be a list of id strings", id="split-json-string-not-list"),
    pytest.param(lambda r: (r / "split.json").write_text('{"train": ["c0",') and r, "folder",
                 r"split\.json: not valid JSON", id="split-json-malformed"),
    pytest.param(lambda r: (r / "split.json").write_bytes(b'{"train": ["c\xff"]}') and r, "folder",
                 r"split\.json: not UTF-8 text", id="split-json-not-utf8"),
]


@pytest.mark.parametrize("make, layout, expected", DATALIST_MATRIX)
def test_a_bad_datalist_input_gets_an_error_naming_the_file(make, layout, expected, tmp_path):
    from bundle.datalist import DatalistError, build_datalist

    root = _qata_like(tmp_path / "d")
    target = make(root)
    with pytest.raises(DatalistError, match=expected):
        build_datalist(layout, target)


def test_a_non_utf8_csv_reads_with_encoding_errors_replace(tmp_path, caplog):
    from bundle.datalist import build_datalist

    root = _qata_like(tmp_path / "d")
    target = _csv(root, b"images/c0.png,masks/c0.png,left \xff lung.\n")
    dl = build_datalist("csv", target, encoding_errors="replace", val_fraction=0, test_fraction=0)
    assert dl.splits["training"][0]["report"] == "left \ufffd lung."
    assert "list.csv: bytes that are not UTF-8 were replaced" in caplog.text


def _datalist(tmp_path, **splits):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "datalist.json").write_text(json.dumps(splits))
    return tmp_path / "datalist.json"


def test_training_and_evaluation_lists_are_checked(tmp_path):
    from scripts.data import load_datalist

    entry = {"image": "a.png", "label": "a_seg.png", "report": "left lung."}
    with pytest.raises(ValueError, match=r"datalist .*datalist\.json: the 'training' list is empty"):
        load_datalist(_datalist(tmp_path / "empty", training=[], validation=[entry]), "training")
    with pytest.raises(ValueError, match=r"has no 'training' list; it has \['validation'\]"):
        load_datalist(_datalist(tmp_path / "none", validation=[entry]), "training")
    with pytest.raises(ValueError, match=r"1 image\(s\) are in both 'training' and 'validation' .*a\.png"):
        load_datalist(_datalist(tmp_path / "leak", training=[entry], validation=[entry]), "training",
                      disjoint_from="validation")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "datalist.json").write_text('{"training": [')
    with pytest.raises(ValueError, match=r"datalist .*bad/datalist\.json: not valid UTF-8 JSON"):
        load_datalist(tmp_path / "bad" / "datalist.json", "training")
    with pytest.raises(FileNotFoundError, match=r"datalist .*missing\.json not found"):
        load_datalist(tmp_path / "missing.json", "training")
    # an entry without id gets its image's stem, so that a batch mixing entries with and without one collates
    items = load_datalist(_datalist(tmp_path / "ids", training=[entry, {**entry, "image": "b.png", "id": "x"}]),
                          "training")
    assert [i["id"] for i in items] == ["a", "x"]


@pytest.mark.parametrize("content, expected", [
    (b"", r"checkpoint .*model\.pt: empty, truncated or not a PyTorch checkpoint \(0 bytes\)"),
    (b"PK\x03\x04 truncated", r"checkpoint .*model\.pt: empty, truncated or not a PyTorch checkpoint"),
    (None, r"checkpoint .*model\.pt: does not fit the network"),
], ids=["zero-byte", "truncated", "another-network"])
def test_inference_names_a_broken_model_pt(content, expected, tmp_path):
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    if content is None:
        torch.save({"not_a_weight": torch.ones(1)}, root / "models" / "model.pt")
    else:
        (root / "models" / "model.pt").write_bytes(content)
    (tmp_path / "data").mkdir()
    _nifti(tmp_path / "data" / "img.nii.gz")
    wf = ConfigWorkflow(
        config_file=config("inference.yaml"), meta_file=config("metadata.json"), workflow_type="infer",
        bundle_root=str(root), dataset_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"),
    )
    wf.initialize()
    with pytest.raises(Exception) as info:
        wf.run()
    assert re.search(expected, _messages(info.value)), _messages(info.value)


def test_a_one_pixel_image_is_named_not_a_writer_crash(tmp_path):
    from PIL import Image

    (tmp_path / "data").mkdir()
    Image.fromarray(np.full((1, 1), 128, dtype=np.uint8)).save(tmp_path / "data" / "tiny.png")
    with pytest.raises(Exception) as info:
        _infer(tmp_path, tmp_path / "data")
    assert re.search(r"tiny\.png \(image\): 1×1 pixels, below the 8-pixel minimum", _messages(info.value))


def test_a_missing_dataset_folder_is_said_last_not_buried_in_the_traceback(tmp_path):
    """A newcomer's first run without the demo data: MONAI wraps the error in several config-parser ones; the
    last line of the output must still say which file is missing and how to get it."""
    import subprocess
    import sys

    from conftest import BUNDLE_ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--meta_file", "configs/metadata.json",
         "--config_file", "configs/train.yaml", "--bundle_root", str(tmp_path),
         "--dataset_dir", str(tmp_path / "demo_data")],
        cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Cause (raised first, above): FileNotFoundError: datalist "), last
    assert f"the folder {tmp_path / 'demo_data'} does not exist" in last and "bundle demo-data" in last, last

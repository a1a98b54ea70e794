"""The bundle's configs run end to end as MONAI model-zoo tests run them."""

import json
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import BUNDLE_ROOT, FAST, bundle_tmca, config, tokenize_reports
from monai.bundle import ConfigWorkflow
from PIL import Image



def _workflow(config_file, workflow_type, root, demo_dir, **overrides):
    wf = ConfigWorkflow(
        config_file=config_file,
        meta_file=config("metadata.json"),
        logging_file=config("logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(root),
        dataset_dir=str(demo_dir),
        **overrides,
    )
    wf.initialize()
    assert wf.check_properties() == []
    return wf


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("bundle")
    wf = _workflow(config("train.yaml"), "train", root, demo_dir, **{**FAST, "log_model": True})
    wf.run()
    trainer = wf.train_trainer if hasattr(wf, "train_trainer") else wf.trainer
    state = trainer.state
    wf.finalize()
    return root, state


def test_training_saves_best_and_resumable_checkpoints(trained):
    root, state = trained
    assert state.epoch == 1
    assert (root / "models" / "model.pt").is_file()
    assert list((root / "models").glob("checkpoint_*1.pt"))
    saved = torch.load(root / "models" / "model.pt", weights_only=True)
    bundle_tmca().load_state_dict(saved.get("model", saved), strict=True)
    assert (root / "eval" / "mlruns.db").is_file()


def test_validation_logs_the_alignment_health_to_mlflow(trained):
    import mlflow

    root, _ = trained
    client = mlflow.MlflowClient(f"sqlite:///{root}/eval/mlruns.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = set(run.data.metrics)
    for s in (4, 8, 16, 32):
        assert {f"val_align_loss_s{s}", f"val_align_top1_s{s}", f"val_align_laterality_s{s}"} <= logged
    assert {"val_align_chance", "val_align_top1_prior", "val_align_laterality_prior"} <= logged
    # the learning rate on a readable scale (log10), not MONAI's raw value that the MLflow UI draws as 0
    assert run.data.metrics["lr_log10_group_0"] == pytest.approx(-3.0) and "lr_group_0" not in logged


def test_the_best_network_is_an_mlflow_model_that_loads_back_and_segments(trained):
    """`mlflow.pytorch.log_model` at the end of training: listed among the run's logged models with a signature,
    and `mlflow.pytorch.load_model` gives a network that reproduces model.pt's, with and without a report, at a
    batch size other than the input example's."""
    import mlflow

    from scripts.mlflow_model import INPUT_NAMES
    from scripts.weights import load_checkpoint

    root, _ = trained
    client = mlflow.MlflowClient(f"sqlite:///{root}/eval/mlruns.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.mlflow.runName LIKE 'train_%'")
    assert run.info.status == "FINISHED" and "model_not_logged" not in run.data.tags
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.source_run_id == run.info.run_id and model.name == "model"
    uri = f"models:/{model.model_id}"
    mlflow.set_tracking_uri(f"sqlite:///{root}/eval/mlruns.db")  # models:/ URIs resolve through the global URI
    try:
        info = mlflow.models.get_model_info(uri)
        loaded = mlflow.pytorch.load_model(uri)
    finally:
        mlflow.set_tracking_uri(None)
    assert [s.name for s in info.signature.inputs.inputs] == list(INPUT_NAMES)
    assert [s.name for s in info.signature.outputs.inputs] == ["pred"]
    assert info.signature.inputs.inputs[0].shape == (-1, 1, *FAST["spatial_size"])
    reference = load_checkpoint(bundle_tmca(), root / "models" / "model.pt").eval()
    ids, mask = tokenize_reports(["lower left lung.", "upper right lung.", "all right lung."])
    mask[1] = 0  # the second sample without its report
    image = torch.rand(1, 1, *FAST["spatial_size"], generator=torch.Generator().manual_seed(3)).repeat(3, 1, 1, 1)
    with torch.no_grad():
        expected, got = reference(image, ids, mask), loaded(image, ids, mask)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert got.shape == expected.shape == (3, 1, *FAST["spatial_size"])
    assert (got - expected).abs().max() < 1e-3
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # one image: the report changed the output


@pytest.mark.parametrize("before", [None, "sqlite:////somewhere/else.db"])
def test_logging_the_model_leaves_the_process_tracking_uri_as_it_found_it(trained, monkeypatch, before):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which MONAI's MLFlowHandler puts before its own
    tracking_uri: left behind, every later MLflow handler of the process (an evaluation after a training, a second
    training in a notebook or MONAI Label) logged into ./mlflow.db of the working folder instead of its store."""
    from types import SimpleNamespace

    import mlflow

    from scripts.mlflow_model import NetworkModelLogger
    from scripts.transforms import TokenizeReport

    root, _ = trained
    store = f"sqlite:///{root}/eval/mlruns.db"
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.mlflow.runName LIKE 'train_%'")
    seen = []
    monkeypatch.setattr(mlflow.pytorch, "log_model",  # the export itself is tested above; here only the URI
                        lambda *a, **k: seen.append(mlflow.get_tracking_uri()) or SimpleNamespace(model_uri="m"))
    if before is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
    logger = NetworkModelLogger(bundle_tmca(), root / "models" / "model.pt", TokenizeReport(), 1, FAST["spatial_size"])
    assert logger(run.info.run_id, store).model_uri == "m"
    assert seen == [store]  # logged into the training's own store
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("run_id", ["evaluating", "run"])  # "run": the zoo's default, `monai.bundle run` alone
def test_evaluate_writes_the_segmentation_and_report_consistency_metrics(trained, demo_dir, run_id):
    root, _ = trained
    (root / "eval" / "metrics.json").unlink(missing_ok=True)
    health = run_id == "evaluating"  # the alignment health on by default, switched off for the other run
    wf = _workflow(
        [config("train.yaml"), config("evaluate.yaml")], "train", root, demo_dir, run_id=run_id,
        eval_split="test", alignment_health=health, **FAST,
    )
    wf.run()
    wf.finalize()
    result = json.loads((root / "eval" / "metrics.json").read_text())
    assert result["split"] == "test"
    names = {"val_dice_mean", "val_dice_pooled", "val_iou_mean", "val_iou_pooled", "val_outside_named",
             "val_missed_zones"}
    health_names = {f"val_align_{m}_s{s}" for m in ("loss", "top1", "laterality") for s in (4, 8, 16, 32)}
    health_names |= {"val_align_chance", "val_align_top1_prior", "val_align_laterality_prior"}
    assert set(result["metrics"]) == (names | health_names if health else names)
    if health:
        assert all(0.0 <= result["metrics"][f"val_align_top1_s{s}"] <= 1.0 for s in (4, 8, 16, 32))
    # NaN only where no prediction had foreground (a 1-epoch model may predict none): then nothing lies outside
    assert all(0.0 <= result["metrics"][k] <= 1.0 for k in names - {"val_outside_named"})
    assert 0.0 <= result["metrics"]["val_outside_named"] <= 1.0 or result["metrics"]["val_missed_zones"] == 1.0
    csv = (root / "eval" / "metrics.csv").read_text()
    assert all(n in csv for n in names)
    import mlflow

    from scripts.io import file_sha256

    client = mlflow.MlflowClient(f"sqlite:///{root}/eval/mlruns.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.mlflow.runName LIKE 'evaluate_%'", order_by=["start_time DESC"])
    run = runs[0]  # this evaluation: the checkpoint it ran with, by path and hash, and its metrics files
    assert run.data.params["checkpoint_sha256"] == file_sha256(root / "models" / "model.pt")
    assert run.data.params["split"] == "test" and "max_epochs" not in run.data.params
    assert {"metrics.csv", "metrics.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    test_ids = [e["id"] for e in json.loads((demo_dir / "datalist.json").read_text())["test"]]
    for name in ("val_dice_mean", "val_iou_mean", "val_outside_named", "val_missed_zones"):  # per image, by id
        lines = (root / "eval" / f"{name}_raw.csv").read_text().splitlines()
        assert sorted(line.split(",")[0] for line in lines[1:]) == sorted(test_ids), name


def test_ship_evaluates_the_float16_file_then_installs_it_with_its_figures(trained, demo_dir, tmp_path):
    import shutil

    from bundle.freetext import write_freetext_datalists
    from bundle.ship import ShipError, ship
    from scripts.io import file_sha256

    run, _ = trained  # the training's bundle_root is its run folder: models/ and the MLflow store under eval/
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE_ROOT / "configs", root / "configs")
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(b"the model shipped before")
    data = json.loads((demo_dir / "datalist.json").read_text())  # its paths made absolute, to be read from here
    for entry in (e for split in ("training", "validation", "test") for e in data.get(split, [])):
        entry.update({k: str(demo_dir / entry[k]) for k in ("image", "label") if k in entry})
    (tmp_path / "datalist.json").write_text(json.dumps(data))
    _, noreport = write_freetext_datalists(tmp_path / "datalist.json")
    args = dict(datalist=tmp_path / "datalist.json", root=root, tracking_uri=f"sqlite:///{run}/eval/mlruns.db",
                overrides=["--spatial_size", "[64, 64]"])
    meta_before = (root / "configs" / "metadata.json").read_text()
    with pytest.raises(ShipError, match=r"(?s)evaluation 'broken' on .*missing.json failed"):
        ship(run, demo_dir, extra_datalists={"broken": tmp_path / "missing.json"}, **args)
    assert (root / "models" / "model.pt").read_bytes() == b"the model shipped before"  # a failed ship changes nothing
    assert (root / "configs" / "metadata.json").read_text() == meta_before

    got = ship(run, demo_dir, extra_datalists={"without_reports": noreport}, dataset="demo validation", **args)
    shipped = root / "models" / "model.pt"
    assert got["model_sha256"] == file_sha256(shipped) == file_sha256(run / "shipped" / "model.pt")
    weights = torch.load(shipped, weights_only=True)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    bundle_tmca().load_state_dict(weights, strict=True)
    assert [p.read_bytes() for p in (root / "models").glob("model.replaced-*.pt")] == [b"the model shipped before"]
    def no_nan(constant):  # strict JSON: an undefined figure is written as null, never NaN
        raise AssertionError(f"metadata.json holds {constant}")

    meta = json.loads((root / "configs" / "metadata.json").read_text(), parse_constant=no_nan)
    assert meta["eval_metrics"] == got and {k: v for k, v in meta.items() if k != "eval_metrics"} == {
        k: v for k, v in json.loads(meta_before).items() if k != "eval_metrics"}
    # the figures are those of the float16 file's own evaluations, by list
    for name, suffix in (("validation", ""), ("without_reports", "_without_reports")):
        result = json.loads((run / "shipped" / f"eval_{name}" / "metrics.json").read_text())
        assert result["checkpoint_sha256"] == got["model_sha256"]
        assert got[f"val_dice_mean{suffix}"] == round(result["metrics"]["val_dice_mean"], 4)
    assert {"val_dice_pooled", "val_iou_mean", "val_outside_named"} <= set(got)
    assert not any(k.startswith("val_align") for k in got)
    assert got["dataset"] == "demo validation"
    # the training command, found through the run record of the run's training checkpoint
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run}/eval/mlruns.db")
    (train_run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                    if "command" in r.data.params]
    assert got["training_command"] == train_run.data.params["command"]
    assert got["training_status"] == "FINISHED"


def test_ship_says_when_the_training_run_has_not_finished(trained, tmp_path, caplog):
    import shutil

    import mlflow

    from bundle.ship import training_run

    run, _ = trained
    shutil.copy(run / "eval" / "mlruns.db", tmp_path / "mlruns.db")  # the module's store stays as it is
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = mlflow.MlflowClient(uri)
    (train_run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                    if "command" in r.data.params]
    client.set_terminated(train_run.info.run_id, "KILLED")  # a training ended by a signal, or cut off
    with caplog.at_level("WARNING", logger="bundle.ship"):
        found = training_run(run, uri)
    assert found == {"training_command": train_run.data.params["command"], "training_status": "KILLED"}
    assert f"training run {train_run.info.run_id} of {run} is KILLED, not FINISHED" in caplog.text
    with caplog.at_level("WARNING", logger="bundle.ship"):
        assert training_run(tmp_path / "no_run") == {}
    assert "no training checkpoint with a run record" in caplog.text


def _infer(root, data_dir, out_dir):
    wf = _workflow(
        config("inference.yaml"), "infer", root, data_dir, output_dir=str(out_dir), spatial_size=FAST["spatial_size"]
    )
    wf.run()
    wf.finalize()


def test_inference_writes_png_masks_in_the_input_geometry(trained, demo_dir, tmp_path):
    root, _ = trained
    _infer(root, demo_dir, tmp_path)
    test_ids = [e["id"] for e in json.loads((demo_dir / "datalist.json").read_text())["test"]]
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == sorted(f"{i}_seg.png" for i in test_ids)
    mask = np.array(Image.open(tmp_path / written[0]))
    assert mask.shape == (224, 224) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}


def test_inference_without_reports_on_nifti_writes_nifti(trained, tmp_path):
    root, _ = trained
    data = tmp_path / "nifti"
    data.mkdir()
    affine = np.diag([0.5, 0.7, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.random.rand(96, 80).astype(np.float32), affine), data / "scan.nii.gz")
    out = tmp_path / "out"
    _infer(root, data, out)
    seg = nib.load(out / "scan_seg.nii.gz")
    assert seg.shape[:2] == (96, 80)
    np.testing.assert_allclose(seg.affine, affine, atol=1e-6)  # float32 spacing
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


def test_verify_net_in_out_with_the_image_alone(tmp_path):
    # MONAI's own check, as MONAI Label feeds the network: `image` only, `pred` out
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def", meta_file=config("metadata.json"), config_file=config("inference.yaml"),
        bundle_root=str(tmp_path), n=1, device="cpu",
    )


def test_inference_on_a_dicom_radiograph_keeps_its_spacing(trained, tmp_path):
    from test_dicom import make_dx

    root, _ = trained
    data = tmp_path / "dicom"
    data.mkdir()
    pixels = np.full((96, 80), 3000)
    pixels[20:40, 10:30] = 500
    make_dx(data / "cxr.dcm", pixels, mono1=True, spacing=(0.3, 0.2))
    out = tmp_path / "out"
    _infer(root, data, out)
    seg = nib.load(out / "cxr_seg.nii.gz")
    assert seg.shape[:2] == (80, 96)  # columns first, as MONAI reads every format
    np.testing.assert_allclose(np.diag(seg.affine)[:2], [0.2, 0.3], atol=1e-6)


def test_inference_on_a_ct_volume_segments_its_middle_slice(trained, tmp_path):
    root, _ = trained
    data = tmp_path / "ct"
    data.mkdir()
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.random.rand(40, 32, 5).astype(np.float32), affine), data / "ct.nii.gz")
    out = tmp_path / "out"
    _infer(root, data, out)
    seg = nib.load(out / "ct_seg.nii.gz")
    assert seg.shape[:2] == (40, 32)
    assert seg.affine[2, 3] == pytest.approx(3.0 * 2)  # slice 2 of 5, where the mask belongs


def test_inference_on_a_pacs_export_segments_each_series_in_place(trained, tmp_path):
    """A PACS export (nested folders, meaningless names): a CT series of 6 slices and a radiograph with a report
    beside it -> `datalist pacs` -> inference writes one mask per series, named by SeriesInstanceUID; the CT mask
    lies on the series' middle slice in patient space."""
    from monai.data import ITKReader
    from monai.transforms import LoadImage
    from test_dicom import make_ct_series, make_dx

    from bundle.datalist import build_datalist, write_datalist

    root, _ = trained
    export = tmp_path / "export"
    ct_uid = make_ct_series(export / "a" / "b", n=6, gap=2.0, orientation=(0.8660254, 0.5, 0, -0.5, 0.8660254, 0))
    (export / "c").mkdir()
    dx = make_dx(export / "c" / "1", np.full((96, 80), 3000), mono1=True, spacing=(0.3, 0.2))
    (export / "c" / "report.txt").write_text("left lower lung opacity.")
    write_datalist(build_datalist("pacs", export), export / "datalist.json")
    out = tmp_path / "out"
    _infer(root, export, out)
    # the default outputs: a NIfTI mask and a DICOM SEG per series
    uids = (ct_uid, dx.SeriesInstanceUID)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{u}_seg.{ext}" for u in uids for ext in ("nii.gz", "dcm"))
    for uid in uids:
        seg = pydicom.dcmread(out / f"{uid}_seg.dcm")
        assert seg.Modality == "SEG" and seg.SeriesInstanceUID != uid
        assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [uid]
    seg = nib.load(out / f"{ct_uid}_seg.nii.gz")
    assert seg.shape[:2] == (128, 128)
    volume_affine = np.asarray(LoadImage(reader=ITKReader(), image_only=True)(str(export / "a" / "b")).affine)
    np.testing.assert_allclose(seg.affine[:3, 3], (volume_affine @ [0, 0, 3, 1])[:3], atol=1e-3)  # slice 3 of 0-5
    np.testing.assert_allclose(seg.affine[:3, :2], volume_affine[:3, :2], atol=1e-4)


# configs/networks/<name>.yaml -> the class its network_def builds (TMCA and its ablations otherwise)
NETWORK_CLASSES = {"unet": "UNet", "guidedecoder": "GuideDecoder", "lvit": "LViTStyle", "reclmis": "RecLMIS",
                   "ssa": "SSA"}
NETWORK_CONFIGS = sorted(p.stem for p in (BUNDLE_ROOT / "configs" / "networks").glob("*.yaml"))


def _expected_class(network: str) -> str:
    if network in NETWORK_CLASSES:
        return NETWORK_CLASSES[network]
    assert network.startswith("tmca"), f"configs/networks/{network}.yaml: add the class it builds to NETWORK_CLASSES"
    return "TMCA"


@pytest.mark.slow
@pytest.mark.parametrize("network", NETWORK_CONFIGS)
def test_a_network_config_trains_on_train_yaml_and_infers_on_inference_yaml(network, demo_dir, tmp_path):
    """Every configs/networks file on top of train.yaml trains and saves model.pt; on top of inference.yaml (the
    docs promise both) that checkpoint loads strictly and segments the test split."""
    wf = _workflow([config("train.yaml"), config(f"networks/{network}.yaml")], "train", tmp_path, demo_dir, **FAST)
    wf.run()
    wf.finalize()
    assert (tmp_path / "models" / "model.pt").is_file()
    net, loss = wf.parser.get_parsed_content("network_def"), wf.parser.get_parsed_content("loss")
    assert type(net).__name__ == _expected_class(network)
    # each ablation switches off what it names, and only that
    if network.startswith("tmca"):
        no_levels = ("tmca_no_alignment", "tmca_image_only", "tmca_backbone")
        levels = [] if network in no_levels else [32] if network == "tmca_single_level" else [4, 8, 16, 32]
        assert net.use_text == (network != "tmca_image_only")
        assert list(net.alignment_levels) == levels
        assert net.enhancement == (network not in ("tmca_no_enhancement", "tmca_image_only", "tmca_backbone"))
        assert loss.target_sensitive == (network != "tmca_no_target")
        handlers = wf.parser.get_parsed_content("validate#handlers")
        (health,) = [h for h in handlers if type(h).__name__ == "AlignmentHealth"]
        assert health.target_sensitive == loss.target_sensitive  # the health measures what the loss trains

    out = tmp_path / "out"
    infer = _workflow(
        [config("inference.yaml"), config(f"networks/{network}.yaml")], "infer", tmp_path, demo_dir,
        output_dir=str(out), spatial_size=FAST["spatial_size"],
    )
    assert type(infer.parser.get_parsed_content("network_def")).__name__ == _expected_class(network)
    infer.run()
    infer.finalize()
    test_ids = [e["id"] for e in json.loads((demo_dir / "datalist.json").read_text())["test"]]
    assert sorted(p.name for p in out.glob("*_seg.png")) == sorted(f"{i}_seg.png" for i in test_ids)


def test_every_network_config_is_tested():
    """The parametrised workflow test runs every file in configs/networks, each is checked against the class it
    must build, and every network of scripts.networks has a config."""
    import inspect

    import scripts.networks

    test = test_a_network_config_trains_on_train_yaml_and_infers_on_inference_yaml
    params = next(m for m in test.pytestmark if m.name == "parametrize").args[1]
    on_disk = sorted(p.stem for p in (BUNDLE_ROOT / "configs" / "networks").glob("*.yaml"))
    assert list(params) == on_disk
    classes = {_expected_class(n) for n in on_disk}
    # a network of the bundle: forward(image, text_ids, text_mask), as scripts/networks/__init__.py states
    networks = {
        n for n in scripts.networks.__all__
        if "text_ids" in inspect.signature(getattr(scripts.networks, n).forward).parameters
    }
    assert networks <= classes, networks - classes


def test_the_shipped_model_segments_real_chest_xrays(tmp_path):
    """models/model.pt (TMCA trained on QaTa-COV19) through the default inference config on 16 real validation
    images with their reports: the masks must overlap the ground truth as its validation Dice says."""
    from conftest import BUNDLE_ROOT, SHARED_DATA

    root = SHARED_DATA / "qata"
    if not root.is_dir():
        pytest.skip(f"shared QaTa data not found at {root}")
    ids = json.loads((root / "split.json").read_text())["val"][::89][:16]
    entries = [{"id": i, "image": str(root / "images" / f"{i}.png"),
                "report": (root / "reports" / f"{i}.txt").read_text().strip()} for i in ids]
    data = tmp_path / "data"
    data.mkdir()
    (data / "datalist.json").write_text(json.dumps({"test": entries}))
    out = tmp_path / "out"
    wf = _workflow(config("inference.yaml"), "infer", BUNDLE_ROOT, data, output_dir=str(out))
    wf.run()
    wf.finalize()
    dice = []
    for i in ids:
        pred = np.array(Image.open(out / f"{i}_seg.png")) > 0
        truth = np.array(Image.open(root / "masks" / f"{i}.png")) > 127
        dice.append(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))
    assert np.mean(dice) > 0.6, dice  # 0.79 over the whole validation split

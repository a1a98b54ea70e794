"""The TMCA design switches of the study (issue 19, part 2): loss schedule, aligned enhancement from identity,
position in the target embedding, stop-gradient levels, and the alignment-health figures."""

import math

import pytest
import torch
from conftest import FAST, captured_logs, config, lesion_masks

from scripts.engine import TrainingProgress
from scripts.health import AlignmentHealth, alignment_health
from scripts.losses import TMCALoss
from scripts.networks import TMCA
from scripts.networks.tmca import AlignedEnhancement

IMAGE = (4, 1, 64, 64)


def test_mean_reduction_averages_the_levels_and_warmup_ramps_the_weight(tokens):
    torch.manual_seed(0)
    out = TMCA().train()(torch.rand(*IMAGE), *tokens)
    target = lesion_masks(4)
    summed = TMCALoss(lambda_map=0.0)(out, target)
    mean = TMCALoss(lambda_map=0.0, level_reduction="mean")(out, target)
    torch.testing.assert_close(mean["loss_align"], summed["loss_align"] / 4)
    seg = summed["loss_dice"] + summed["loss_bce"]
    warm = TMCALoss(lambda_map=0.0, warmup_epochs=2)
    for progress, weight in ((0.0, 0.0), (1.0, 0.25), (3.0, 0.5)):
        warm.set_progress(progress)
        assert warm.align_weight == pytest.approx(weight)
        torch.testing.assert_close(warm(out, target)["loss"], seg + weight * summed["loss_align"])
    with pytest.raises(ValueError, match="level_reduction"):
        TMCALoss(level_reduction="max")


def test_training_progress_reads_the_engine_state_so_a_resumed_run_keeps_its_schedule():
    from ignite.engine import Engine, Events

    loss = TMCALoss(warmup_epochs=1)
    seen = []
    engine = Engine(lambda e, b: seen.append(loss.progress))
    TrainingProgress(loss).attach(engine)
    engine.run([0] * 4, max_epochs=2)
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    engine.state.iteration = 6  # as a checkpoint of iteration 6 restores it
    TrainingProgress(loss)(engine)
    assert loss.progress == 1.25
    plain = Engine(lambda e, b: None)
    TrainingProgress(object()).attach(plain)  # a loss without a schedule: nothing attached
    assert not plain.has_event_handler(TrainingProgress(object()), Events.ITERATION_STARTED)


def test_aligned_enhancement_starts_as_the_identity_and_uses_the_alignment_heads(tokens):
    torch.manual_seed(0)
    net = TMCA(enhancement_space="aligned", enhancement_alpha_init=0.0, alignment_levels=[32]).train()
    assert all(isinstance(e, AlignedEnhancement) for e in net.enhancers.values())
    assert sorted(int(k) for k in net.align_image) == [4, 8, 16, 32]  # heads at every enhanced stride
    x = torch.rand(4, 16, 8, 8)
    y, logits = net.enhancers["16"](x, torch.randn(4, 128, 8, 8), torch.randn(4, 128))
    torch.testing.assert_close(y, x)  # α = 0: identity at the start
    out = net(torch.rand(*IMAGE), *tokens)
    assert out["align_strides"] == [32]  # the contrastive loss still reads the alignment levels only
    loss = TMCALoss()(out, lesion_masks(4))
    loss["loss"].backward()
    assert net.align_image["4"].weight.grad.abs().sum() > 0  # the map's supervision trains the shallow heads
    assert all(e.alpha.grad is not None for e in net.enhancers.values())
    with pytest.raises(ValueError, match="enhancement_space"):
        TMCA(enhancement_space="pixel")


def test_the_position_term_tells_apart_lesions_at_different_places():
    torch.manual_seed(0)
    net = TMCA(alignment_position=True, alignment_levels=[16])
    flat = torch.zeros(1, net.channels[16], 4, 4)  # the same features everywhere: only the position differs
    pixels = net.align_pixels(16, flat)[0]
    assert not torch.allclose(pixels[:, 0, 0], pixels[:, 3, 3])
    plain = TMCA(alignment_levels=[16]).align_pixels(16, flat)[0]
    torch.testing.assert_close(plain[:, 0, 0], plain[:, 3, 3])


def test_detached_levels_send_no_alignment_gradient_into_the_encoder(tokens):
    torch.manual_seed(0)
    image = torch.rand(*IMAGE)
    grads = {}
    for detach in ((), (4, 8, 16, 32)):
        net = TMCA(enhancement=False, alignment_detach=detach).train()
        out = net(image, *tokens)
        TMCALoss()(out, lesion_masks(4))["loss_align"].backward()
        grads[detach] = sum(p.grad.abs().sum() for p in net.encoder.parameters() if p.grad is not None)
        assert net.align_image["4"].weight.grad.abs().sum() > 0  # the heads still learn
    assert grads[()] > 0 and grads[(4, 8, 16, 32)] == 0


def test_alignment_health_figures():
    keys = ["a", "b", "a", "c", "b", "a"]
    texts = ["left lung.", "right lung.", "left lung.", "both lungs.", "right lung.", "left lung."]
    bank = {"a": torch.tensor([1.0, 0, 0]), "b": torch.tensor([0, 1.0, 0]), "c": torch.tensor([0, 0, 1.0])}
    reports = torch.stack([bank[k] for k in keys])
    perfect = alignment_health(reports + 0.01, reports, keys, texts)
    assert perfect["chance"] == pytest.approx(math.log(3))
    assert perfect["top1"] == 1.0 and perfect["laterality"] == 1.0 and perfect["loss"] < perfect["chance"]
    assert perfect["top1_prior"] == pytest.approx(3 / 6)
    assert perfect["laterality_prior"] == pytest.approx(3 / 5)  # 3 left, 2 right among the one-sided
    swapped = alignment_health(torch.stack([bank["b" if k == "a" else "a" if k == "b" else k] for k in keys]),
                               reports, keys, texts)
    assert swapped["top1"] == pytest.approx(1 / 6) and swapped["laterality"] == 0.0
    assert swapped["loss"] > swapped["chance"]


@pytest.mark.parametrize("target_sensitive", [True, False])
def test_alignment_health_pools_as_the_loss_pools(tokens, target_sensitive):
    """The health handler measures the objective the network trains: under the lesion for full TMCA (a sample
    without a lesion takes no part), over the whole image for the no-target ablation (every sample with a report).
    Pooled under the lesion, the no-target network's figures would describe an alignment it never learned."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    net = TMCA(enhancement=False).eval()
    ids, mask = tokens
    image, label = torch.rand(*IMAGE), lesion_masks(4)
    label[3] = 0  # no lesion
    texts = [f"report {i}" for i in range(4)]
    state = SimpleNamespace(batch={"report_ids": ids, "report_mask": mask, "report": texts},
                            output={"image": image, "label": label}, metrics={})
    health = AlignmentHealth(net, target_sensitive=target_sensitive)
    health.reset()
    health.update(SimpleNamespace(state=state))
    health.compute(SimpleNamespace(state=state))
    take = [0, 1, 2] if target_sensitive else [0, 1, 2, 3]
    keys = [tuple(ids[i][mask[i].bool()].tolist()) for i in take]
    with torch.no_grad():
        levels = net.alignment_embeddings(image, ids, mask)
    for stride, (pixels, report) in levels.items():
        if target_sensitive:
            weight = torch.nn.functional.interpolate(label, size=pixels.shape[-2:], mode="area")
            pooled = (pixels * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
        else:
            pooled = pixels.mean(dim=(2, 3))
        expected = alignment_health(pooled[take], report[take], keys, [texts[i] for i in take])
        assert state.metrics[f"val_align_loss_s{stride}"] == pytest.approx(expected["loss"], rel=1e-4)
        assert state.metrics[f"val_align_top1_s{stride}"] == pytest.approx(expected["top1"])
    assert state.metrics["val_align_chance"] == pytest.approx(math.log(len(set(keys))))


def test_bank_targets_match_zones_softly_and_ids_exactly():
    from scripts.networks.tmca import bank_targets

    bank_ids = torch.tensor([[1, 2, 3, 0], [1, 4, 0, 0], [5, 6, 7, 8]])
    bank_mask = (bank_ids > 0).long()
    bank_flags = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    ids = torch.tensor([[1, 2, 3, 0], [9, 9, 0, 0], [5, 6, 7, 8]])
    mask = (ids > 0).long()
    exact = bank_targets(ids, mask, None, bank_ids, bank_mask, bank_flags)
    assert exact[0].argmax() == 0 and exact[0, 0] > 0.99 and exact[1].sum() == 0 and exact[2].argmax() == 2
    # sample 1 (unknown words) names zone 0: bank 0 (J = 1) first, bank 1 (J = 1/2) next, bank 2 (J = 0) last
    flags = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    soft = bank_targets(ids, mask, flags, bank_ids, bank_mask, bank_flags)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(3))
    assert soft[1, 0] > soft[1, 1] > soft[1, 2] > 0
    assert soft[2].argmax() == 2  # no zone flags: exact ids


def test_report_bank_is_filled_at_start_and_replaces_the_batch_as_candidates(tokens):
    from scripts.engine import ReportBank
    from scripts.transforms import TokenizeReport

    torch.manual_seed(0)
    net = TMCA(report_bank=True, enhancement=False).train()
    datalist = [{"report": r} for r in ["lower left lung.", "upper right lung.", "lower left lung.", "all left lung.",
                                        "middle right lung."]]
    ReportBank(net, datalist, TokenizeReport())()
    assert net.bank_ids.shape[0] == 4 and "bank_ids" not in net.state_dict()  # rebuilt, never saved
    out = net(torch.rand(*IMAGE), *tokens)
    assert out["bank_targets"].shape == (4, 4) and len(out["align_bank"]) == 4
    with_bank = TMCALoss()(out, lesion_masks(4))
    without = TMCALoss()({k: v for k, v in out.items() if k not in ("align_bank", "bank_targets")}, lesion_masks(4))
    assert not torch.isclose(with_bank["loss_align_s32"], without["loss_align_s32"])
    with_bank["loss"].backward()
    assert net.align_text["32"].key.weight.grad.abs().sum() > 0
    # a list without any report (MONAI Label's image + label lists): nothing to align, the bank stays empty
    empty = TMCA(report_bank=True, enhancement=False).train()
    with captured_logs("scripts.engine") as records:
        ReportBank(empty, [{"image": "x"}], TokenizeReport())()
    assert empty.bank_ids is None
    assert any("the training datalist has no report" in r.getMessage() for r in records)
    assert "align_bank" not in empty(torch.rand(*IMAGE), *tokens)


def test_report_bank_warns_when_the_trainer_does_not_pass_the_zones(caplog):
    from ignite.engine import Engine

    from scripts.engine import ReportBank, ReportPrepareBatch
    from scripts.transforms import TokenizeReport

    net = TMCA(report_bank=True, enhancement=False)
    for text_keys, warned in (({"text_ids": "report_ids", "text_mask": "report_mask"}, True),
                              ({"text_ids": "report_ids", "text_mask": "report_mask", "zones": "zones"}, False)):
        engine = Engine(lambda e, b: None)
        engine.prepare_batch = ReportPrepareBatch(text_keys)
        caplog.clear()
        with caplog.at_level("WARNING", logger="scripts.engine"):
            ReportBank(net, [{"report": "lower left lung."}], TokenizeReport()).attach(engine)
        assert any("does not pass 'zones'" in r.getMessage() for r in caplog.records) is warned, text_keys


def test_train_config_with_the_report_bank_runs(demo_dir, tmp_path):
    """train.yaml's defaults since 1.0.0: the bank on, the zones passed."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=config("train.yaml"), meta_file=config("metadata.json"), workflow_type="train",
        bundle_root=str(tmp_path), dataset_dir=str(demo_dir), **FAST,
    )
    wf.initialize()
    wf.run()
    net = wf.parser.get_parsed_content("network_def")
    assert net.report_bank and net.bank_ids is not None and net.bank_ids.shape[0] > 1
    wf.finalize()

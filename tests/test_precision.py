"""The compute path: precision chosen from what the device supports, autocast at the engines' forward pass, float32
after it, channels-last batches, and the text encoder's cache of token states."""

import logging

import pytest
import torch
from torch import nn

import scripts.precision as precision
from conftest import tokenize_reports
from scripts.engine import ReportPrepareBatch, SegmentationEvaluator, SegmentationTrainer
from scripts.networks.text_encoder import HFTextEncoder, configure_text_cache
from scripts.precision import Autocast, autocast_dtype


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_takes_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch, caplog, native, expected):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
    with caplog.at_level(logging.INFO, logger="scripts.precision"):
        assert autocast_dtype("cpu", "auto") is expected
    line = [r.getMessage() for r in caplog.records if "compute path" in r.getMessage()]
    assert len(line) == 1 and ("bf16 autocast" if native else "fp32") in line[0]


def test_forced_precisions_and_bad_values():
    assert autocast_dtype("cpu", "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast_dtype("cpu", "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("cpu", "half")


def test_cpu_detection_reads_torch_s_own_probe(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not precision.cpu_supports_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision.cpu_supports_bf16()


def test_autocast_computes_in_bf16_and_hands_back_float32():
    layer = nn.Linear(8, 8)
    seen = {}

    def inferer(x, network):
        out = network(x)
        seen["dtype"] = out.dtype
        return {"pred": out, "ids": torch.arange(3), "levels": [out * 2]}

    out = Autocast(inferer, "cpu", torch.bfloat16)(torch.rand(2, 8), layer)
    assert seen["dtype"] == torch.bfloat16
    assert out["pred"].dtype == out["levels"][0].dtype == torch.float32 and out["ids"].dtype == torch.long
    plain = Autocast(inferer, "cpu", None)(torch.rand(2, 8), layer)
    assert seen["dtype"] == plain["pred"].dtype == torch.float32


def test_prepare_batch_hands_channels_last_images():
    batch = {"image": torch.rand(2, 3, 8, 8), "label": torch.rand(2, 1, 8, 8)}
    image, _, _, _ = ReportPrepareBatch(memory_format=torch.channels_last)(batch, device="cpu")
    assert image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous()
    image, _, _, _ = ReportPrepareBatch()(batch, device="cpu")
    assert image.is_contiguous()


class _Probe(nn.Module):
    """Records whether its forward ran under CPU autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.autocast: list[bool] = []

    def forward(self, x):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return self.conv(x)


def _engine_inputs():
    net = _Probe()
    data = [{"image": torch.rand(2, 1, 8, 8), "label": (torch.rand(2, 1, 8, 8) > 0.5).float()}]
    return net, data


def test_trainer_autocasts_the_forward_pass_and_computes_the_loss_in_float32():
    net, data = _engine_inputs()
    losses = []

    def loss(pred, target):
        losses.append(pred.dtype)
        return nn.functional.binary_cross_entropy_with_logits(pred, target)

    trainer = SegmentationTrainer(device="cpu", max_epochs=1, train_data_loader=data, network=net,
                                  optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=loss,
                                  prepare_batch=ReportPrepareBatch(), compute_dtype=torch.bfloat16)
    trainer.run()
    assert net.autocast == [True] and losses == [torch.float32]
    assert net.conv.weight.dtype == torch.float32  # the weights stay float32
    evaluator = SegmentationEvaluator(device="cpu", val_data_loader=data, network=net,
                                      prepare_batch=ReportPrepareBatch(), compute_dtype=None)
    evaluator.run()
    assert net.autocast == [True, False]


def test_engines_refuse_monai_amp_in_favour_of_precision():
    net, data = _engine_inputs()
    with pytest.raises(TypeError, match="precision"):
        SegmentationEvaluator(device="cpu", val_data_loader=data, network=net, amp=True)


# -- the frozen text encoder's cache --------------------------------------------------------------------------------

REPORTS = ["bilateral pulmonary infection, two infected areas, all left lung and all right lung.",
           "unilateral pulmonary infection, one infected area, lower left lung.",
           "bilateral pulmonary infection, two infected areas, all left lung and all right lung."]


@pytest.fixture(scope="module")
def frozen():
    return HFTextEncoder()


def test_cache_computes_each_distinct_report_once_and_matches_the_encoder(frozen):
    configure_text_cache(frozen, 16)
    ids, mask = tokenize_reports(REPORTS)
    with torch.no_grad():
        first, _ = frozen(ids, mask)
        assert (frozen.cache.misses, frozen.cache.hits, len(frozen.cache)) == (2, 0, 2)
        second, _ = frozen(ids[[1, 0]], mask[[1, 0]])
        assert (frozen.cache.misses, frozen.cache.hits) == (2, 2)
        configure_text_cache(frozen, 0)
        plain, _ = frozen(ids, mask)
    assert len(frozen.cache) == 0  # off: nothing stored
    torch.testing.assert_close(first, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, plain[[1, 0]], atol=1e-5, rtol=1e-5)


def test_cached_states_are_float32_under_autocast_and_keyed_by_the_masked_tokens(frozen):
    configure_text_cache(frozen, 16)
    ids, mask = tokenize_reports(REPORTS[:2])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        states, _ = frozen(ids, mask)
    assert states.dtype == torch.float32
    padded = ids.clone()
    padded[mask == 0] = 7  # other ids under the padding: the same report
    frozen(padded, mask)
    assert frozen.cache.misses == 2 and frozen.cache.hits == 2
    shorter = mask.clone()
    shorter[0, 3:] = 0  # another attention mask: another input
    frozen(ids, shorter)
    assert frozen.cache.misses == 3


def test_cache_is_bounded_and_cleared_by_a_move(frozen):
    configure_text_cache(frozen, 1)
    ids, mask = tokenize_reports(REPORTS[:2])
    frozen(ids, mask)
    assert len(frozen.cache) == 1
    frozen.to(torch.device("cpu"))
    assert len(frozen.cache) == 0


def test_cache_is_bypassed_when_layers_are_trainable_and_while_tracing():
    tuned = HFTextEncoder(trainable_layers=1)
    assert not tuned.caching
    ids, mask = tokenize_reports(REPORTS[:1])
    states, _ = tuned(ids, mask)
    assert states.requires_grad and len(tuned.cache) == 0
    frozen = HFTextEncoder()

    class Wrap(nn.Module):
        def forward(self, i, m):
            return frozen(i, m)[0]

    torch.jit.trace(Wrap(), (ids, mask), check_trace=False)
    assert len(frozen.cache) == 0  # the encoder stayed in the traced graph

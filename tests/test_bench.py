"""The benchmark commands run and report what they measured (figures themselves are not asserted: machines vary)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import BUNDLE_ROOT

from bundle.bench import data_pipeline_throughput, samples_per_second


def test_samples_per_second_skips_warmup_batches():
    batches = [{"image": [0] * 4}] * 5
    rate, n = samples_per_second(batches, warmup_batches=2)
    assert n == 12 and rate > 0


def test_data_bench_measures_the_three_regimes_of_the_train_config(demo_dir):
    rows = data_pipeline_throughput(demo_dir / "datalist.json", num_samples=24, batch_size=4, workers=[0],
                                    log=lambda _: None)
    assert [r["regime"] for r in rows] == ["plain load", "full pipeline", "cached pipeline"]
    n_train = len(json.loads((demo_dir / "datalist.json").read_text())["training"])
    timed = 4 * ((n_train + 3) // 4 - 2) - (-n_train % 4)  # all batches but the 2 of warm-up
    assert all(r["samples"] == timed and r["samples_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_data_command_prints_the_table(demo_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "bundle", "bench", "data", "--datalist", str(demo_dir / "datalist.json"),
         "--num-samples", "24", "--batch-size", "4", "--workers", "0"],
        cwd=BUNDLE_ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| full pipeline | 0 |" in proc.stdout and "vs plain PNG load" in proc.stdout


def test_network_cost_counts_what_the_config_builds():
    from bundle.bench import network_cost, network_parser

    row = network_cost("unet", size=64, batch_sizes=(1, 2), train_batch=2, repeats=1, warmup=0)
    net = network_parser("unet").get_parsed_content("network_def")
    assert row["params_total"] == sum(p.numel() for p in net.parameters()) and not row["reads_text"]
    assert row["gflops"] > 0 and row["step_s"] > 0 and set(row["latency_s"]) == {1, 2}
    # a training step is forward + backward: more than the forward FLOPs of its two images
    assert row["step_gflops"] > 2 * row["gflops"]
    text = network_cost("tmca", size=64, batch_sizes=(1,), train_batch=2, repeats=1, warmup=0)
    assert text["reads_text"] and text["params_trainable"] < text["params_total"]  # the text encoder is frozen


def test_the_step_is_the_trainer_s_own_iteration_on_each_path(monkeypatch):
    """The fast path runs the config's compute path, the baseline plain fp32 on contiguous memory without the text
    cache; both go through SegmentationTrainer's iteration (what `run training` executes)."""
    from bundle.bench import network_cost
    from scripts.engine import SegmentationTrainer
    from scripts.networks.text_encoder import HFTextEncoder

    calls = []
    original = SegmentationTrainer._iteration

    def spy(self, engine, batch):
        calls.append((self.compute_dtype, batch["image"].shape[0]))
        return original(self, engine, batch)

    monkeypatch.setattr(SegmentationTrainer, "_iteration", spy)
    forwards = []
    original_forward = HFTextEncoder.forward
    monkeypatch.setattr(HFTextEncoder, "forward", lambda self, *a: forwards.append(self.caching)
                        or original_forward(self, *a))
    common = dict(size=64, batch_sizes=(1,), train_batch=2, repeats=1, warmup=0,
                  overrides={"precision": "bf16"})
    fast = network_cost("tmca", path="fast", **common)
    assert fast["compute"] == "bf16 autocast, channels-last" and calls and all(c == (torch.bfloat16, 2) for c in calls)
    assert forwards and all(forwards)
    calls.clear(), forwards.clear()
    base = network_cost("tmca", path="baseline", **common)
    assert base["compute"] == "fp32, contiguous" and calls and all(c == (None, 2) for c in calls)
    assert forwards and not any(forwards)
    # the cached text encoder does no work in the fast step
    assert fast["step_gflops"] < base["step_gflops"] and fast["gflops"] == pytest.approx(base["gflops"], rel=1e-6)


@pytest.mark.slow
def test_bench_model_command_prints_one_row_per_network_and_path(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bundle", "bench", "model", "--networks", "tmca_image_only", "unet", "--size", "64",
         "--batch-sizes", "1", "--train-batch", "2", "--repeats", "1", "--warmup", "0", "--baseline",
         "--json", str(out)],
        cwd=BUNDLE_ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| tmca_image_only (TMCA) | fast: " in proc.stdout and "| unet (UNet) | baseline: fp32, contiguous |" in proc.stdout
    assert "fast / baseline: step" in proc.stdout and "3×3 convolution" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["network"], r["path"]) for r in rows] == [
        ("tmca_image_only", "fast"), ("tmca_image_only", "baseline"), ("unet", "fast"), ("unet", "baseline")]
    keys = {"network", "path", "step_b2_s", "latency_b1_ms", "peak_mb", "params_total", "params_trainable", "gflops"}
    assert all(keys <= set(r) and r["step_b2_s"] > 0 and r["latency_b1_ms"] > 0 for r in rows)
    unknown = subprocess.run([sys.executable, "-m", "bundle", "bench", "model", "--networks", "nope"],
                             cwd=BUNDLE_ROOT, capture_output=True, text=True)
    assert unknown.returncode != 0 and "no network config" in unknown.stderr


def test_params_only_counts_without_timing():
    import math

    from bundle.bench import network_cost, network_parser

    row = network_cost("guidedecoder", size=64, timing=False)
    net = network_parser("guidedecoder").get_parsed_content("network_def")
    assert row["class"] == "GuideDecoder" and row["reads_text"] and row["gflops"] > 0
    assert row["params_trainable"] == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert math.isnan(row["step_s"]) and all(math.isnan(v) for v in row["latency_s"].values())


def test_conv_peak_measures_the_three_layouts():
    from bundle.bench import conv_peak

    peak = conv_peak(repeats=1)
    assert set(peak) == {"fp32 contiguous", "fp32 channels-last", "bf16 channels-last"}
    assert all(v > 0 for v in peak.values())


def test_agreement_compares_the_fast_path_with_fp32_on_real_weights(demo_dir, tmp_path):
    from bundle.bench import inference_agreement, network_parser

    overrides = {"spatial_size": [64, 64], "precision": "bf16"}
    net = network_parser("tmca", overrides).get_parsed_content("network_def")
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")
    lines = []
    result = inference_agreement(demo_dir / "datalist.json", tmp_path / "model.pt", overrides=overrides, limit=4,
                                 log=lines.append)
    assert result["images"] == 4 and 0.9 < result["pixel_agreement"] <= 1.0
    assert result["paths"] == {"fast": "bf16 autocast, channels-last", "baseline": "fp32, contiguous"}
    assert set(result["dice_mean"]) == {"fast", "baseline"} and "masks agree on" in lines[0]


def test_profile_prints_the_top_operators_of_the_trainer_step():
    from bundle.bench import profile_step

    table = profile_step("tmca_image_only", size=64, train_batch=2, steps=1, rows=5)
    assert table.startswith("tmca_image_only fast (") and "Self CPU" in table
    assert "convolution" in table  # a ConvNeXt step is dominated by convolutions


def test_switch_ablation_times_every_variant_of_the_same_network():
    from bundle.bench import SWITCH_VARIANTS, switch_ablation

    lines = []
    result = switch_ablation("tmca_image_only", size=64, train_batch=2, rounds=1, log=lines.append)
    assert list(result) == list(SWITCH_VARIANTS) and all(r["step_s"] > 0 for r in result.values())
    assert lines[0].startswith("| variant of tmca_image_only") and len(lines) == 2 + len(SWITCH_VARIANTS)

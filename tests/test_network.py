"""The checkpoint contract every text-reading network of the bundle keeps (frozen text-encoder weights stay out)."""

import pytest
import torch

from scripts.networks import SSA, TMCA, GuideDecoder, LViTStyle, RecLMIS
from scripts.transforms import TokenizeReport

NETWORKS = [TMCA, GuideDecoder, SSA, RecLMIS, LViTStyle]


@pytest.mark.parametrize("cls", NETWORKS, ids=lambda c: c.__name__)
def test_checkpoint_leaves_out_the_frozen_encoder_and_loads_strictly(cls):
    torch.manual_seed(0)
    state = cls().state_dict()
    assert state and not any(k.startswith("text_encoder.") for k in state)
    torch.manual_seed(1)
    other = cls()
    other.load_state_dict(state, strict=True)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, state[k])
    broken = dict(state)
    key = sorted(broken)[0]
    broken.pop(key)
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        other.load_state_dict(broken, strict=True)


def test_fine_tuned_text_layers_get_gradients_and_are_saved():
    t = TokenizeReport(max_length=24)
    ids, mask = map(torch.stack, zip(t("lower left lung."), t("upper right lung.")))
    net = GuideDecoder(text_trainable_layers=1)
    net(torch.rand(2, 1, 64, 64), ids, mask).mean().backward()
    top, bottom = net.text_encoder._layers()[-1], net.text_encoder._layers()[0]
    assert all(p.grad is not None for p in top.parameters())
    assert all(p.grad is None for p in bottom.parameters())
    keys = net.state_dict().keys()
    assert any(k.startswith("text_encoder.model.encoder.layer.5.") for k in keys)
    assert not any(k.startswith("text_encoder.model.encoder.layer.0.") for k in keys)


@pytest.mark.parametrize("cls", [TMCA, GuideDecoder, LViTStyle], ids=lambda c: c.__name__)
def test_image_only_variant_has_no_text_parameters(cls):
    net = cls(use_text=False).eval()
    assert not any("text" in n or "guide" in n for n, _ in net.named_parameters())
    with torch.no_grad():
        assert net(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_no_network_imports_a_sibling_network_other_than_its_base():
    """Shared pieces live one layer down (blocks, lvit_unet, transport, the encoders); RecLMIS and SSA once
    imported TMCA for a helper."""
    import ast
    from pathlib import Path

    import scripts.networks

    folder = Path(scripts.networks.__file__).parent
    networks = {"guidedecoder", "tmca", "ssa", "lvit", "reclmis"}
    bases = {"tmca": {"guidedecoder"}, "ssa": {"guidedecoder"}}
    for name in sorted(networks):
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = {
            node.module.rsplit(".", 1)[-1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scripts.networks.")
        }
        assert imported & networks <= bases.get(name, set()), f"{name}.py imports {imported & networks}"


def _keys(typed_dict) -> set[str]:
    return set(typed_dict.__required_keys__) | set(typed_dict.__optional_keys__)


def test_training_outputs_are_the_typed_dicts_the_losses_read(tokens):
    from scripts.networks.blocks import TrainingOutput
    from scripts.networks.ssa import SSAOutput
    from scripts.networks.tmca import TMCAOutput

    ids, mask = tokens
    image = torch.rand(len(ids), 1, 64, 64)
    for cls, typed in ((TMCA, TMCAOutput), (SSA, SSAOutput)):
        out = cls().train()(image, ids, mask)
        assert _keys(TrainingOutput) <= set(out) <= _keys(typed), (cls.__name__, set(out) ^ _keys(typed))
        assert set(typed.__required_keys__) <= set(out)


@pytest.mark.parametrize(
    "build, off",
    [
        (lambda: GuideDecoder(use_text=False), ["text_encoder", "token_proj", "guides"]),
        (lambda: TMCA(use_text=False), ["text_encoder", "token_proj", "guides", "enhancers", "align_image", "align_text"]),
        (lambda: TMCA(alignment_levels=[], enhancement=False), ["enhancers", "align_image", "align_text"]),
        (lambda: SSA(alignment=False, directional_guidance=False), ["align", "zone_guidance", "gates"]),
    ],
    ids=["guidedecoder_image_only", "tmca_image_only", "tmca_parts_off", "ssa_parts_off"],
)
def test_a_part_switched_off_is_none_never_a_missing_attribute(build, off):
    """Constructors never return early: every attribute exists whatever the switches."""
    net = build()
    for name in off:
        assert getattr(net, name) is None, name
    net.train()(torch.rand(2, 1, 64, 64))  # the image-only path runs with every part off

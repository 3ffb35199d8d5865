"""What is particular to Swin v2 (SwinTransformerV2) and Twins (pcpvt, svt) beyond their conformance
rows (tests/test_families.py, whose small models these tests take): Swin v2's shifted-window masks,
cosine attention and gradient checkpointing, Twins' blocks and position conv after SIA against timm's
on a grid, the report's new layers, measurements at another input size, the refusal of swinv2_cr."""

import pytest
import timm
import torch
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn

import hafa
from hafa.cli import main
from hafa.models.families import swinv2, twins
from hafa.ops import TokenLayout
from hafa.tasks.networks import sized_model
from test_families import base_model


def test_swinv2_keeps_each_sizes_shifted_window_mask():
    converted = hafa.convert(base_model("swinv2"), stage_aggregation=("conv", "conv", "conv"))
    blocks = [block for stage in converted.layers for block in stage.blocks]
    assert all(isinstance(block, swinv2.CachedMaskSwinV2Block) for block in blocks)
    shifted = next(block for block in blocks if any(block.shift_size))
    padded = torch.zeros(1, 8, 12, shifted.dim)
    mask = shifted.get_attn_mask(padded)
    assert shifted.get_attn_mask(padded) is mask
    assert torch.equal(mask, timm.models.swin_transformer_v2.SwinTransformerV2Block.get_attn_mask(shifted, padded))


def test_swinv2_sia_projects_with_the_checkpoints_patch_merging(tmp_path):
    model = base_model("swinv2", seed=3)
    path = tmp_path / "baseline.pth"
    torch.save(model.state_dict(), path)
    fresh = hafa.convert(base_model("swinv2", seed=4))
    report = hafa.load_pretrained(fresh, str(path), verbose=False)
    merging = fresh.layers[3].downsample.proj
    assert torch.equal(merging.norm.weight, model.layers[3].downsample.norm.weight)
    assert torch.equal(merging.reduction.weight, model.layers[3].downsample.reduction.weight)
    assert "layers.3.downsample.norm.weight" in report.newly_initialised  # SIA's own norm after the merging


@pytest.mark.parametrize("family", ["swinv2", "twins_pcpvt", "twins_svt"])
def test_the_report_names_the_new_layers(family):
    report = hafa.convert(base_model(family)).conversion_report
    transitions = "layers.{}.downsample" if family == "swinv2" else "patch_embeds.{}"
    new = set(report.new_layers)
    assert {f"{transitions.format(i)}.offset" for i in (1, 2)} <= new
    assert {f"{transitions.format(3)}.{part}" for part in ("skip", "score", "kv_proj", "kv_dwconv")} <= new
    assert not any(name.startswith(("layers.3.blocks.", "blocks.3.", "pos_block.3.")) for name in new)
    assert "new layers" in report.summary()


def test_measurements_build_both_models_for_the_input_size(capsys):
    # timm's Swin v2 takes only the size it was built for (256 for this name): hafa models and bench
    # build the baseline, and the HAFA model beside it, for the measured size.
    assert main(["models", "--models", "hafa_swinv2_tiny_window8_256", "--img-size", "160"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "swinv2_tiny_window8_256 |" in line]
    assert len(rows) == 2
    with torch.device("meta"):
        baseline = sized_model("swinv2_tiny_window8_256", 160)
        converted = sized_model("hafa_swinv2_tiny_window8_256", 160)
    assert baseline.patch_embed.img_size == converted.patch_embed.img_size == (160, 160)


def test_cosine_attention_on_one_window_is_timms_window_attention():
    block = base_model("swinv2").layers[3].blocks[0]  # stage 4 at 64 px: one 2 x 2 window, no shift
    with torch.no_grad():
        # timm adds 16 sigmoid(cpb_mlp(...)): a constant 8 for every key when the MLP's last layer is zero,
        # which the softmax ignores; clustered blocks leave that bias out
        block.attn.cpb_mlp[2].weight.zero_()
        x = torch.randn(2, 2, 2, block.dim)
        expected = block(x).flatten(1, 2)
        got = swinv2.clustered_block(block).eval()(x.flatten(1, 2), TokenLayout((2, 2)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["twins_pcpvt", "twins_svt"])
def test_twins_blocks_and_peg_on_a_grid_are_timms(family):
    model = base_model(family)
    size = (7, 7)  # one 7 x 7 window for svt's locally-grouped attention; stage 1's 8 x 8 reduction needs more
    attention_kinds = set()
    with torch.no_grad():
        for stage, peg in zip(model.blocks[1:], model.pos_block[1:]):
            x = torch.randn(2, size[0] * size[1], peg.proj[0].in_channels)
            for block in stage[:2]:
                attention_kinds.add(type(block.attn))
                got = twins.clustered_block(block).eval()(x, TokenLayout(size))
                torch.testing.assert_close(got, block(x, size), atol=1e-5, rtol=1e-5)
            got = twins.DictionaryPosConv(proj=peg.proj)(x, TokenLayout(size))
            torch.testing.assert_close(got, peg(x, size), atol=1e-6, rtol=1e-6)
    expected_kinds = {GlobalSubSampleAttn, LocallyGroupedAttn} if family == "twins_svt" else {GlobalSubSampleAttn}
    assert attention_kinds == expected_kinds


def test_twins_sia_keys_values_and_queries_meet_at_odd_sizes():
    converted = hafa.convert(base_model("twins_pcpvt"), stage_aggregation=("sia", "sia", "sia")).eval()
    with torch.no_grad():
        maps = converted.forward_intermediates(torch.randn(1, 3, 70, 90), intermediates_only=True)
    assert [tuple(m.shape[-2:]) for m in maps] == [(17, 22), (9, 11), (5, 6), (3, 3)]  # SIA rounds up


def test_twins_refuses_gradient_checkpointing_as_timm():
    converted = hafa.convert(base_model("twins_svt"))
    with pytest.raises(AssertionError, match="not supported"):
        converted.set_grad_checkpointing(True)
    converted.set_grad_checkpointing(False)


def test_swinv2_gradient_checkpointing_gives_the_same_gradients():
    converted = hafa.convert(base_model("swinv2")).train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)  # the same drop-path draws in both runs
    converted(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in converted.named_parameters() if p.grad is not None}
    converted.zero_grad()
    converted.set_grad_checkpointing(True)
    torch.manual_seed(1)
    converted(x).sum().backward()
    assert expected
    for n, p in converted.named_parameters():
        if n in expected:
            torch.testing.assert_close(p.grad, expected[n], atol=1e-5, rtol=1e-4)


def test_swinv2_cr_is_refused_naming_the_families():
    with torch.device("meta"):
        model = timm.create_model("swinv2_cr_tiny_224")
    with pytest.raises(ValueError, match=r"families: .*swinv2.*; SwinTransformerV2Cr is none of them"):
        hafa.convert(model)


def test_twins_normalised_last_map_needs_sia_before_the_last_stage():
    x = torch.randn(1, 3, 64, 64)
    clustered = hafa.convert(base_model("twins_pcpvt")).eval()
    grid = hafa.convert(base_model("twins_pcpvt"), stage_aggregation=("laa", "laa", "laa")).eval()
    family = clustered.family
    with torch.no_grad():
        _, maps = clustered.forward_intermediates(x, norm=True)
        stage_3 = x
        for index in range(3):
            stage_3 = family.run_stage(clustered, index, stage_3)
        tokens, layout = family.run_clustered_stage(clustered, 3, *family.tokens_of(clustered, 3, stage_3), None)
        torch.testing.assert_close(maps[-1], layout.to_map(clustered.norm(tokens)))
        assert len(grid.forward_intermediates(x, norm=False, intermediates_only=True)) == 4
        with pytest.raises(ValueError, match="norm=False"):
            grid.forward_intermediates(x, norm=True)

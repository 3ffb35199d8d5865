"""What is particular to MetaFormer (caformer with SIA; convformer, poolformer v2 and v1 with LAA only)
and ConvNeXt (LAA only) beyond their conformance rows (tests/test_families.py, whose small models these
tests take): the tensors kept, the blocks and head after SIA against timm's, the refusals, export."""

import pytest
import timm
import torch
from timm.models.metaformer import MetaFormer

import hafa
from hafa.models.families.metaformer import FAMILY as METAFORMER
from hafa.models.families.metaformer import clustered_block
from hafa.ops import TokenLayout
from test_families import CASES, base_model, default_conversion

LAA_ONLY = ("laa", "laa", "laa")
caformer = CASES["caformer"].make  # a small caformer: its keywords (dims, ...) change it


def test_caformer_with_sia_keeps_every_timm_tensor():
    report = default_conversion("caformer").conversion_report
    assert report.unused == []
    # the last stage's blocks: timm's fused qkv as q and kv views, the token mixer named attn
    assert {"stages.3.blocks.1.attn.q.weight", "stages.3.blocks.1.attn.kv.weight"} <= set(report.copied)
    assert {"stages.3.blocks.1.res_scale1.scale", "stages.3.blocks.1.mlp.fc1.weight"} <= set(report.copied)
    # SIA projects with the stage's Downsampling (its norm before its conv) and normalises with a new LayerNorm
    assert {"stages.3.downsample.proj.norm.weight", "stages.3.downsample.proj.conv.weight"} <= set(report.copied)
    for new in ("stages.3.downsample.norm", "stages.3.downsample.score", "stages.3.downsample.kv_norm"):
        assert new in report.new_layers
    for index in (1, 2):
        assert f"stages.{index}.downsample.conv.offset" in report.new_layers
        assert f"stages.{index}.downsample.conv.out_norm" in report.new_layers
        assert f"stages.{index}.downsample.conv.weight" in report.copied


def test_convnext_keeps_the_transitions_unnamed_children():
    report = default_conversion("convnext").conversion_report
    assert report.unused == []
    for index in (1, 2, 3):
        assert {f"stages.{index}.downsample.0.weight", f"stages.{index}.downsample.1.weight"} <= set(report.copied)
        assert f"stages.{index}.downsample.1.offset" in report.new_layers
    assert report.laa_norm == "batch"


def test_a_clustered_caformer_block_on_a_grid_is_timms_block():
    # layer and residual scales other than one, batch > 1: a (dim, 1, 1) view would broadcast wrongly
    torch.manual_seed(0)
    model = caformer(layer_scale_init_values=0.5)
    block = model.stages[3].blocks[0].eval()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        tokens = torch.randn(3, 12, 128)
        expected = block(tokens)
        got = clustered_block(block).eval()(tokens, TokenLayout((3, 4)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_token_head_on_grid_tokens_is_timms_head():
    model = hafa.convert(base_model("caformer")).eval()
    feature_map = torch.randn(2, 128, 3, 4)
    tokens = feature_map.flatten(2).transpose(1, 2)
    with torch.no_grad():
        for pre_logits in (False, True):
            expected = MetaFormer.forward_head(model, feature_map, pre_logits=pre_logits)
            torch.testing.assert_close(METAFORMER.token_head(model, tokens, pre_logits), expected)
        model.reset_classifier(0, "")  # no pooling: each token normalised on its own
        expected = MetaFormer.forward_head(model, feature_map).flatten(2).transpose(1, 2)
        torch.testing.assert_close(METAFORMER.token_head(model, tokens, False), expected)


@pytest.mark.parametrize("family", ["convformer", "poolformerv2", "convnext"])
def test_sia_is_refused_where_no_stage_attends(family):
    with pytest.raises(ValueError, match=r"stage 4 has no attention \(its stages with attention: none\)"):
        hafa.convert(base_model(family), stage_aggregation=("laa", "laa", "sia"))


def test_sia_is_refused_before_a_caformer_stage_without_attention():
    with pytest.raises(ValueError, match=r"stage 2 has no attention \(its stages with attention: 3, 4\)"):
        hafa.convert(base_model("caformer"), stage_aggregation=("sia", "laa", "sia"))


def test_a_metaformer_stage_that_keeps_the_width_has_no_transition_to_convert():
    model = caformer(dims=(32, 32, 96, 128))  # timm builds no downsampling into stage 2
    assert isinstance(model.stages[1].downsample, torch.nn.Identity)
    with pytest.raises(ValueError, match=r"stage 2 has no downsampling \(stages.1.downsample is Identity"):
        hafa.convert(model, stage_aggregation=("laa", "conv", "conv"))
    hafa.convert(model, stage_aggregation=("conv", "laa", "sia"))


def test_convnext_refuses_laa_on_a_dilated_transition():
    model = timm.create_model("convnext_atto", depths=(1, 1, 1, 1), output_stride=16)
    with pytest.raises(ValueError, match=r"convnext's stages.3.downsample does not downsample .*output_stride < 32"):
        hafa.convert(model, stage_aggregation=LAA_ONLY)
    hafa.convert(model, stage_aggregation=("laa", "laa", "conv"))


def test_caformer_with_sia_exports_with_a_dynamic_batch_axis():
    model = default_conversion("caformer").eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
        images = torch.randn(3, 3, 64, 64)
        torch.testing.assert_close(program.module()(images), model(images), rtol=1e-5, atol=1e-5)

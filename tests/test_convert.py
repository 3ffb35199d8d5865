"""hafa.convert beyond what each family's conformance rows check (tests/test_families.py): the model
given is left as it is, the report, the registered names, refusals, training modes, the head on merged
tokens, and Swin's shifted-window mask."""

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock

import hafa
from hafa.layers import LAA, SIA, LAAPatchMerging
from hafa.models import HafaModel
from hafa.models.families.swin import shifted_window_mask
from hafa.models.registry import BASE_NAMES, BASELINE
from hafa.models.table import PARAMS
from test_families import CASES, base_model

# The conformance rows whose models the tests here convert.
FAMILIES = ("pvt_v2", "swin", "pvt")


def test_the_model_given_is_left_as_it_was():
    model = base_model("swin")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = hafa.convert(model)
    assert not any(isinstance(m, (SIA, LAAPatchMerging)) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    converted.layers[1].downsample.reduction.weight.data.zero_()
    assert torch.equal(
        model.state_dict()["layers.1.downsample.reduction.weight"], before["layers.1.downsample.reduction.weight"]
    )


def test_the_report_names_the_new_and_the_unused_layers():
    report = hafa.convert(base_model("swin")).conversion_report
    assert "layers.1.downsample.offset.weight" in report.newly_initialised
    assert "layers.3.downsample.score.weight" in report.newly_initialised
    assert "layers.3.blocks.0.attn.q.weight" in report.copied  # a view of the fused qkv
    assert "layers.3.blocks.0.attn.relative_position_bias_table" in report.unused  # no grid after SIA
    assert "layers.3.downsample.proj.reduction.weight" in report.copied  # SIA projects with the patch merging
    assert report.laa_norm == "batch"
    assert "new layers" in report.summary()
    assert report.summary().startswith(f"copied {len(report.copied)} tensors from the model it was converted from")
    assert "checkpoint" not in report.summary()  # there was none


def test_converting_timm_pvt_v2_b1_gives_hafa_pvt_v2_b1():
    with torch.device("meta"):
        converted = hafa.convert(timm.create_model("pvt_v2_b1"))
        registered = timm.create_model("hafa_pvt_v2_b1")
    assert isinstance(registered, HafaModel)
    assert sum(p.numel() for p in converted.parameters()) == PARAMS["hafa_pvt_v2_b1"] == 14645324
    assert converted.state_dict().keys() == registered.state_dict().keys()


def test_every_model_of_a_family_is_registered_with_its_baseline():
    for names in BASE_NAMES.values():
        for name in names:
            assert f"hafa_{name}" in timm.list_models()
            assert BASELINE[f"hafa_{name}"] == name


def test_a_model_of_another_family_is_refused_naming_the_families():
    with pytest.raises(ValueError, match="hafa.convert takes models of these families: pvt_v2, swin"):
        hafa.convert(timm.create_model("resnet18"))


@pytest.mark.parametrize(
    ("size", "window", "shift"),
    [((56, 56), (7, 7), (3, 3)), ((14, 21), (7, 7), (3, 3)), ((8, 12), (4, 4), (0, 2)), ((16, 8), (8, 4), (4, 0))],
)
def test_shifted_window_mask_is_timms(size, window, shift):
    block = SwinTransformerBlock(
        dim=8, input_resolution=size, num_heads=2, window_size=window, shift_size=shift, dynamic_mask=True
    )
    block.window_size, block.shift_size = window, shift  # as timm's blocks hold them for these sizes
    expected = SwinTransformerBlock.get_attn_mask(block, torch.zeros(1, *size, 8))
    assert torch.equal(shifted_window_mask(size, window, shift, torch.device("cpu"), torch.float32), expected)


def test_what_is_not_a_model_to_convert_gets_one_value_error_naming_it():
    for given, message in (
        (None, r"model must be a timm model \(an nn.Module.*got NoneType"),
        ("pvt_v2_b0", r"not a model's name: pass the model, e.g. hafa.convert\(timm.create_model\('pvt_v2_b0'\)\)"),
        (timm.create_model("hafa_pvt_v2_b0"), "already a HAFA model .converted from PyramidVisionTransformerV2"),
        (timm.create_model("pvt_v2_b0", features_only=True), "not timm's features_only wrapper .FeatureListNet."),
        (timm.create_model("hafa_pvt_v2_b0", features_only=True), "not timm's features_only wrapper"),
    ):
        with pytest.raises(ValueError, match=message):
            hafa.convert(given)
    with pytest.raises(ValueError, match="already a HAFA model"):
        HafaModel(model=hafa.convert(base_model("pvt_v2")))


def stage(model: torch.nn.Module, index: int) -> torch.nn.Module:
    return (model.layers if hasattr(model, "layers") else model.stages)[index]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_keeps_its_mode_and_new_layers_take_their_parts(family):
    model = base_model(family).train()
    model.get_classifier().eval()
    converted = hafa.convert(model)
    assert converted.training
    assert not converted.get_classifier().training  # was: switched back to training
    new_layers = [m for m in converted.modules() if isinstance(m, (LAA, LAAPatchMerging, SIA))]
    assert len(new_layers) == 3
    assert all(m.training for layer in new_layers for m in layer.modules())
    model.eval()
    stage(model, 1).train()  # the stage whose transition becomes LAA: its new layers train with it
    converted = hafa.convert(model)
    assert not converted.training
    assert not converted.get_classifier().training
    assert all(m.training for m in stage(converted, 1).modules())  # its LAA included
    assert not any(m.training for m in stage(converted, 3).modules())  # SIA included


# What a head's pooling computes on B x N x C tokens, written out (timm's pool types).
POOLED = {
    "avg": lambda t: t.mean(1),
    "max": lambda t: t.amax(1),
    "avgmax": lambda t: 0.5 * (t.mean(1) + t.amax(1)),
    "catavgmax": lambda t: torch.cat([t.mean(1), t.amax(1)], dim=-1),
}
SMALL_SWIN = dict(img_size=64, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=5)


# family -> (a small model with a given global_pool, its head on pooled tokens B x C, the pool types it takes)
HEADS = {
    "swin": (
        lambda pool: timm.create_model("swin_tiny_patch4_window7_224", window_size=2, global_pool=pool, **SMALL_SWIN),
        lambda model, pooled: model.head.fc(pooled),
        ("avg", "max", "avgmax", "catavgmax"),
    ),
    "swinv2": (
        lambda pool: timm.create_model("swinv2_tiny_window8_256", window_size=4, global_pool=pool, **SMALL_SWIN),
        lambda model, pooled: model.head.fc(pooled),
        ("avg", "max", "avgmax", "catavgmax"),
    ),
    "metaformer": (  # timm's MetaFormer refuses catavgmax itself
        lambda pool: CASES["caformer"].make(global_pool=pool, num_classes=5),
        lambda model, pooled: model.head.fc(model.head.norm(pooled[:, :, None, None]).flatten(1)),
        ("avg", "max", "avgmax"),
    ),
}


@pytest.mark.parametrize("family", HEADS)
def test_the_head_on_merged_tokens_pools_as_the_models_own_head(family):
    make, head, pools = HEADS[family]
    x = torch.randn(2, 3, 64, 64)
    outputs = {}
    for pool in (*pools, ""):
        torch.manual_seed(0)
        model = hafa.convert(make(pool), stage_aggregation=("conv", "conv", "sia")).eval()
        with torch.no_grad():
            tokens = model.forward_features(x)  # B x N x C, normalised
            outputs[pool] = model.forward_head(tokens)
            if pool:
                torch.testing.assert_close(outputs[pool], head(model, POOLED[pool](tokens)))
                assert torch.equal(model(x), outputs[pool])
    assert outputs["max"].shape == outputs["avg"].shape == (2, 5)
    assert not torch.allclose(outputs["max"], outputs["avg"])  # was: the mean whatever the pool type
    assert outputs[""].shape == (2, tokens.shape[1], 5)  # no pooling: a prediction per merged token


def test_a_pool_type_the_token_head_cannot_take_is_refused_naming_it():
    model = base_model("pvt_v2")
    model.global_pool = "max"  # timm's PVT v2 takes 'avg' or '' only, and mean-pools for any other value
    with pytest.raises(ValueError, match="global_pool 'max': a pvt_v2 model whose last stage starts with SIA"):
        hafa.convert(model)
    assert hafa.convert(model, stage_aggregation=("laa", "laa", "conv")).global_pool == "max"  # a grid: timm's head
    converted = hafa.convert(base_model("pvt"))  # PVT v1 mean-pools: no class token after SIA
    with pytest.raises(ValueError, match="global_pool 'token': a pvt model .* with 'avg' or '' only"):
        converted.reset_classifier(3, "token")
    converted.reset_classifier(3, "")
    with torch.no_grad():
        tokens = converted.eval().forward_features(torch.randn(1, 3, 64, 64))
        torch.testing.assert_close(converted.forward_head(tokens), converted.head(tokens))

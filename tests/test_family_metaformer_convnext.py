"""hafa.convert on timm's MetaFormer (caformer with SIA; convformer, poolformer v2 and v1 with LAA only)
and ConvNeXt (LAA only): exactness without SIA, training, the four strides, timm checkpoints, the
registered models, the refusals, compile and export.

The models are the named variants' configurations with fewer and narrower blocks (MetaFormer's named
variants take no depths), so that the whole file runs in well under a minute on two cores; the
registered hafa_<name> models are the full ones."""

import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import metaformer
from timm.models.metaformer import GroupNorm1, GroupNorm1NoBias, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer

import hafa
from hafa.data.mnist import prepare_mnist5k
from hafa.layers import SIA, DeformableConv2d
from hafa.models import HafaModel
from hafa.models.families.metaformer import FAMILY as METAFORMER
from hafa.models.families.metaformer import clustered_block
from hafa.ops import TokenLayout

NUM_CLASSES = 10
SMALL = dict(depths=(1, 1, 2, 2), dims=(32, 64, 96, 128), num_classes=NUM_CLASSES)
LAA_ONLY = ("laa", "laa", "laa")


def caformer(**kwargs) -> MetaFormer:
    """caformer_s18's mixers and norms: separable convs, then attention in stages 3 and 4."""
    return MetaFormer(
        token_mixers=[metaformer.SepConv, metaformer.SepConv, metaformer.Attention, metaformer.Attention],
        norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2,
        **{**SMALL, **kwargs},
    )


# family -> (a small model of it, its default stage aggregation)
MODELS = {
    "caformer": (caformer, ("laa", "laa", "sia")),
    "convformer": (
        lambda: MetaFormer(token_mixers=metaformer.SepConv, norm_layers=LayerNorm2dNoBias, **SMALL),
        LAA_ONLY,
    ),
    "poolformerv2": (lambda: MetaFormer(norm_layers=GroupNorm1NoBias, use_mlp_head=False, **SMALL), LAA_ONLY),
    "poolformer": (  # v1: no norm before the downsampling conv, layer scales, no residual scales
        lambda: MetaFormer(
            downsample_norm=None,
            mlp_act=torch.nn.GELU,
            mlp_bias=True,
            norm_layers=GroupNorm1,
            layer_scale_init_values=1e-5,
            res_scale_init_values=None,
            use_mlp_head=False,
            **SMALL,
        ),
        LAA_ONLY,
    ),
    "convnext": (
        lambda: timm.create_model("convnext_atto", depths=(1, 1, 1, 1), num_classes=NUM_CLASSES),
        LAA_ONLY,
    ),
}
TRAINED = ["caformer", "convformer", "poolformerv2", "convnext"]


def base_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[family][0]().eval()


def default_conversion(family: str, seed: int = 0) -> HafaModel:
    return hafa.convert(base_model(family, seed), stage_aggregation=MODELS[family][1])


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The first training image of each of the digits 0-7 of MNIST-5k, 3 x 64 x 64 in [-1, 1], and the digits."""
    root = prepare_mnist5k()
    images = []
    for digit in range(8):
        folder = os.path.join(root, "train", str(digit))
        with Image.open(os.path.join(folder, sorted(os.listdir(folder))[0])) as image:
            pixels = np.asarray(image.convert("L").resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255
        images.append(torch.from_numpy(pixels))
    images = torch.stack(images).unsqueeze(1).expand(-1, 3, -1, -1) * 2 - 1
    return images.contiguous(), torch.arange(8)


@pytest.mark.parametrize("family", MODELS)
def test_without_sia_the_conversion_computes_the_model(family):
    model = base_model(family)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        conv = hafa.convert(model, stage_aggregation=("conv", "conv", "conv"), laa_norm="baseline").eval()
        assert torch.equal(conv(x), expected)
        laa = hafa.convert(model, stage_aggregation=("laa", "laa", "conv"), laa_norm="baseline").eval()
        # LAA's matmul sums in another order than the conv: equal up to float rounding
        torch.testing.assert_close(laa(x), expected, atol=1e-5, rtol=1e-5)
    assert sum(isinstance(m, DeformableConv2d) for m in laa.modules()) == 2
    assert laa.state_dict().keys() >= model.state_dict().keys()  # timm's names, the offsets added


@pytest.mark.parametrize("family", TRAINED)
def test_the_default_conversion_trains_on_mnist(family, digits):
    torch.manual_seed(0)
    converted = default_conversion(family).train()
    assert sum(isinstance(m, SIA) for m in converted.modules()) == (family == "caformer")
    images, labels = digits
    optimizer = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(converted(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("family", TRAINED)
def test_intermediates_have_strides_4_to_32_at_an_odd_size(family):
    size = (70, 90)
    converted = default_conversion(family).eval()
    with torch.no_grad():
        final, maps = converted.forward_intermediates(torch.randn(2, 3, *size))
    assert [m.shape[1] for m in maps] == [info["num_chs"] for info in converted.feature_info]
    for feature_map, stride in zip(maps, (4, 8, 16, 32), strict=True):  # sizes rounded up or down
        assert feature_map.shape[0] == 2
        assert all(abs(n - s / stride) < 1 for n, s in zip(feature_map.shape[-2:], size)), (stride, feature_map.shape)
    if family == "caformer":  # after SIA: the merged tokens, B x N x C, that forward_head pools
        assert final.dim() == 3
        assert final.shape[-1] == maps[-1].shape[1]
    assert converted.forward_head(final).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("family", TRAINED)
def test_a_saved_timm_state_dict_loads_as_the_conversion_keeps_it(family, tmp_path):
    model = base_model(family, seed=3)
    path = tmp_path / "baseline.pth"
    torch.save(model.state_dict(), path)
    converted = hafa.convert(model, stage_aggregation=MODELS[family][1])
    fresh = default_conversion(family, seed=4)
    report = hafa.load_pretrained(fresh, str(path), verbose=False)
    kept = converted.conversion_report.copied
    assert set(kept) == set(report.copied)
    expected, got = converted.state_dict(), fresh.state_dict()
    for name in kept:
        assert torch.equal(got[name], expected[name]), name
    assert set(report.newly_initialised) == set(converted.conversion_report.newly_initialised)
    assert set(report.unused) == set(converted.conversion_report.unused)


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


def test_registered_models_use_the_familys_default_aggregation():
    with torch.device("meta"):
        for name, expected in [
            ("hafa_caformer_s18", ("laa", "laa", "sia")),
            ("hafa_convformer_s18", LAA_ONLY),
            ("hafa_poolformerv2_s12", LAA_ONLY),
            ("hafa_poolformer_s12", LAA_ONLY),
            ("hafa_convnext_atto", LAA_ONLY),
            ("hafa_convnextv2_atto", LAA_ONLY),
        ]:
            model = timm.create_model(name)
            assert isinstance(model, HafaModel)
            assert model.stage_aggregation == expected, name
            converted = hafa.convert(timm.create_model(name.removeprefix("hafa_")), stage_aggregation=expected)
            assert model.state_dict().keys() == converted.state_dict().keys(), name


@pytest.mark.parametrize("name", ["hafa_caformer_s18", "hafa_convnext_atto"])
def test_features_only(name):
    features = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 70, 90))
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    # 70 x 90 at stride 32: MetaFormer's 3x3/s2/p1 convs (and SIA) round up, ConvNeXt's 2x2/s2 down
    assert maps[-1].shape[-2:] == ((3, 3) if "caformer" in name else (2, 2))


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


def test_caformer_with_sia_compiles_as_one_graph():
    torch._dynamo.reset()
    model = default_conversion("caformer").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        got = torch.compile(model, fullgraph=True, backend="eager")(images)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_caformer_with_sia_exports_with_a_dynamic_batch_axis():
    model = default_conversion("caformer").eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
        images = torch.randn(3, 3, 64, 64)
        torch.testing.assert_close(program.module()(images), model(images), rtol=1e-5, atol=1e-5)

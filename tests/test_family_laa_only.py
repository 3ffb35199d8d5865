"""What is particular to the families whose stages have no attention across tokens (LAA transitions
only: InceptionNeXt, MambaOut, FocalNet, EdgeNeXt) beyond their conformance rows (tests/test_families.py,
whose small models these tests take): "sia" refused with the family's stages named, the forms a family
refuses, FocalNet's post-norm blocks and MLP head, fewer feature maps, export."""

import pytest
import timm
import torch
from timm.models.focalnet import FocalNet

import hafa
from test_families import CASES, LAA_ONLY, NUM_CLASSES, base_model

ROWS = ["inception_next", "mambaout", "mambaout_rw", "focalnet", "focalnet_fl3", "edgenext"]


@pytest.mark.parametrize("name", ROWS)
def test_sia_is_refused_where_no_stage_attends_and_the_default_is_laa_three_times(name):
    with pytest.raises(ValueError, match=r"stage 4 has no attention \(its stages with attention: none\)"):
        hafa.convert(base_model(name), stage_aggregation=("laa", "laa", "sia"))
    assert hafa.convert(base_model(name)).options.stage_aggregation == ("laa", "laa", "laa")


def test_edgenext_small_rw_refuses_laa_where_a_block_downsamples():
    model = timm.create_model("edgenext_small_rw", depths=(1, 2, 2, 2), num_classes=NUM_CLASSES).eval()
    with pytest.raises(ValueError, match=r"edgenext's stages.1.downsample is Identity: .*downsample_block=True"):
        hafa.convert(model, stage_aggregation=LAA_ONLY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(hafa.convert(model, stage_aggregation=("conv", "conv", "conv"))(x), model(x))
    assert "hafa_edgenext_small_rw" not in timm.list_models("hafa_edgenext*")


def test_inception_next_refuses_laa_on_a_dilated_transition():
    model = CASES["inception_next"].make(output_stride=16).eval()
    with pytest.raises(ValueError, match=r"inception_next's stages.3.downsample does not downsample .*output_stride"):
        hafa.convert(model, stage_aggregation=LAA_ONLY)
    hafa.convert(model, stage_aggregation=("laa", "laa", "conv"))


def test_focalnet_fl3_post_norms_and_mlp_head_without_sia_compute_the_model():
    torch.manual_seed(0)
    model = FocalNet(
        num_classes=NUM_CLASSES,
        embed_dim=16,
        depths=(1, 1, 1, 1),
        use_overlap_down=True,
        use_post_norm=True,
        head_hidden_size=32,
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        laa = hafa.convert(model, stage_aggregation=LAA_ONLY, laa_norm="baseline").eval()
        torch.testing.assert_close(laa(x), expected, atol=1e-5, rtol=1e-5)
        clustered = hafa.convert(model, stage_aggregation=LAA_ONLY).eval()
        assert clustered(x).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize(
    "name",
    [  # FocalNet's named variants fix depths and width: at full size it builds and runs for many seconds
        pytest.param(name, marks=[pytest.mark.slow] if name == "focalnet" else [])
        for name in ("inception_next", "mambaout", "focalnet", "edgenext")
    ],
)
def test_fewer_feature_maps_drop_the_head(name):
    """The head, sized for the last stage, goes as timm's own prune drops it."""
    case = CASES[name]
    features = timm.create_model(
        f"hafa_{case.registered}", features_only=True, out_indices=(0, 1), **case.registered_kwargs
    )
    assert [m.shape[1] for m in features(torch.randn(1, 3, 32, 32))] == features.feature_info.channels()


@pytest.mark.slow
@pytest.mark.parametrize("name", ROWS)
def test_the_default_conversion_exports_with_a_dynamic_batch_axis(name):
    model = hafa.convert(base_model(name), stage_aggregation=LAA_ONLY).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
        images = torch.randn(3, 3, 64, 64)
        torch.testing.assert_close(program.module()(images), model(images), rtol=1e-5, atol=1e-5)

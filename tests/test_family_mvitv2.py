"""What is particular to MViTv2 (downsampling inside attention) beyond its conformance row
(tests/test_families.py, whose small model these tests take): SIA in every stage, every model of timm's
module converted or refused, the refusals, and the layers the family adds (a deformable max pool,
depthwise LAA, blocks on merged tokens) against their references."""

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

import hafa
from hafa.layers import DeformableConv2d
from hafa.models import HafaModel
from hafa.models.families import mvitv2
from hafa.models.families.mvitv2 import REFUSED
from hafa.ops import TokenLayout
from test_families import NUM_CLASSES, base_model, small_mvitv2, trained_like


def test_sia_in_every_stage_gives_strides_4_to_32():
    converted = hafa.convert(base_model("mvitv2"), stage_aggregation=("sia", "sia", "sia")).eval()
    with torch.no_grad():
        final, maps = converted.forward_intermediates(torch.randn(2, 3, 96, 96))
    assert [tuple(m.shape[1:]) for m in maps] == [
        (info["num_chs"], side, side) for info, side in zip(converted.feature_info, (24, 12, 6, 3), strict=True)
    ]
    assert final.dim() == 3  # the merged tokens, normalised
    assert converted.forward_head(final).shape == (2, NUM_CLASSES)


def test_every_model_of_the_timm_module_converts_or_is_refused_in_one_line():
    names = timm.list_models(module="mvitv2")
    converted, refused = [], []
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name)
            if name in REFUSED:
                with pytest.raises(ValueError, match=re.escape(REFUSED[name])) as error:
                    hafa.convert(model)
                assert "\n" not in str(error.value)
                assert f"hafa_{name}" not in timm.list_models()
                refused.append(name)
            else:
                assert isinstance(hafa.convert(model), HafaModel)
                assert f"hafa_{name}" in timm.list_models()
                converted.append(name)
    assert converted
    assert len(converted) + len(refused) == len(names)


def test_mvitv2_refuses_cluster_qkv_and_transitions_that_do_not_pool():
    model = base_model("mvitv2")
    with pytest.raises(ValueError, match="clusters the queries only"):
        hafa.convert(model, cluster_qkv=True)
    with pytest.raises(ValueError, match="stage 1 does not downsample"):
        mvitv2.FAMILY.pooling_block(model, 0)


@pytest.mark.parametrize(("size", "offset"), [((9, 9), (0, 0)), ((8, 11), (0, 1)), ((7, 6), (-1, 0))])
def test_a_deformable_max_pool_at_whole_pixel_offsets_pools_the_shifted_map(size, offset):
    pool = torch.nn.MaxPool2d(3, stride=2, padding=1)
    deformable = mvitv2.DeformableMaxPool2d.from_pool(pool, channels=4, laa_norm="baseline")
    with torch.no_grad():
        deformable.offset.bias.copy_(torch.tensor(offset, dtype=torch.float).repeat(9))
    x = torch.randn(2, 4, *size)
    dy, dx = offset
    # each window read (dy, dx) further: the pool's windows over the map padded (by -inf) two pixels wide
    padded = F.pad(x, (2, 2, 2, 2), value=float("-inf"))
    expected = F.max_pool2d(padded[..., 1 + dy :, 1 + dx :], 3, stride=2)[
        ..., : (size[0] - 1) // 2 + 1, : (size[1] - 1) // 2 + 1
    ]
    expected = expected.masked_fill(expected == float("-inf"), 0)  # no point inside: 0
    assert torch.equal(deformable(x), expected)


def test_a_depthwise_laa_is_torchvisions_deformable_conv():
    conv = torch.nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False)
    laa = DeformableConv2d.from_conv(conv, "baseline")
    with torch.no_grad():
        laa.offset.weight.normal_(std=0.3)
    x = torch.randn(2, 6, 9, 10)
    with torch.no_grad():
        got, offsets = laa(x, return_offsets=True)
        expected = deform_conv2d(x, offsets, conv.weight, stride=2, padding=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mvitv2_blocks_on_a_grid_are_timms_without_relative_positions():
    model = base_model("mvitv2")
    with torch.no_grad():
        for stage in model.stages[1:3]:
            block = stage.blocks[1]  # stride-1 queries; keys and values pooled at the stage's stride (2, then 1)
            block.attn.rel_pos_h.zero_()
            block.attn.rel_pos_w.zero_()
            side = stage.feat_size[0]
            x = torch.randn(2, side * side, block.dim)
            expected, _ = block(x, (side, side))
            got = mvitv2.ClusteredBlock(block=block).eval()(x, TokenLayout((side, side)))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mvitv2_sia_keeps_keys_and_values_on_the_grid():
    torch.manual_seed(0)
    model = trained_like(small_mvitv2(img_size=64).eval(), seed=0)  # stage 3's map: 8 x 8
    converted = hafa.convert(model, stage_aggregation=("laa", "sia", "sia")).eval()
    block = converted.stages[2].blocks[0]
    x = torch.randn(2, 8 * 8, block.norm1.normalized_shape[0])
    layout = TokenLayout((8, 8))
    with torch.no_grad():
        q, k, v = block.attn.project(block.norm1(x), layout)
        out, merged = block(x, layout)
    assert k.shape[2] == v.shape[2] == 8 * 8  # timm's key/value pooling of the 8 x 8 grid (stride 1 here)
    assert out.shape[1] == merged.num_tokens == 16  # a quarter of the tokens as queries
    assert merged.map_size == (4, 4)

import pytest
import torch
from torch import nn
from torchvision.ops import deform_conv2d

from hafa import HafaOptions
from hafa.layers import LAA, SIA, ConvDownsample, pvt_block, spatial_reduction_attention
from hafa.ops import TokenLayout


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size"),
    [(3, 2, 1, (15, 12)), (2, 2, 0, (14, 14)), (2, 2, 0, (7, 9)), (3, 2, 1, (1, 1))],
)
def test_laa_with_zero_offsets_is_the_conv(kernel, stride, padding, size):
    laa = LAA(8, 16, kernel, stride, padding, norm_layer=None, laa_norm="baseline")
    x = torch.randn(2, 8, *size)
    expected = nn.functional.conv2d(x, laa.proj.weight, laa.proj.bias, stride, padding)
    torch.testing.assert_close(laa(x).permute(0, 3, 1, 2), expected, atol=1e-5, rtol=1e-5)


def test_laa_in_baseline_mode_shares_weights_and_norm_with_the_conv():
    conv = ConvDownsample(8, 16, 3, 2, 1)
    laa = LAA(8, 16, 3, 2, 1, laa_norm="baseline")
    missing, unexpected = laa.load_state_dict(conv.state_dict(), strict=False)
    assert missing == ["offset.weight", "offset.bias"]
    assert unexpected == []
    x = torch.randn(2, 8, 13, 10)
    torch.testing.assert_close(laa(x), conv(x), atol=1e-5, rtol=1e-5)


def test_laa_default_is_deformable_conv_then_batch_norm_and_gelu():
    torch.manual_seed(0)
    laa = LAA(6, 10, 3, 2, 1)
    nn.init.normal_(laa.offset.weight, std=0.5)
    x = torch.randn(4, 6, 11, 9)
    out, offsets = laa(x, return_offsets=True)
    conv = deform_conv2d(x, offsets, laa.proj.weight, laa.proj.bias, stride=2, padding=1)
    mean, var = conv.mean((0, 2, 3), keepdim=True), conv.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = nn.functional.gelu((conv - mean) / torch.sqrt(var + laa.norm.eps))
    torch.testing.assert_close(out.permute(0, 3, 1, 2), expected, atol=1e-5, rtol=1e-4)
    laa.eval()  # running statistics after one step: momentum 0.1 from (0, 1)
    torch.testing.assert_close(laa.norm.running_mean, 0.1 * mean.flatten())


def test_laa_rejects_an_unknown_norm():
    with pytest.raises(ValueError, match="laa_norm"):
        LAA(4, 8, 3, 2, 1, laa_norm="layer")


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 2, 1), (2, 2, 0)])
def test_laa_matches_torchvision_deform_conv2d_with_learned_offsets(kernel, stride, padding):
    torch.manual_seed(0)
    laa = LAA(6, 10, kernel, stride, padding, norm_layer=None, laa_norm="baseline")
    nn.init.normal_(laa.offset.weight, std=0.5)
    nn.init.normal_(laa.offset.bias, std=1.0)
    x = torch.randn(2, 6, 11, 9, requires_grad=True)
    out, offsets = laa(x, return_offsets=True)
    expected = deform_conv2d(x, offsets, laa.proj.weight, laa.proj.bias, stride=stride, padding=padding)
    torch.testing.assert_close(out.permute(0, 3, 1, 2), expected, atol=1e-5, rtol=1e-5)
    # and the gradients agree
    grad = torch.randn_like(expected)
    g_ours = torch.autograd.grad((out.permute(0, 3, 1, 2) * grad).sum(), (x, laa.proj.weight), retain_graph=True)
    g_ref = torch.autograd.grad((expected * grad).sum(), (x, laa.proj.weight))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_laa_offsets_start_at_zero_and_learn():
    laa = LAA(4, 8, 3, 2, 1)
    x = torch.randn(2, 4, 10, 10)
    out, offsets = laa(x, return_offsets=True)
    assert offsets.shape == (2, 18, 5, 5)
    assert offsets.abs().max() == 0
    out.pow(2).sum().backward()
    assert laa.offset.weight.grad.abs().sum() > 0


def test_laa_runs_under_bfloat16_autocast():
    laa = LAA(4, 8, 3, 2, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = laa(torch.randn(2, 4, 9, 9))
    assert out.shape == (2, 5, 5, 8)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    ("size", "expected_map"), [((14, 14), (7, 7)), ((7, 9), (4, 5)), ((1, 1), (1, 1)), ((50, 84), (25, 42))]
)
@pytest.mark.parametrize("cluster_qkv", [False, True])
def test_sia_shapes(size, expected_map, cluster_qkv):
    sia = SIA(32, 48, options=HafaOptions(cluster_qkv=cluster_qkv))
    H, W = size
    x = torch.randn(2, H * W, 32)
    out = sia(x, TokenLayout(size))
    M = -(-H * W // 4)
    assert out.queries.shape == (2, M, 48)
    assert out.layout.map_size == expected_map
    assert out.layout.grid_size == size
    assert out.layout.num_tokens == M
    assert out.layout.index.shape == (2, H * W)
    assert out.layout.index.max() < M
    if cluster_qkv:
        assert out.kv is None
    else:
        kv_tokens, kv_layout = out.kv
        assert kv_tokens.shape == (2, expected_map[0] * expected_map[1], 48)
        assert kv_layout.is_grid
    assert out.layout.to_map(out.queries).shape == (2, 48, *expected_map)


def test_sia_on_merged_tokens_composes_the_dictionary():
    first, second = SIA(16, 24), SIA(24, 32)
    out1 = first(torch.randn(2, 12 * 10, 16), TokenLayout((12, 10)))
    out2 = second(out1.queries, out1.layout)
    assert out2.queries.shape == (2, 8, 32)
    assert out2.layout.grid_size == (12, 10)
    assert out2.layout.map_size == (3, 3)
    assert out2.layout.index.max() < 8


def test_sia_gradients_reach_projection_scores_and_kv_path():
    sia = SIA(16, 24)
    out = sia(torch.randn(2, 64, 16, requires_grad=True), TokenLayout((8, 8)))
    (out.queries.sum() + out.kv[0].sum()).backward()
    for p in (sia.proj.weight, sia.skip.weight, sia.score.weight, sia.kv_proj.weight, sia.kv_dwconv.weight):
        assert p.grad is not None
        assert p.grad.abs().sum() > 0


def _official_keys_values(sia, x, size):
    """The authors' keys/values path written out: a token-wise 1x1 projection (no bias) to the output
    width, depthwise 5x5/s2 on the output channels, 1x1 conv, plus the 3x3/s2 projection map, LayerNorm."""
    B, _, C = x.shape
    H, W = size
    grid = x.transpose(1, 2).reshape(B, C, H, W)
    projected = torch.einsum("oc,bchw->bohw", sia.kv_proj.weight, grid)
    out_dim = projected.shape[1]
    depthwise = nn.functional.conv2d(
        projected, sia.kv_dwconv.weight, sia.kv_dwconv.bias, stride=2, padding=2, groups=out_dim
    )
    pointwise = torch.einsum("oc,bchw->bohw", sia.kv_pwconv.weight[:, :, 0, 0], depthwise)
    pointwise = pointwise + sia.kv_pwconv.bias.view(1, -1, 1, 1)
    projection = nn.functional.conv2d(grid, sia.proj.weight, sia.proj.bias, stride=2, padding=1)
    summed = (pointwise + projection).flatten(2).transpose(1, 2)
    return nn.functional.layer_norm(summed, (out_dim,), sia.kv_norm.weight, sia.kv_norm.bias, eps=sia.kv_norm.eps)


@pytest.mark.parametrize("size", [(14, 14), (7, 9)])
def test_sia_keys_values_are_the_official_path(size):
    torch.manual_seed(0)
    sia = SIA(16, 24)
    for p in sia.parameters():  # nothing at a trivial initial value (LayerNorm's ones and zeros)
        p.data.normal_(std=0.3)
    x = torch.randn(2, size[0] * size[1], 16)
    kv_tokens, kv_layout = sia(x, TokenLayout(size)).kv
    assert kv_layout.map_size == (-(-size[0] // 2), -(-size[1] // 2))
    torch.testing.assert_close(kv_tokens, _official_keys_values(sia, x, size), atol=1e-5, rtol=1e-4)


def test_sia_runs_under_bfloat16_autocast():
    sia = SIA(16, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sia(torch.randn(2, 63, 16), TokenLayout((7, 9)))
    assert torch.isfinite(out.queries.float()).all()


def test_hafa_options_reject_bad_settings_and_sia_takes_only_them():
    with pytest.raises(ValueError, match="cluster_ratio must be a number > 0"):
        HafaOptions(cluster_ratio=0)
    with pytest.raises(ValueError, match="knn_k"):
        HafaOptions.of({"knn_k": 0})
    with pytest.raises(ValueError, match="recipe: unknown HAFA option 'ratio'"):
        HafaOptions.of({"ratio": 0.5}, where="recipe")
    with pytest.raises(ValueError, match="options must be a hafa.HafaOptions, got dict"):
        SIA(8, 8, options={"knn_k": 3})
    options = HafaOptions(stage_aggregation=["laa", "conv", "sia"], cluster_ratio=0.5)
    assert options.stage_aggregation == ("laa", "conv", "sia")
    assert options.replace(knn_k=3) == HafaOptions.of(dict(options.keywords(), knn_k=3))
    assert options.num_clusters(7) == 4
    assert HafaOptions(cluster_ratio=0.01).num_clusters(7) == 1


def test_attention_over_separate_keys_values_with_spatial_reduction():
    attn = spatial_reduction_attention(32, num_heads=4, sr_ratio=2)
    q = torch.randn(2, 10, 32)
    kv = torch.randn(2, 6 * 8, 32)
    out = attn(q, TokenLayout((5, 2)), (kv, TokenLayout((6, 8))))
    assert out.shape == (2, 10, 32)
    # self-attention is the same layer with kv = the queries
    grid = torch.randn(2, 6 * 8, 32)
    torch.testing.assert_close(
        attn(grid, TokenLayout((6, 8))), attn(grid, TokenLayout((6, 8)), (grid, TokenLayout((6, 8))))
    )


def test_block_works_on_merged_tokens_through_the_dictionary():
    sia = SIA(16, 32)
    out = sia(torch.randn(2, 81, 16), TokenLayout((9, 9)))
    block = pvt_block(32, num_heads=2, sr_ratio=2, dwconv_mlp=True)
    y = block(out.queries, out.layout, out.kv)
    y = block(y, out.layout)
    assert y.shape == out.queries.shape
    linear = pvt_block(32, num_heads=2, linear=True)
    assert linear(out.queries, out.layout).shape == out.queries.shape

"""hafa.convert on the families that downsample inside attention (MViTv2's pooling attention): exactness
without SIA, training, the four strides at an odd size, timm checkpoints, features_only, fullgraph
compile, bfloat16, every model of the timm module converted or refused, and the layers the family adds
(a deformable max pool, depthwise LAA, blocks on merged tokens) against their references.

Each family is a row of FAMILIES: a small configuration of its smallest model at 64 px (the file runs in
about a minute on two cores); the registered models are built in full on the meta device, and run once."""

import copy
import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform
from timm.models import mvitv2 as timm_mvitv2
from torchvision.ops import deform_conv2d

import hafa
from hafa.data.folder import ImageFolderDataset
from hafa.data.mnist import prepare_mnist5k
from hafa.layers import DeformableConv2d
from hafa.models import HafaModel
from hafa.models.families import mvitv2
from hafa.models.families.mvitv2 import REFUSED
from hafa.ops import TokenLayout

NUM_CLASSES = 8


def small_mvitv2(img_size: int) -> torch.nn.Module:
    """mvitv2_tiny's configuration with one or two blocks per stage at a third of its width."""
    cfg = dataclasses.replace(timm_mvitv2.model_cfgs["mvitv2_tiny"], depths=(1, 2, 2, 1), embed_dim=32)
    return timm_mvitv2.MultiScaleVit(cfg, img_size=img_size, num_classes=NUM_CLASSES)


@dataclass(frozen=True)
class Row:
    """A family: its timm module, its smallest model, a small configuration of it (built for an image
    side) that most tests convert, the side its stage maps are odd at and those sides, and the names of
    what the default conversion leaves out of the timm model."""

    timm_module: str
    name: str
    small: Callable[[int], torch.nn.Module]
    size: int = 64
    odd_size: int = 96
    odd_maps: tuple = ()
    left_out: str = ""


FAMILIES = {
    "mvitv2": Row(
        timm_module="mvitv2",
        name="mvitv2_tiny",
        small=small_mvitv2,
        odd_maps=(24, 12, 6, 3),  # timm's MViTv2 takes square sides divisible by 32 (its relative positions)
        # the query norms LAA's BatchNorms replace, the relative positions of the blocks on merged tokens
        left_out=r"stages\.[12]\.blocks\.0\.attn\.norm_q\.|stages\.3\.blocks\.\d+\.attn\.rel_pos_[hw]",
    ),
}


def trained_like(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initial value (norms at one, biases at zero in every seed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.02)
    return model


@functools.cache
def _timm_model(family: str, seed: int, size: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family].small(size).eval()


def base_model(family: str, seed: int = 0, trained: bool = True, size: int | None = None) -> torch.nn.Module:
    """A seeded timm model of the family built for `size` (the row's by default), a copy, trained_like."""
    model = copy.deepcopy(_timm_model(family, seed, size or FAMILIES[family].size))
    return trained_like(model, seed) if trained else model


def images(family: str, size: int | None = None, batch: int = 2) -> torch.Tensor:
    side = size or FAMILIES[family].size
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """One MNIST-5k training image of each digit 0-7 at 64 x 64, and the digits."""
    dataset = ImageFolderDataset(prepare_mnist5k(), "train", create_transform(64, crop_pct=1.0))
    firsts = [next(i for i, (_, digit) in enumerate(dataset.samples) if digit == d) for d in range(NUM_CLASSES)]
    samples, labels, _ = zip(*(dataset[i] for i in firsts))
    return torch.stack(samples), torch.tensor(labels)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_sia_the_conversion_computes_the_model(family):
    model = base_model(family)
    x = images(family)
    with torch.no_grad():
        expected = model(x)
        conv = hafa.convert(model, stage_aggregation=("conv", "conv", "conv"), laa_norm="baseline").eval()
        assert torch.equal(conv(x), expected)
        laa = hafa.convert(model, stage_aggregation=("laa", "laa", "laa"), laa_norm="baseline").eval()
        torch.testing.assert_close(laa(x), expected, atol=1e-5, rtol=1e-5)  # sums in another order
        torch.testing.assert_close(laa.forward_features(x), model.forward_features(x), atol=1e-5, rtol=1e-5)
    assert sum(hasattr(m, "reset_offsets") for m in laa.modules()) == 6  # each transition's two poolings
    assert laa.state_dict().keys() >= model.state_dict().keys()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_conversion_trains_on_mnist(family, digits):
    torch.manual_seed(0)
    converted = hafa.convert(base_model(family, trained=False)).train()
    assert converted.stage_aggregation == ("laa", "laa", "sia")
    samples, labels = digits
    optimizer = torch.optim.AdamW(converted.parameters(), lr=3e-4)  # at 1e-3 the baseline too zigzags here
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(converted(samples), labels)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            offsets = [m.offset.weight.grad for m in converted.modules() if hasattr(m, "reset_offsets")]
            assert all(g is not None and g.abs().sum() > 0 for g in offsets)  # LAA learns where to read
            assert converted.stages[3].blocks[0].score.weight.grad.abs().sum() > 0  # SIA's importance score
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage_aggregation", [("laa", "laa", "sia"), ("sia", "sia", "sia")])
def test_intermediates_have_strides_4_to_32_at_an_odd_size(family, stage_aggregation):
    row = FAMILIES[family]
    model = base_model(family, size=row.odd_size)
    converted = hafa.convert(model, stage_aggregation=stage_aggregation).eval()
    with torch.no_grad():
        final, maps = converted.forward_intermediates(images(family, row.odd_size))
    assert [tuple(m.shape[1:]) for m in maps] == [
        (info["num_chs"], side, side) for info, side in zip(converted.feature_info, row.odd_maps, strict=True)
    ]
    assert [info["reduction"] for info in converted.feature_info] == [4, 8, 16, 32]
    assert final.dim() == 3  # the merged tokens, normalised
    assert final.shape[-1] == maps[-1].shape[1]
    assert converted.forward_head(final).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_timm_state_dict_loads_as_the_conversion_keeps_it(family, tmp_path):
    model = base_model(family, seed=3)
    path = tmp_path / "baseline.pth"
    torch.save(model.state_dict(), path)
    converted = hafa.convert(model)
    fresh = hafa.convert(base_model(family, seed=4))
    report = hafa.load_pretrained(fresh, str(path), verbose=False)
    kept = set(converted.conversion_report.copied)
    assert kept <= set(report.copied)
    expected, got = converted.state_dict(), fresh.state_dict()
    for name in kept:
        assert torch.equal(got[name], expected[name]), name
    left_out = {name for name in model.state_dict() if re.match(FAMILIES[family].left_out, name)}
    assert left_out
    assert set(converted.conversion_report.unused) == set(report.unused) == left_out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_registered_model_is_the_conversion_and_gives_features(family):
    row = FAMILIES[family]
    with torch.device("meta"):
        registered = timm.create_model(f"hafa_{row.name}")
        converted = hafa.convert(timm.create_model(row.name))
    assert isinstance(registered, HafaModel)
    assert registered.stage_aggregation == ("laa", "laa", "sia")
    assert registered.state_dict().keys() == converted.state_dict().keys()
    features = timm.create_model(f"hafa_{row.name}", features_only=True, img_size=row.odd_size).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = features(images(family, row.odd_size, batch=1))
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert [m.shape[-1] for m in maps] == list(row.odd_maps)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_model_of_the_timm_module_converts_or_is_refused_in_one_line(family):
    names = timm.list_models(module=FAMILIES[family].timm_module)
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


@pytest.fixture
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow  # about a minute on two busy cores
@pytest.mark.parametrize("family", FAMILIES)
def test_the_conversion_compiles_as_one_graph(family, fresh_compiler):
    converted = hafa.convert(base_model(family)).eval()
    x = images(family)
    with torch.no_grad():
        expected = converted(x)
        got = torch.compile(converted, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bfloat16_conversion_runs_in_bfloat16(family):
    model = base_model(family)
    x = images(family)
    halved = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        clustered = hafa.convert(halved).eval()
        assert {p.dtype for p in clustered.parameters()} == {torch.bfloat16}
        final, maps = clustered.forward_intermediates(x.to(torch.bfloat16))
        assert final.dtype == torch.bfloat16
        assert all(m.dtype == torch.bfloat16 and torch.isfinite(m).all() for m in maps)
        # without SIA it is the float32 model, to bfloat16's precision
        laa = hafa.convert(halved, stage_aggregation=("laa", "laa", "laa"), laa_norm="baseline").eval()
        expected = hafa.convert(model, stage_aggregation=("laa", "laa", "laa"), laa_norm="baseline").eval()(x)
        torch.testing.assert_close(laa(x.to(torch.bfloat16)).float(), expected, atol=0.1, rtol=0.05)


def test_mvitv2_refuses_cluster_qkv_and_transitions_that_do_not_pool():
    model = base_model("mvitv2")
    with pytest.raises(ValueError, match="clusters the queries only"):
        hafa.convert(model, cluster_qkv=True)
    family = mvitv2.FAMILY
    with pytest.raises(ValueError, match="stage 1 does not downsample"):
        family.pooling_block(model, 0)


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
    converted = hafa.convert(base_model("mvitv2"), stage_aggregation=("laa", "sia", "sia")).eval()
    block = converted.stages[2].blocks[0]
    x = torch.randn(2, 8 * 8, block.norm1.normalized_shape[0])
    layout = TokenLayout((8, 8))
    with torch.no_grad():
        q, k, v = block.attn.project(block.norm1(x), layout)
        out, merged = block(x, layout)
    assert k.shape[2] == v.shape[2] == 8 * 8  # timm's key/value pooling of the 8 x 8 grid (stride 1 here)
    assert out.shape[1] == merged.num_tokens == 16  # a quarter of the tokens as queries
    assert merged.map_size == (4, 4)

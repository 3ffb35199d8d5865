"""hafa.convert on timm's hierarchical families with attention stages beyond the first seven, one row
of FAMILIES each: exactness without SIA, training with SIA, the four strides at an odd size, timm
checkpoints, features_only, compile, bf16, the token head's pooling, and every timm model of the family
either converting or refused in one line.

Each row is a small configuration of a named variant (fewer blocks, narrower, small windows) at 64 px,
so that a test of a row runs in seconds on two cores (those marked slow: under a minute)."""

import copy
import functools
import re
from dataclasses import dataclass, field

import pytest
import timm
import torch
from timm.data import create_transform

import hafa
from hafa.data.folder import ImageFolderDataset
from hafa.data.mnist import prepare_mnist5k
from hafa.layers import SIA
from hafa.models import HafaModel
from hafa.models.families import davit, gcvit, tiny_vit
from hafa.ops import TokenLayout

NUM_CLASSES = 8


@dataclass(frozen=True)
class Row:
    timm_name: str
    kwargs: dict
    timm_module: str
    # what the default conversion (LAA with BatchNorm, SIA before stage 4) leaves out of the timm model
    left_out: str | None = None
    # an input size the models take (GCViT: only the size it is built for, as timm's)
    size: int = 64
    odd_size: tuple[int, int] = (70, 90)
    # the number of timm models of the module that convert with the defaults (the others are refused)
    converts: int | None = None
    # the pool types whose head on a map timm computes as the head's pooling of the map's positions
    pools: tuple[str, ...] = ("avg", "max", "")
    extra: dict = field(default_factory=dict)


FAMILIES = {
    "davit": Row(
        timm_name="davit_tiny",
        kwargs=dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), window_size=4),
        timm_module="davit",
        converts=8,
    ),
    "tiny_vit": Row(
        timm_name="tiny_vit_5m_224",
        kwargs=dict(
            depths=(1, 1, 2, 1), embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), window_sizes=(4, 4, 4, 2)
        ),
        timm_module="tiny_vit",
        left_out=r"stages\.3\.blocks\.\d+\.attn\.attention_biases",
        converts=5,
    ),
    # gcvit_* fix the depths and heads; 96 px with these windows gives stage maps 24, 12, 6, 3, each a
    # multiple of its window, global queries pooled to it (stages 1, 2), one 3 x 3 window in stage 4
    "gcvit": Row(
        timm_name="gcvit_xxtiny",
        kwargs=dict(img_size=96, embed_dim=16, window_size=(6, 6, 6, 3), mlp_ratio=2),
        timm_module="gcvit",
        left_out=r"stages\.[12]\.downsample\.norm2\.|stages\.3\.blocks\.\d+\.attn\.rel_pos\.",
        size=96,
        odd_size=(96, 96),
        converts=5,
        pools=("avg", "max"),
    ),
}


def trained_like(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initial value (timm starts norms at one and biases at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.02)
    return model


@functools.cache
def _timm_model(family: str, seed: int, global_pool: str) -> torch.nn.Module:
    row = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(row.timm_name, num_classes=NUM_CLASSES, global_pool=global_pool, **row.kwargs).eval()


def base_model(family: str, seed: int = 0, trained: bool = True, global_pool: str = "avg") -> torch.nn.Module:
    """A seeded timm model of the row (a copy: tests may change it), trained_like unless trained=False."""
    model = copy.deepcopy(_timm_model(family, seed, global_pool))
    return trained_like(model, seed) if trained else model


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """One MNIST-5k training image of each digit 0-7 at 64 x 64, and the digits."""
    dataset = ImageFolderDataset(prepare_mnist5k(), "train", create_transform(64, crop_pct=1.0))
    firsts = [next(i for i, (_, digit) in enumerate(dataset.samples) if digit == d) for d in range(NUM_CLASSES)]
    images, labels, _ = zip(*(dataset[i] for i in firsts))
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_sia_the_conversion_computes_the_model(family):
    model = base_model(family)
    x = torch.randn(2, 3, FAMILIES[family].size, FAMILIES[family].size)
    with torch.no_grad():
        expected = model(x)
        conv = hafa.convert(model, stage_aggregation=("conv", "conv", "conv"), laa_norm="baseline").eval()
        assert torch.equal(conv(x), expected)
        laa = hafa.convert(model, stage_aggregation=("laa", "laa", "conv"), laa_norm="baseline").eval()
        # LAA's matmul sums in another order than the conv: equal up to float rounding
        torch.testing.assert_close(laa(x), expected, atol=1e-5, rtol=1e-5)
    assert sum(hasattr(m, "reset_offsets") for m in laa.modules()) == 2
    assert laa.state_dict().keys() >= model.state_dict().keys()  # timm's names, the offsets added


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_conversion_trains_on_mnist(family, digits):
    torch.manual_seed(0)  # SIA's and LAA's new layers
    converted = hafa.convert(base_model(family, trained=False)).train()
    assert converted.stage_aggregation == ("laa", "laa", "sia")
    assert sum(isinstance(m, SIA) for m in converted.modules()) == 1
    images, labels = digits
    images = torch.nn.functional.interpolate(images, size=FAMILIES[family].size, mode="bilinear")
    optimizer = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(converted(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("family", FAMILIES)
def test_intermediates_have_strides_4_to_32_at_an_odd_size(family):
    size = FAMILIES[family].odd_size
    converted = hafa.convert(base_model(family)).eval()
    with torch.no_grad():
        final, maps = converted.forward_intermediates(torch.randn(2, 3, *size))
    assert [m.shape[1] for m in maps] == [info["num_chs"] for info in converted.feature_info]
    for feature_map, stride in zip(maps, (4, 8, 16, 32), strict=True):  # sizes rounded up or down
        assert feature_map.dim() == 4
        assert feature_map.shape[0] == 2
        assert all(abs(n - s / stride) < 1 for n, s in zip(feature_map.shape[-2:], size)), (stride, feature_map.shape)
    assert final.dim() == 3  # the merged tokens
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
    pattern = FAMILIES[family].left_out
    left_out = {name for name in model.state_dict() if pattern and re.match(pattern, name)}
    assert set(converted.conversion_report.unused) == left_out
    assert set(report.unused) == left_out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_registered_model_converts_and_gives_features(family):
    row = FAMILIES[family]
    with torch.device("meta"):
        registered = timm.create_model(f"hafa_{row.timm_name}")
        converted = hafa.convert(timm.create_model(row.timm_name))
    assert isinstance(registered, HafaModel)
    assert registered.stage_aggregation == ("laa", "laa", "sia")
    assert registered.state_dict().keys() == converted.state_dict().keys()
    features = timm.create_model(f"hafa_{row.timm_name}", features_only=True, **row.kwargs).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = features(torch.randn(1, 3, *row.odd_size))
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    for feature_map, stride in zip(maps, (4, 8, 16, 32), strict=True):
        assert all(abs(n - s / stride) < 1 for n, s in zip(feature_map.shape[-2:], row.odd_size)), feature_map.shape


@pytest.fixture
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_conversion_compiles_as_one_graph(family, fresh_compiler):
    converted = hafa.convert(base_model(family)).eval()
    images = torch.randn(2, 3, FAMILIES[family].size, FAMILIES[family].size)
    with torch.no_grad():
        expected = converted(images)
        got = torch.compile(converted, fullgraph=True, backend="aot_eager")(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_bfloat16_conversion_runs_in_bfloat16(family):
    converted = hafa.convert(base_model(family).to(torch.bfloat16)).eval()
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = converted(torch.randn(2, 3, FAMILIES[family].size, FAMILIES[family].size, dtype=torch.bfloat16))
    assert logits.dtype == torch.bfloat16
    assert logits.isfinite().all()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_token_head_pools_as_the_models_head_pools_a_map(family):
    """On a grid's tokens the head after SIA gives what the model's own head gives on the map; without
    pooling it predicts for each merged token."""
    size = FAMILIES[family].size
    for pool in ("avg", "max", ""):
        if pool in FAMILIES[family].pools:
            converted = hafa.convert(
                base_model(family, global_pool=pool), stage_aggregation=("laa", "laa", "laa")
            ).eval()
            with torch.no_grad():
                feature_map = converted.forward_features(torch.randn(2, 3, size, size))
                expected = converted.forward_head(feature_map)
                tokens = feature_map.flatten(2).transpose(1, 2)
                got = converted.family.token_head(converted, tokens, pre_logits=False)
            if not pool:  # a prediction per token, B x N x classes
                expected = expected.flatten(2).transpose(1, 2)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        clustered = hafa.convert(base_model(family, global_pool=pool)).eval()
        with torch.no_grad():
            logits = clustered(torch.randn(2, 3, size, size))
        assert logits.shape[0] == 2
        assert logits.shape[-1] == NUM_CLASSES
        assert logits.dim() == (2 if pool else 3)  # without pooling B x merged tokens x classes


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_timm_model_of_the_family_converts_or_is_refused_in_one_line(family):
    row = FAMILIES[family]
    converted, refused = 0, {}
    for name in timm.list_models(module=row.timm_module):
        with torch.device("meta"):
            model = timm.create_model(name)
            try:
                hafa.convert(model)
                converted += 1
            except ValueError as error:
                refused[name] = str(error)
    assert all("\n" not in reason and reason for reason in refused.values()), refused
    assert converted == row.converts, refused


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_after_sia_on_one_window_are_timms(family):
    """A stage's blocks rebuilt for merged tokens, run on a grid that is one window (where windowed
    attention is global and a position bias, left out, is set to zero), compute timm's blocks."""
    check = FAMILIES[family].extra.get("one_window")
    if check is None:
        pytest.skip("the family's blocks have nothing windowed to compare")
    check(base_model(family))


def _davit_one_window(model: torch.nn.Module) -> None:
    dual = model.stages[3].blocks[0]  # a spatial and a channel block; 4 x 4 windows
    x = torch.randn(2, model.feature_info[3]["num_chs"], 4, 4)
    with torch.no_grad():
        expected = dual(x).flatten(2).transpose(1, 2)
        got = davit.clustered_dual_block(dual)(x.flatten(2).transpose(1, 2), TokenLayout((4, 4)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


FAMILIES["davit"].extra["one_window"] = _davit_one_window


def _tiny_vit_one_window(model: torch.nn.Module) -> None:
    block = model.stages[3].blocks[0]  # 2 x 2 windows
    x = torch.randn(2, 2, 2, model.feature_info[3]["num_chs"])
    with torch.no_grad():
        block.attn.attention_biases.zero_()
        expected = block(x).flatten(1, 2)
        got = tiny_vit.ClusteredBlock(block=block)(x.flatten(1, 2), TokenLayout((2, 2)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


FAMILIES["tiny_vit"].extra["one_window"] = _tiny_vit_one_window


def _gcvit_one_window(model: torch.nn.Module) -> None:
    stage = model.stages[3]  # 3 x 3, one window: global queries unpooled
    x = torch.randn(2, model.feature_info[2]["num_chs"], 6, 6)
    with torch.no_grad():
        for block in stage.blocks:
            block.attn.rel_pos.relative_position_bias_table.zero_()
        expected = stage(x).flatten(2).transpose(1, 2)
        grid = stage.downsample(x)
        layout = TokenLayout(grid.shape[-2:])
        clustered = gcvit.ClusteredStage(sia=SIA(in_dim=1, out_dim=1), stage=stage)
        tokens, queries = (
            grid.flatten(2).transpose(1, 2),
            clustered.global_queries(grid.flatten(2).transpose(1, 2), layout),
        )
        for block in clustered.blocks:
            tokens = block(tokens, layout, None, queries)
    torch.testing.assert_close(clustered.norm(tokens), expected, rtol=1e-5, atol=1e-5)
    # where the global queries are pooled to a window (stage 2: 12 x 12 map, 6 x 6 windows), each position
    # takes the query at its place in its window, as timm's windows do
    stage = model.stages[1]
    grid = stage.downsample(torch.randn(2, model.feature_info[0]["num_chs"], 24, 24))
    clustered = gcvit.ClusteredStage(sia=SIA(in_dim=1, out_dim=1), stage=stage)
    with torch.no_grad():
        queries = clustered.global_queries(grid.flatten(2).transpose(1, 2), TokenLayout((12, 12)))
        pooled = stage.global_block(grid)
    assert pooled.shape[-2:] == (6, 6)
    torch.testing.assert_close(queries.view(2, 12, 12, -1)[:, 6:, 6:], pooled.permute(0, 2, 3, 1))
    torch.testing.assert_close(queries.view(2, 12, 12, -1)[:, :6, 6:], pooled.permute(0, 2, 3, 1))


FAMILIES["gcvit"].extra["one_window"] = _gcvit_one_window


def test_gcvit_refuses_another_input_size_in_one_line():
    converted = hafa.convert(base_model("gcvit"))
    with pytest.raises(ValueError, match=r"takes the input size it was built for \(96 x 96"):
        converted(torch.randn(1, 3, 64, 64))

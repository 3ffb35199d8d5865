"""hafa.convert on timm's Swin v2 (SwinTransformerV2) and Twins (pcpvt, svt): exactness without SIA,
training, the four strides, timm checkpoints, the registered models, the blocks after SIA against
timm's on a grid, the refusal of swinv2_cr, compile.

The models are the named variants' configurations with fewer blocks, at 64 px, so that the file runs
in about a minute on two cores: swinv2_tiny_window8_256 with 4 x 4 windows and half its width (stages
1 and 2 keep several windows, shifted in every second block), twins_pcpvt_small and twins_svt_small
(svt's stages 3 and 4 keep a locally-grouped and a global sub-sampled block). The registered
hafa_<name> models are checked in full on the meta device, and in these configurations where they run."""

import copy
import functools
import re

import pytest
import timm
import torch
from timm.data import create_transform
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn

import hafa
from hafa.cli import main
from hafa.data.folder import ImageFolderDataset
from hafa.data.mnist import prepare_mnist5k
from hafa.layers import LAA, SIA, LAAPatchMerging
from hafa.models import HafaModel
from hafa.models.families import swinv2, twins
from hafa.ops import TokenLayout
from hafa.tasks.networks import sized_model

NUM_CLASSES = 8
# family -> (timm name, constructor arguments, an input size with odd stage maps that hafa.convert of it takes)
MODELS = {
    # timm's Swin v2 takes sizes divisible by its patch (4) only; the registered models take any (below)
    "swinv2": (
        "swinv2_tiny_window8_256",
        dict(img_size=64, window_size=4, embed_dim=48, depths=(2, 2, 2, 2), strict_img_size=False),
        (72, 88),
    ),
    "twins_pcpvt": ("twins_pcpvt_small", dict(depths=(1, 1, 2, 2)), (70, 90)),
    "twins_svt": ("twins_svt_small", dict(depths=(1, 1, 2, 2)), (70, 90)),
}
# What the default conversion (LAA with BatchNorm, SIA before stage 4) leaves out of a timm model: the
# LayerNorms LAA's BatchNorms replace, and Swin v2's position-bias MLPs after SIA.
LEFT_OUT = {
    "swinv2": r"layers\.[12]\.downsample\.norm\.|layers\.3\.blocks\.\d+\.attn\.cpb_mlp\.",
    "twins_pcpvt": r"patch_embeds\.[12]\.norm\.",
    "twins_svt": r"patch_embeds\.[12]\.norm\.",
}
# registered base name -> (its adapter, the family in MODELS with its configuration)
REGISTERED = {
    "swinv2_tiny_window8_256": (swinv2.SwinV2, "swinv2"),
    "twins_pcpvt_small": (twins.TwinsFamily, "twins_pcpvt"),
    "twins_svt_small": (twins.TwinsFamily, "twins_svt"),
}


def trained_like(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initial value: timm starts LayerNorms at one and biases at zero in
    every seed, and Swin v2's post-norms at zero (a fresh v2 block is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.02)
    return model


@functools.cache
def _timm_model(family: str, seed: int) -> torch.nn.Module:
    name, kwargs, _ = MODELS[family]
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()


def base_model(family: str, seed: int = 0, trained: bool = True) -> torch.nn.Module:
    """A seeded timm model of the family (a copy: tests may change it), trained_like unless trained=False."""
    model = copy.deepcopy(_timm_model(family, seed))
    return trained_like(model, seed) if trained else model


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """One MNIST-5k training image of each digit 0-7 at 64 x 64 (hafa's folder dataset, timm's eval
    transform), and the digits."""
    dataset = ImageFolderDataset(prepare_mnist5k(), "train", create_transform(64, crop_pct=1.0))
    firsts = [next(i for i, (_, digit) in enumerate(dataset.samples) if digit == d) for d in range(NUM_CLASSES)]
    images, labels, _ = zip(*(dataset[i] for i in firsts))
    return torch.stack(images), torch.tensor(labels)


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
    assert sum(isinstance(m, (LAA, LAAPatchMerging)) for m in laa.modules()) == 2
    assert laa.state_dict().keys() >= model.state_dict().keys()  # timm's names, the offsets added


def test_swinv2_keeps_each_sizes_shifted_window_mask():
    converted = hafa.convert(base_model("swinv2"), stage_aggregation=("conv", "conv", "conv"))
    blocks = [block for stage in converted.layers for block in stage.blocks]
    assert all(isinstance(block, swinv2.CachedMaskSwinV2Block) for block in blocks)
    shifted = next(block for block in blocks if any(block.shift_size))
    padded = torch.zeros(1, 8, 12, shifted.dim)
    mask = shifted.get_attn_mask(padded)
    assert shifted.get_attn_mask(padded) is mask
    assert torch.equal(mask, timm.models.swin_transformer_v2.SwinTransformerV2Block.get_attn_mask(shifted, padded))


@pytest.mark.parametrize("family", MODELS)
def test_the_default_conversion_trains_on_mnist(family, digits):
    torch.manual_seed(0)  # SIA's and LAA's new layers
    converted = hafa.convert(base_model(family, trained=False)).train()
    assert sum(isinstance(m, SIA) for m in converted.modules()) == 1
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


@pytest.mark.parametrize("family", MODELS)
def test_intermediates_have_strides_4_to_32_at_an_odd_size(family):
    _, _, size = MODELS[family]
    converted = hafa.convert(base_model(family)).eval()
    with torch.no_grad():
        final, maps = converted.forward_intermediates(torch.randn(2, 3, *size))
    assert [m.shape[1] for m in maps] == [info["num_chs"] for info in converted.feature_info]
    for feature_map, stride in zip(maps, (4, 8, 16, 32), strict=True):  # sizes rounded up or down
        assert feature_map.dim() == 4
        assert feature_map.shape[0] == 2
        assert all(abs(n - s / stride) < 1 for n, s in zip(feature_map.shape[-2:], size)), (stride, feature_map.shape)
    assert final.dim() == 3  # the merged tokens, normalised
    assert final.shape[-1] == maps[-1].shape[1]
    assert converted.forward_head(final).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("family", MODELS)
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
    left_out = {name for name in model.state_dict() if re.match(LEFT_OUT[family], name)}
    assert left_out
    assert set(converted.conversion_report.unused) == left_out
    assert set(report.unused) == left_out


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


@pytest.mark.parametrize("family", MODELS)
def test_the_report_names_the_new_layers(family):
    report = hafa.convert(base_model(family)).conversion_report
    transitions = "layers.{}.downsample" if family == "swinv2" else "patch_embeds.{}"
    new = set(report.new_layers)
    assert {f"{transitions.format(i)}.offset" for i in (1, 2)} <= new
    assert {f"{transitions.format(3)}.{part}" for part in ("skip", "score", "kv_proj", "kv_dwconv")} <= new
    assert not any(name.startswith(("layers.3.blocks.", "blocks.3.", "pos_block.3.")) for name in new)
    assert "new layers" in report.summary()


@pytest.mark.parametrize("name", REGISTERED)
def test_the_registered_model_is_the_conversion_of_its_baseline(name):
    with torch.device("meta"):
        registered = timm.create_model(f"hafa_{name}")
        converted = hafa.convert(timm.create_model(name))
    assert isinstance(registered, HafaModel)
    assert isinstance(registered.family, REGISTERED[name][0])
    assert registered.stage_aggregation == ("laa", "laa", "sia")
    assert registered.state_dict().keys() == converted.state_dict().keys()
    assert sum(p.numel() for p in registered.parameters()) == sum(p.numel() for p in converted.parameters())


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_models_take_any_size_and_give_features(name):
    small = MODELS[REGISTERED[name][1]][1]
    model = timm.create_model(f"hafa_{name}", num_classes=3, **small).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 70, 90)).shape == (1, 3)
    features = timm.create_model(f"hafa_{name}", features_only=True, **small).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 70, 90))
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert [m.shape[-1] for m in maps] in ([23, 12, 6, 3], [22, 11, 5, 3])  # swin rounds up, twins down
    first_three = timm.create_model(f"hafa_{name}", features_only=True, out_indices=(0, 1, 2), **small)
    assert [m.shape[1] for m in first_three(torch.randn(1, 3, 64, 64))] == first_three.feature_info.channels()


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


@pytest.fixture
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_twins_with_sia_compiles_as_one_graph(fresh_compiler):
    torch.manual_seed(0)
    model = timm.create_model("twins_svt_small", num_classes=NUM_CLASSES, depths=(1, 1, 1, 2))
    converted = hafa.convert(trained_like(model, seed=0)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = converted(images)
        got = torch.compile(converted, fullgraph=True, backend="eager")(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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

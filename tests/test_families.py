"""The conformance suite: what every family hafa.convert takes must do, run for each row of CASES.

A row is a small model of the family (the named variant's configuration with fewer and narrower blocks,
so that each test of a row runs in seconds on two cores) with what the shared tests expect of it.
Every row: with laa_norm="baseline" and no SIA the conversion computes the model, the family's default
conversion trains on MNIST digits, forward_intermediates gives strides 4 to 32 at an odd input size, a
saved timm state dict loads as the conversion keeps it, the registered hafa_<name> is the conversion of
its baseline and gives features at any size (or the one it is built for), the conversion compiles as
one graph and runs in bfloat16. A new family adds a row; its particular tests go in a file of its own.
"""

import copy
import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import timm
import torch
from timm.data import create_transform
from timm.models import metaformer
from timm.models import mvitv2 as timm_mvitv2
from timm.models.focalnet import FocalNet
from torch import nn

import hafa
from hafa.data.folder import ImageFolderDataset
from hafa.data.mnist import prepare_mnist5k
from hafa.layers import LAA, SIA, DeformableConv2d, LAAPatchMerging
from hafa.models import FAMILIES, HafaModel
from hafa.models.families import mvitv2

NUM_CLASSES = 8
LAA_ONLY = ("laa", "laa", "laa")


@dataclass(frozen=True)
class Case:
    """One row: a small model of a family and what the shared tests expect of it."""

    family: str  # its Family's name
    make: Callable[[], nn.Module]  # a small model of the family with NUM_CLASSES classes
    registered: str  # a registered hafa_<registered> of the family
    registered_kwargs: dict = field(default_factory=dict)  # what makes the registered model small
    default: tuple[str, str, str] = ("laa", "laa", "sia")  # the family's default transitions
    laa_layer: type = LAA  # the layer LAA puts in place of a transition (or of its conv)
    odd_size: tuple[int, int] = (70, 90)  # an input size with odd stage maps that the conversion takes
    left_out: str = ""  # the model's tensors the default conversion leaves out (a regex; '' for none)
    # SIA's own tensors that a checkpoint load fills from the baseline's downsampling of the same name and
    # shape, while the conversion leaves them new (a regex)
    loaded_by_shape: str = ""
    last_map: tuple[int, int] = (3, 3)  # the registered model's last map at registered_size: rounded up or down
    # The square side the model is built for and the only one it takes (GCViT sizes its windows and global
    # queries from it, MViTv2 its relative positions, a multiple of 32): the tests run at it in place of
    # 64 and of 70 x 90 (odd_size then gives it too); None for a model that takes any size.
    built_size: int | None = None
    lr: float = 1e-3  # the training test's AdamW learning rate (at 1e-3 MViTv2's loss zigzags, the baseline's too)
    sia_layer: type = SIA  # the layer SIA puts in a stage (MViTv2's clustering transition block)
    slow_training: bool = False  # the training test runs for over ~10 s on two cores: with -m slow only
    # Another configuration of a family with a row before it: it runs the tests of what a configuration
    # changes (exactness, training, strides, checkpoints), not those of the family's code and
    # registration (compile, bfloat16, registered models), which the family's first row runs.
    variant: bool = False

    @property
    def side(self) -> int:
        """The side of the square inputs most tests take."""
        return self.built_size or 64

    @property
    def registered_size(self) -> tuple[int, int]:
        """The input size at which the registered model's features are checked."""
        return (self.built_size, self.built_size) if self.built_size else (70, 90)


def timm_model(name: str, **kwargs) -> Callable[[], nn.Module]:
    return functools.partial(timm.create_model, name, num_classes=NUM_CLASSES, **kwargs)


def metaformer_model(**kwargs) -> Callable[[], nn.Module]:
    small = dict(depths=(1, 1, 2, 2), dims=(32, 64, 96, 128), num_classes=NUM_CLASSES)
    return functools.partial(metaformer.MetaFormer, **{**small, **kwargs})


def twins_case(name: str, variant: bool = False) -> Case:
    small = dict(depths=(1, 1, 2, 2))
    left_out = r"patch_embeds\.[12]\.norm\."
    return Case("twins", timm_model(name, **small), name, small, left_out=left_out, last_map=(2, 3), variant=variant)


def small_mvitv2(**kwargs) -> nn.Module:
    """mvitv2_tiny's configuration with one or two blocks per stage at a third of its width."""
    cfg = dataclasses.replace(timm_mvitv2.model_cfgs["mvitv2_tiny"], depths=(1, 2, 2, 1), embed_dim=32)
    return timm_mvitv2.MultiScaleVit(cfg, num_classes=NUM_CLASSES, **kwargs)


SWIN = dict(embed_dim=48, strict_img_size=False)
SWINV2 = dict(img_size=64, window_size=4, embed_dim=48, depths=(2, 2, 2, 2), strict_img_size=False)
CONVNEXT = dict(depths=(1, 1, 1, 1))
ONE_BLOCK = CONVNEXT
EDGENEXT = dict(depths=(1, 2, 1, 1))
DAVIT = dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), window_size=4)
TINY_VIT = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), window_sizes=(4, 4, 4, 2))
FOCALNET_LEFT_OUT = r"layers\.[123]\.downsample\.norm\."  # the LayerNorms LAA's BatchNorms replace
GCVIT = dict(img_size=96, embed_dim=16, window_size=(6, 6, 6, 3), mlp_ratio=2)
# The LayerNorms that LAA's BatchNorms replace, and what only a grid defines (position biases) after SIA.
PVT_LEFT_OUT = r"stages\.[12]\.(downsample|patch_embed)\.norm\."
CASES = {
    "pvt_v2": Case("pvt_v2", timm_model("pvt_v2_b0"), "pvt_v2_b0", left_out=PVT_LEFT_OUT),
    "swin": Case(
        "swin",
        timm_model("swin_tiny_patch4_window7_224", **SWIN),
        "swin_tiny_patch4_window7_224",
        SWIN,
        laa_layer=LAAPatchMerging,
        odd_size=(72, 88),  # timm's Swin takes multiples of its patch (4); the registered models any size
        left_out=r"layers\.3\.blocks\.\d+\.attn\.relative_position_bias_table",
    ),
    "swinv2": Case(
        "swinv2",
        timm_model("swinv2_tiny_window8_256", **SWINV2),
        "swinv2_tiny_window8_256",
        SWINV2,
        laa_layer=LAAPatchMerging,
        odd_size=(72, 88),
        left_out=r"layers\.[12]\.downsample\.norm\.|layers\.3\.blocks\.\d+\.attn\.cpb_mlp\.",
    ),
    "twins_svt": twins_case("twins_svt_small"),  # stages 3 and 4: a locally-grouped and a global sub-sampled block
    "twins_pcpvt": twins_case("twins_pcpvt_small", variant=True),
    "pvt": Case(  # no class token and no position embedding after SIA, which has a conv of its own
        "pvt",
        timm_model("pvt_tiny"),
        "pvt_tiny",
        left_out=rf"{PVT_LEFT_OUT}|stages\.3\.(cls_token|pos_embed|patch_embed\.)",
        loaded_by_shape=r"stages\.3\.patch_embed\.(norm\.|proj\.bias)",
        last_map=(2, 3),
    ),
    "caformer": Case(  # caformer_s18's mixers and norms: separable convs, then attention in stages 3 and 4
        "metaformer",
        metaformer_model(
            token_mixers=[metaformer.SepConv, metaformer.SepConv, metaformer.Attention, metaformer.Attention],
            norm_layers=[metaformer.LayerNorm2dNoBias] * 2 + [metaformer.LayerNormNoBias] * 2,
        ),
        "caformer_s18",  # MetaFormer's named variants take no depths: the full model
        laa_layer=DeformableConv2d,
    ),
    "convformer": Case(
        "metaformer",
        metaformer_model(token_mixers=metaformer.SepConv, norm_layers=metaformer.LayerNorm2dNoBias),
        "convformer_s18",
        default=LAA_ONLY,
        variant=True,
        laa_layer=DeformableConv2d,
    ),
    "poolformerv2": Case(
        "metaformer",
        metaformer_model(norm_layers=metaformer.GroupNorm1NoBias, use_mlp_head=False),
        "poolformerv2_s12",
        default=LAA_ONLY,
        variant=True,
        laa_layer=DeformableConv2d,
    ),
    "poolformer": Case(  # v1: no norm before the downsampling conv, layer scales, no residual scales
        "metaformer",
        metaformer_model(
            downsample_norm=None,
            mlp_act=nn.GELU,
            mlp_bias=True,
            norm_layers=metaformer.GroupNorm1,
            layer_scale_init_values=1e-5,
            res_scale_init_values=None,
            use_mlp_head=False,
        ),
        "poolformer_s12",
        default=LAA_ONLY,
        variant=True,
        laa_layer=DeformableConv2d,
    ),
    "convnext": Case(
        "convnext",
        timm_model("convnext_atto", **CONVNEXT),
        "convnext_atto",
        CONVNEXT,
        default=LAA_ONLY,
        laa_layer=DeformableConv2d,
        last_map=(2, 2),
    ),
    "inception_next": Case(
        "inception_next",
        timm_model("inception_next_atto", **ONE_BLOCK),
        "inception_next_atto",
        ONE_BLOCK,
        default=LAA_ONLY,
        laa_layer=DeformableConv2d,
        last_map=(2, 2),
    ),
    "mambaout": Case(  # a LayerNorm after each transition's conv
        "mambaout",
        timm_model("mambaout_femto", **ONE_BLOCK),
        "mambaout_femto",
        ONE_BLOCK,
        default=LAA_ONLY,
        laa_layer=DeformableConv2d,
        left_out=r"stages\.[123]\.downsample\.norm\.",  # the LayerNorms LAA's BatchNorms replace
    ),
    "mambaout_rw": Case(  # the _rw models' LayerNorm before the conv
        "mambaout",
        timm_model("test_mambaout", **ONE_BLOCK),
        "test_mambaout",
        ONE_BLOCK,
        default=LAA_ONLY,
        laa_layer=DeformableConv2d,
        lr=3e-3,  # at 1e-3 the loss falls by a quarter in the eight steps
        variant=True,
    ),
    "focalnet": Case(  # focalnet_tiny_srf's blocks; its named variants fix depths and width: the full model
        "focalnet",
        functools.partial(FocalNet, num_classes=NUM_CLASSES, embed_dim=16, **ONE_BLOCK),
        "focalnet_tiny_srf",
        default=LAA_ONLY,
        laa_layer=DeformableConv2d,
        left_out=FOCALNET_LEFT_OUT,
        last_map=(2, 2),
    ),
    # the *_fl3 / *_fl4 models' overlapped 3x3/s2/p1 transitions (their post-norms and MLP head, with which
    # this small model learns too slowly for the training test, in tests/test_family_focalnet.py)
    "focalnet_fl3": Case(
        "focalnet",
        functools.partial(FocalNet, num_classes=NUM_CLASSES, embed_dim=16, use_overlap_down=True, **ONE_BLOCK),
        "focalnet_large_fl3",
        default=LAA_ONLY,
        laa_layer=DeformableConv2d,
        left_out=FOCALNET_LEFT_OUT,
        variant=True,
    ),
    "edgenext": Case(  # a ConvBlock, then SDTA blocks (channel attention, a position encoding) in stage 2
        "edgenext",
        timm_model("edgenext_xx_small", **EDGENEXT),
        "edgenext_xx_small",
        EDGENEXT,
        default=LAA_ONLY,
        laa_layer=DeformableConv2d,
        last_map=(2, 2),
    ),
    "davit": Case("davit", timm_model("davit_tiny", **DAVIT), "davit_tiny", DAVIT, laa_layer=DeformableConv2d),
    "tiny_vit": Case(
        "tiny_vit",
        timm_model("tiny_vit_5m_224", **TINY_VIT),
        "tiny_vit_5m_224",
        TINY_VIT,
        laa_layer=DeformableConv2d,
        left_out=r"stages\.3\.blocks\.\d+\.attn\.attention_biases",
    ),
    # gcvit_* fix the depths and heads; 96 px with these windows gives stage maps 24, 12, 6, 3, each a
    # multiple of its window, global queries pooled to it (stages 1, 2), one 3 x 3 window in stage 4
    "gcvit": Case(
        "gcvit",
        timm_model("gcvit_xxtiny", **GCVIT),
        "gcvit_xxtiny",
        GCVIT,
        laa_layer=DeformableConv2d,
        odd_size=(96, 96),
        left_out=r"stages\.[12]\.downsample\.norm2\.|stages\.3\.blocks\.\d+\.attn\.rel_pos\.",
        built_size=96,
        slow_training=True,  # eight steps at 96 px
    ),
    "mvitv2": Case(  # maps 24, 12, 6, 3 at 96 px
        "mvitv2",
        functools.partial(small_mvitv2, img_size=96),
        "mvitv2_tiny",
        dict(img_size=96),
        laa_layer=DeformableConv2d,  # the query pooling's; the shortcut's max pool becomes a DeformableMaxPool2d
        odd_size=(96, 96),
        # the query norms LAA's BatchNorms replace, the relative positions of the blocks on merged tokens
        left_out=r"stages\.[12]\.blocks\.0\.attn\.norm_q\.|stages\.3\.blocks\.\d+\.attn\.rel_pos_[hw]",
        built_size=96,
        lr=3e-4,
        sia_layer=mvitv2.ClusteringBlock,
        slow_training=True,  # eight steps at 96 px
    ),
}


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter moved off its initial value: timm starts LayerNorms at one and biases at zero in
    every seed, and Swin v2's post-norms at zero (a fresh v2 block is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.02)
    return model


@functools.cache
def _made(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return CASES[name].make().eval()


def base_model(name: str, seed: int = 0, trained: bool = True) -> nn.Module:
    """A seeded small model of row `name` (a copy: tests may change it), trained_like unless trained=False."""
    model = copy.deepcopy(_made(name, seed))
    return trained_like(model, seed) if trained else model


def default_conversion(name: str, seed: int = 0, trained: bool = True) -> HafaModel:
    return hafa.convert(base_model(name, seed, trained), stage_aggregation=CASES[name].default)


def matches(case: Case, field_name: str, names) -> set[str]:
    """The names that the case's regex `field_name` matches, at least one where it is given."""
    pattern = getattr(case, field_name)
    matched = {name for name in names if pattern and re.match(pattern, name)}
    assert bool(matched) == bool(pattern), (field_name, pattern)
    return matched


FIRST_ROWS = [name for name, case in CASES.items() if not case.variant]
TRAINING_ROWS = [
    pytest.param(name, marks=[pytest.mark.slow] if case.slow_training else []) for name, case in CASES.items()
]


def test_every_family_has_a_row():
    assert {CASES[name].family for name in FIRST_ROWS} == {family.name for family in FAMILIES}
    assert len(FIRST_ROWS) == len(FAMILIES)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """One MNIST-5k training image of each digit 0-7 at 64 x 64 (hafa's folder dataset, timm's eval
    transform), and the digits."""
    dataset = ImageFolderDataset(prepare_mnist5k(), "train", create_transform(64, crop_pct=1.0))
    firsts = [next(i for i, (_, digit) in enumerate(dataset.samples) if digit == d) for d in range(NUM_CLASSES)]
    images, labels, _ = zip(*(dataset[i] for i in firsts))
    return torch.stack(images), torch.tensor(labels)


@pytest.fixture
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", CASES)
def test_without_sia_the_conversion_computes_the_model(name):
    model = base_model(name)
    x = torch.randn(2, 3, CASES[name].side, CASES[name].side)
    with torch.no_grad():
        expected = model(x)
        conv = hafa.convert(model, stage_aggregation=("conv", "conv", "conv"), laa_norm="baseline").eval()
        assert torch.equal(conv(x), expected)
        laa = hafa.convert(model, stage_aggregation=("laa", "laa", "conv"), laa_norm="baseline").eval()
        # LAA's matmul sums in another order than the conv: equal up to float rounding
        torch.testing.assert_close(laa(x), expected, atol=1e-5, rtol=1e-5)
    assert sum(isinstance(m, CASES[name].laa_layer) for m in laa.modules()) == 2
    assert laa.state_dict().keys() >= model.state_dict().keys()  # the model's names, the offsets added


@pytest.mark.parametrize("name", TRAINING_ROWS)
def test_the_default_conversion_trains_on_mnist(name, digits):
    torch.manual_seed(0)  # SIA's and LAA's new layers
    converted = default_conversion(name, trained=False).train()
    case = CASES[name]
    assert sum(isinstance(m, case.sia_layer) for m in converted.modules()) == case.default.count("sia")
    images, labels = digits
    if case.built_size:
        images = nn.functional.interpolate(images, size=case.built_size, mode="bilinear")
    optimizer = torch.optim.AdamW(converted.parameters(), lr=case.lr)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(converted(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", CASES)
def test_intermediates_have_strides_4_to_32_at_an_odd_size(name):
    size = CASES[name].odd_size
    converted = default_conversion(name).eval()
    with torch.no_grad():
        final, maps = converted.forward_intermediates(torch.randn(2, 3, *size))
    assert [m.shape[1] for m in maps] == [info["num_chs"] for info in converted.feature_info]
    for feature_map, stride in zip(maps, (4, 8, 16, 32), strict=True):  # sizes rounded up or down
        assert feature_map.dim() == 4
        assert feature_map.shape[0] == 2
        assert all(abs(n - s / stride) < 1 for n, s in zip(feature_map.shape[-2:], size)), (stride, feature_map.shape)
    if CASES[name].default[-1] == "sia":  # the merged tokens, B x N x C, normalised, that forward_head pools
        assert final.dim() == 3
        assert final.shape[-1] == maps[-1].shape[1]
    assert converted.forward_head(final).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", CASES)
def test_a_saved_timm_state_dict_loads_as_the_conversion_keeps_it(name, tmp_path):
    model = base_model(name, seed=3)
    path = tmp_path / "baseline.pth"
    torch.save(model.state_dict(), path)
    converted = hafa.convert(model, stage_aggregation=CASES[name].default)
    fresh = default_conversion(name, seed=4)
    report = hafa.load_pretrained(fresh, str(path), verbose=False)
    kept = converted.conversion_report.copied
    expected, got = converted.state_dict(), fresh.state_dict()
    for tensor_name in kept:
        assert torch.equal(got[tensor_name], expected[tensor_name]), tensor_name
    matching = functools.partial(matches, CASES[name])
    left_out, by_shape = matching("left_out", model.state_dict()), matching("loaded_by_shape", got)
    assert set(report.copied) == set(kept) | by_shape
    assert set(report.newly_initialised) == set(converted.conversion_report.newly_initialised) - by_shape
    assert set(converted.conversion_report.unused) == left_out
    assert set(report.unused) == left_out - by_shape


@pytest.mark.parametrize("name", FIRST_ROWS)
def test_the_registered_model_is_the_conversion_of_its_baseline_and_gives_features(name):
    case = CASES[name]
    with torch.device("meta"):
        registered = timm.create_model(f"hafa_{case.registered}")
        # hafa_<name> classifies ImageNet-1k, whatever the classes of the baseline's default weights
        baseline = timm.create_model(case.registered, num_classes=registered.num_classes)
        converted = hafa.convert(baseline, stage_aggregation=case.default)
    assert isinstance(registered, HafaModel)
    assert registered.family.name == case.family
    assert registered.stage_aggregation == case.default  # the family's default
    assert registered.state_dict().keys() == converted.state_dict().keys()
    assert sum(p.numel() for p in registered.parameters()) == sum(p.numel() for p in converted.parameters())
    features = timm.create_model(f"hafa_{case.registered}", features_only=True, **case.registered_kwargs).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = features(torch.randn(1, 3, *case.registered_size))  # any size, whatever the baseline takes
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert tuple(maps[-1].shape[-2:]) == case.last_map


@pytest.mark.parametrize("name", FIRST_ROWS)
def test_the_conversion_compiles_as_one_graph(name, fresh_compiler):
    converted = default_conversion(name).eval()
    images = torch.randn(2, 3, CASES[name].side, CASES[name].side)
    with torch.no_grad():
        expected = converted(images)
        got = torch.compile(converted, fullgraph=True, backend="eager")(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FIRST_ROWS)
def test_a_bfloat16_model_converts_to_a_bfloat16_model(name):
    model = base_model(name).to(torch.bfloat16)
    converted = hafa.convert(model, stage_aggregation=CASES[name].default)  # its new layers too
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        images = torch.randn(2, 3, CASES[name].side, CASES[name].side, dtype=torch.bfloat16)
        assert converted(images).dtype == torch.bfloat16

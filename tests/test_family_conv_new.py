"""hafa.convert on timm's hierarchical families whose stages have no attention across tokens (LAA
transitions only): InceptionNeXt, MambaOut, FocalNet, EdgeNeXt. One row per model form: a named
variant's configuration with one block per stage (narrower where timm takes it; two in EdgeNeXt's
second stage, a ConvBlock and an SDTA block), so that each test runs in seconds on two cores; the
registered hafa_<name> models are the full ones.

Each row is checked for: exactness without SIA (LAA in baseline mode), a training step of the default
conversion, the four strides at an odd size, a timm state dict adapting to what the conversion keeps,
features_only, fullgraph compile, export, bf16, and "sia" refused with the family's stages named."""

import os
from dataclasses import dataclass

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models.focalnet import FocalNet

import hafa
from hafa.data.mnist import prepare_mnist5k
from hafa.layers import DeformableConv2d
from hafa.models import HafaModel

NUM_CLASSES = 10
LAA_ONLY = ("laa", "laa", "laa")
ODD_SIZE = (70, 90)


@dataclass(frozen=True)
class Row:
    """A small model of one family: timm's `name` built with `small` arguments, or `model_class(**small)`
    where timm's named variant fixes its depths and widths (its registered hafa_<name> is then checked at
    full size, or not at all with registered=False). stride32: the last map's size at ODD_SIZE (how the
    family's convs round); deformed: the convs LAA reads at offsets."""

    name: str
    small: dict
    stride32: tuple
    deformed: int = 3
    model_class: type | None = None
    registered: bool = True

    def build(self, seed: int = 0, **kwargs) -> torch.nn.Module:
        torch.manual_seed(seed)
        arguments = dict(num_classes=NUM_CLASSES, **self.small, **kwargs)
        model = self.model_class(**arguments) if self.model_class else timm.create_model(self.name, **arguments)
        return model.eval()

    def registered_args(self) -> dict:
        return {} if self.model_class else self.small


ONE_BLOCK = dict(depths=(1, 1, 1, 1))
ROWS = [
    Row("inception_next_atto", ONE_BLOCK, (2, 2)),
    Row("mambaout_femto", ONE_BLOCK, (3, 3)),  # a LayerNorm after each transition's conv
    Row("test_mambaout", ONE_BLOCK, (3, 3)),  # the _rw models' LayerNorm before the conv
    Row("focalnet_tiny_srf", dict(embed_dim=16, **ONE_BLOCK), (2, 2), model_class=FocalNet),
    Row(  # the *_fl3 / *_fl4 models: overlapped 3x3/s2/p1 transitions, post-norm blocks, an MLP head
        "focalnet_large_fl3",
        dict(embed_dim=16, use_overlap_down=True, use_post_norm=True, head_hidden_size=32, **ONE_BLOCK),
        (3, 3),
        model_class=FocalNet,
        registered=False,
    ),
    # SDTA blocks (channel attention, a position encoding in stage 2) after a ConvBlock in stage 2
    Row("edgenext_xx_small", dict(depths=(1, 2, 1, 1)), (2, 2)),
]
BY_ID = pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])


def default_conversion(row: Row, seed: int = 0) -> HafaModel:
    return hafa.convert(row.build(seed), stage_aggregation=LAA_ONLY)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The first training image of each of the digits 0-7 of MNIST-5k, 3 x 32 x 32 in [-1, 1], and the digits."""
    root = prepare_mnist5k()
    images = []
    for digit in range(8):
        folder = os.path.join(root, "train", str(digit))
        with Image.open(os.path.join(folder, sorted(os.listdir(folder))[0])) as image:
            pixels = np.asarray(image.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
        images.append(torch.from_numpy(pixels))
    images = torch.stack(images).unsqueeze(1).expand(-1, 3, -1, -1) * 2 - 1
    return images.contiguous(), torch.arange(8)


@BY_ID
def test_without_sia_the_conversion_computes_the_model(row):
    model = row.build()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        conv = hafa.convert(model, stage_aggregation=("conv", "conv", "conv"), laa_norm="baseline").eval()
        assert torch.equal(conv(x), expected)
        laa = hafa.convert(model, stage_aggregation=LAA_ONLY, laa_norm="baseline").eval()
        # LAA's matmul sums in another order than the conv: equal up to float rounding
        torch.testing.assert_close(laa(x), expected, atol=1e-5, rtol=1e-5)
    assert sum(isinstance(m, DeformableConv2d) for m in laa.modules()) == row.deformed
    assert laa.state_dict().keys() >= model.state_dict().keys()  # timm's names, the offsets added
    assert laa.conversion_report.unused == []


@BY_ID
def test_the_default_conversion_trains_on_mnist(row, digits):
    converted = default_conversion(row).train()
    images, labels = digits
    optimizer = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    losses = []
    for step in range(4):
        loss = torch.nn.functional.cross_entropy(converted(images), labels)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:  # LAA's offsets learn from the first step
            offsets = [m.offset.weight.grad for m in converted.modules() if isinstance(m, DeformableConv2d)]
            assert len(offsets) == row.deformed
            assert all(grad is not None and grad.abs().sum() > 0 for grad in offsets)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@BY_ID
def test_intermediates_have_strides_4_to_32_at_an_odd_size(row):
    converted = default_conversion(row).eval()
    with torch.no_grad():
        final, maps = converted.forward_intermediates(torch.randn(2, 3, *ODD_SIZE))
    assert [m.shape[1] for m in maps] == [info["num_chs"] for info in converted.feature_info]
    for feature_map, stride in zip(maps, (4, 8, 16, 32), strict=True):  # sizes rounded up or down
        assert feature_map.dim() == 4
        assert feature_map.shape[0] == 2
        assert all(abs(n - s / stride) < 1 for n, s in zip(feature_map.shape[-2:], ODD_SIZE)), (
            stride,
            feature_map.shape,
        )
    assert tuple(maps[-1].shape[-2:]) == row.stride32
    assert converted.forward_head(final).shape == (2, NUM_CLASSES)


@BY_ID
def test_a_saved_timm_state_dict_loads_as_the_conversion_keeps_it(row, tmp_path):
    model = row.build(seed=3)
    path = tmp_path / "baseline.pth"
    torch.save(model.state_dict(), path)
    converted = hafa.convert(model, stage_aggregation=LAA_ONLY)
    fresh = default_conversion(row, seed=4)
    report = hafa.load_pretrained(fresh, str(path), verbose=False)
    kept = converted.conversion_report.copied
    assert set(kept) == set(report.copied)
    expected, got = converted.state_dict(), fresh.state_dict()
    for name in kept:
        assert torch.equal(got[name], expected[name]), name
    assert set(report.newly_initialised) == set(converted.conversion_report.newly_initialised)
    assert set(report.unused) == set(converted.conversion_report.unused)


@pytest.mark.parametrize(
    "row",
    [  # a registered model at full size builds and runs for many seconds on two cores
        pytest.param(r, id=r.name, marks=[pytest.mark.slow] if r.model_class else []) for r in ROWS if r.registered
    ],
)
def test_the_registered_model_and_features_only(row):
    model = timm.create_model(f"hafa_{row.name}", **row.registered_args())
    assert isinstance(model, HafaModel)
    assert model.stage_aggregation == LAA_ONLY
    features = timm.create_model(f"hafa_{row.name}", features_only=True, **row.registered_args()).eval()
    with torch.no_grad():
        maps = features(torch.randn(1, 3, *ODD_SIZE))
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert tuple(maps[-1].shape[-2:]) == row.stride32
    # fewer maps: the head, sized for the last stage, goes as timm's own prune drops it
    features = timm.create_model(f"hafa_{row.name}", features_only=True, out_indices=(0, 1), **row.registered_args())
    assert [m.shape[1] for m in features(torch.randn(1, 3, 32, 32))] == features.feature_info.channels()


@pytest.mark.slow
@BY_ID
def test_the_default_conversion_compiles_as_one_graph(row):
    torch._dynamo.reset()
    model = default_conversion(row).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(images)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@BY_ID
def test_the_default_conversion_exports_with_a_dynamic_batch_axis(row):
    model = default_conversion(row).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
        images = torch.randn(3, 3, 64, 64)
        torch.testing.assert_close(program.module()(images), model(images), rtol=1e-5, atol=1e-5)


@BY_ID
def test_the_default_conversion_runs_in_bfloat16(row):
    model = default_conversion(row).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        got = model.to(torch.bfloat16)(images.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.1, atol=0.1)


@BY_ID
def test_sia_is_refused_where_no_stage_attends(row):
    with pytest.raises(ValueError, match=r"stage 4 has no attention \(its stages with attention: none\)"):
        hafa.convert(row.build(), stage_aggregation=("laa", "laa", "sia"))


def test_edgenext_small_rw_refuses_laa_where_a_block_downsamples():
    model = timm.create_model("edgenext_small_rw", depths=(1, 2, 2, 2), num_classes=NUM_CLASSES).eval()
    with pytest.raises(ValueError, match=r"edgenext's stages.1.downsample is Identity: .*downsample_block=True"):
        hafa.convert(model, stage_aggregation=LAA_ONLY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(hafa.convert(model, stage_aggregation=("conv", "conv", "conv"))(x), model(x))
    assert "hafa_edgenext_small_rw" not in timm.list_models("hafa_edgenext*")


def test_inception_next_refuses_laa_on_a_dilated_transition():
    model = ROWS[0].build(output_stride=16)
    with pytest.raises(ValueError, match=r"inception_next's stages.3.downsample does not downsample .*output_stride"):
        hafa.convert(model, stage_aggregation=LAA_ONLY)
    hafa.convert(model, stage_aggregation=("laa", "laa", "conv"))

import re

import pytest
import timm
import torch

import hafa
from hafa.checkpoint import CheckpointError
from hafa.models.table import BASELINE, PARAMS
from hafa.pretrained import CheckpointMismatchError, adapt_state_dict

HAFA_MODELS = sorted(n for n in PARAMS if n.startswith("hafa_"))
ALL_MODELS = sorted(PARAMS)
SMALL = ["hafa_pvt_tiny", "hafa_pvt_v2_b0", "hafa_pvt_v2_b1", "hafa_swin_tiny_patch4_window7_224"]
CONV = ("conv", "conv", "conv")


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_every_model_is_registered_with_timm():
    for name in ALL_MODELS:
        assert name in timm.list_models(), name
    # timm's own PVT v2 and Swin baselines are not re-registered
    assert "pvt_v2_b1" in timm.list_models()
    assert not hasattr(hafa.models, "pvt_v2_b1")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_parameter_count_matches_the_table(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    print(f"{name}: {_params(model) / 1e6:.2f} M")
    assert _params(model) == PARAMS[name]


def test_pvt_v1_baselines_have_the_papers_size():
    for name, expected in [("pvt_tiny", 13.2), ("pvt_small", 24.5), ("pvt_medium", 44.2), ("pvt_large", 61.4)]:
        assert round(PARAMS[name] / 1e6, 1) == expected


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("hafa_pvt_v2_b1", "pvt_v2_b1"), ("hafa_swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224")],
)
def test_conv_configuration_is_the_timm_baseline(ours, theirs):
    torch.manual_seed(0)
    reference = timm.create_model(theirs).eval()
    model = timm.create_model(ours, stage_aggregation=CONV).eval()
    result = model.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys
    assert not result.unexpected_keys
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def _timm_baseline_state(name):
    torch.manual_seed(0)
    reference = timm.create_model(name).eval()
    return reference, reference.state_dict()


def _official_pvt_v1_layout(state_dict):
    """Our PVT v1 names -> the official checkpoint layout (patch_embed1, pos_embed1, block1, cls_token, ...)."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^stages\.(\d)\.patch_embed\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", k)
        k = re.sub(r"^stages\.(\d)\.pos_embed$", lambda m: f"pos_embed{int(m.group(1)) + 1}", k)
        k = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"block{int(m.group(1)) + 1}.", k)
        out["cls_token" if k == "stages.3.cls_token" else k] = v
    return out


def _assert_first_three_stages_equal(reference, model, size=(224, 224)):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
        got = model.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_hafa_pvt_v2_from_timm_checkpoint_reproduces_stages_1_to_3():
    reference, state = _timm_baseline_state("pvt_v2_b1")
    model = timm.create_model("hafa_pvt_v2_b1").eval()
    adapted, report = adapt_state_dict(state, model)
    model.load_state_dict(adapted)
    assert all(".offset." in n or "stages.3.downsample." in n for n in report.newly_initialised)
    assert "stages.1.downsample.proj.weight" in report.copied
    assert not report.unused
    _assert_first_three_stages_equal(reference, model)


def test_hafa_swin_from_timm_checkpoint_reproduces_stages_1_to_3():
    reference, state = _timm_baseline_state("swin_tiny_patch4_window7_224")
    model = timm.create_model("hafa_swin_tiny_patch4_window7_224").eval()
    adapted, report = adapt_state_dict(state, model)
    model.load_state_dict(adapted)
    # the stage after SIA takes the baseline's fused qkv as separate q and kv
    torch.testing.assert_close(
        model.layers[3].blocks[0].attn.kv.weight, state["layers.3.blocks.0.attn.qkv.weight"][768:]
    )
    assert "layers.3.blocks.0.attn.q.weight" in report.copied
    _assert_first_three_stages_equal(reference, model)


def test_hafa_pvt_from_official_checkpoint_file_reproduces_stages_1_to_3(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("pvt_tiny").eval()
    path = tmp_path / "pvt_tiny_official.pth"
    torch.save({"model": _official_pvt_v1_layout(reference.state_dict())}, path)
    model = timm.create_model("hafa_pvt_tiny").eval()
    report = hafa.load_pretrained(model, str(path), verbose=False)
    assert "stages.3.cls_token" in report.copied
    assert "stages.2.patch_embed.offset.weight" in report.newly_initialised
    assert "stages.3.pos_embed" in report.unused  # pos_embed4: no explicit position embedding after SIA
    _assert_first_three_stages_equal(reference, model)
    _assert_first_three_stages_equal(reference, model, size=(250, 310))  # resized position embeddings


def test_pretrained_through_timm_file_overlay(tmp_path):
    reference, state = _timm_baseline_state("pvt_v2_b0")
    path = tmp_path / "pvt_v2_b0.pth"
    torch.save(state, path)
    model = timm.create_model("hafa_pvt_v2_b0", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    torch.testing.assert_close(model.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    _assert_first_three_stages_equal(reference, model)


def test_checkpoint_of_another_width_fails_with_the_names(tmp_path):
    path = tmp_path / "b2.pth"
    torch.save(timm.create_model("pvt_v2_b0").state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)differ in shape.*patch_embed\.proj\.weight"):
        hafa.load_pretrained(timm.create_model("hafa_pvt_v2_b1"), str(path))


def test_checkpoint_of_another_family_fails(tmp_path):
    path = tmp_path / "swin.pth"
    torch.save(timm.create_model("swin_tiny_patch4_window7_224").state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="another model family"):
        hafa.load_pretrained(timm.create_model("hafa_pvt_v2_b1"), str(path))


def test_unreadable_or_missing_checkpoint_files(tmp_path):
    model = timm.create_model("hafa_pvt_v2_b0")
    with pytest.raises(CheckpointError, match="not found"):
        hafa.load_pretrained(model, str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        hafa.load_pretrained(model, str(bad))


def test_checkpoints_are_never_unpickled_as_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        hafa.load_pretrained(timm.create_model("hafa_pvt_v2_b0"), str(path))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_and_backward_at_a_small_input(name):
    model = timm.create_model(name, num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "offset" not in n and "score" not in n]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > 0.9 * len(grads)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("size", [(224, 224), (250, 310), (97, 65)])
def test_any_input_size(name, size):
    model = timm.create_model(name, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
        maps = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    assert out.shape == (1, 3)
    for i, fmap in enumerate(maps):
        stride = 4 * 2**i
        assert abs(fmap.shape[-2] - size[0] / stride) <= 1
        assert abs(fmap.shape[-1] - size[1] / stride) <= 1


@pytest.mark.parametrize("name", SMALL)
def test_features_only(name):
    model = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3))
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    maps = model(torch.randn(2, 3, 128, 160))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 40), (16, 20), (8, 10), (4, 5)]
    partial = timm.create_model(name, features_only=True, out_indices=(1, 3))
    assert [m.shape[1] for m in partial(torch.randn(1, 3, 64, 64))] == partial.feature_info.channels()


@pytest.mark.parametrize("name", SMALL)
def test_construction_on_the_meta_device(name):
    with torch.device("meta"):
        model = timm.create_model(name, features_only=True)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("family", ["hafa_pvt_tiny", "hafa_pvt_v2_b0", "hafa_swin_tiny_patch4_window7_224"])
@pytest.mark.parametrize(
    "aggregation", [("sia", "sia", "sia"), ("laa", "sia", "sia"), ("laa", "laa", "laa"), ("sia", "conv", "laa")]
)
def test_every_stage_aggregation(family, aggregation):
    model = timm.create_model(family, num_classes=5, stage_aggregation=aggregation)
    x = torch.randn(2, 3, 96, 80)
    model(x).sum().backward()
    maps = model.forward_intermediates(x, intermediates_only=True)
    # PVT v1's 2x2/s2 conv floors odd sizes, the others round up
    assert [tuple(m.shape[-2:]) for m in maps[:3]] == [(24, 20), (12, 10), (6, 5)]
    assert maps[3].shape[-2:] in ((3, 3), (3, 2))


@pytest.mark.parametrize("name", SMALL)
def test_cluster_options(name):
    model = timm.create_model(name, num_classes=4, cluster_qkv=True, cluster_ratio=0.5, knn_k=3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    with pytest.raises(ValueError, match="stage_aggregation"):
        timm.create_model(name, stage_aggregation=("laa", "sia"))


@pytest.mark.parametrize("name", SMALL)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)  # same drop-path draws in both runs
    model(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        if n in expected:
            torch.testing.assert_close(p.grad, expected[n], atol=1e-5, rtol=1e-4)


def test_timm_interface():
    model = timm.create_model("hafa_pvt_v2_b0", num_classes=10, drop_path_rate=0.1)
    features = model.forward_features(torch.randn(2, 3, 64, 64))
    assert model.forward_head(features, pre_logits=True).shape == (2, 256)
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 256)
    pvt = timm.create_model("hafa_pvt_tiny")
    assert "stages.3.cls_token" in pvt.no_weight_decay()
    assert "stages.0.pos_embed" in pvt.no_weight_decay()
    assert timm.create_model("pvt_tiny", img_size=256)(torch.randn(1, 3, 256, 256)).shape == (1, 1000)


def test_bfloat16_autocast_forward():
    model = timm.create_model("hafa_pvt_v2_b0", num_classes=5).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 96, 96))
    assert torch.isfinite(out.float()).all()


def test_no_hard_coded_baseline_name_for_every_hafa_model():
    for name in HAFA_MODELS:
        assert BASELINE[name] in timm.list_models()

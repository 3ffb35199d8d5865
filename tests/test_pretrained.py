import logging
import re

import pytest
import timm
import timm.models._builder as timm_builder
import torch

import hafa
from hafa.checkpoint import CheckpointError
from hafa.pretrained import CheckpointMismatchError, adapt_state_dict


def _timm_baseline_state(name):
    torch.manual_seed(0)
    reference = timm.create_model(name).eval()
    return reference, reference.state_dict()


def _official_pvt_v1_layout(state_dict):
    """Our PVT v1 names -> the official code's (patch_embed1, pos_embed1, block1, cls_token; LAA as
    DeformablePatchMerging: mmcv DeformConv2dPack `dconv` with its `conv_offset`, BatchNorm `norm_layer`;
    SIA as CTM: token conv `conv` with its `skip`, keys/values `Multiscale`, `norm1`; skips as Conv1d weights)."""
    laa = {"offset.": "dconv.conv_offset.", "proj.": "dconv.", "norm.": "norm_layer."}
    sia = {
        "skip.": "conv.skip.",
        "proj.": "conv.",
        "kv_proj.": "Multiscale.skip.",
        "kv_dwconv.": "Multiscale.depth_conv.",
        "kv_pwconv.": "Multiscale.point_conv.",
        "kv_norm.": "norm1.",
    }
    has_laa = any(".patch_embed.offset." in k for k in state_dict)
    has_sia = any(".patch_embed.score." in k for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        laa_match = re.match(r"^stages\.([12])\.patch_embed\.(offset\.|proj\.|norm\.)", k)
        sia_match = re.match(r"^stages\.3\.patch_embed\.(skip\.|proj\.|kv_proj\.|kv_dwconv\.|kv_pwconv\.|kv_norm\.)", k)
        if has_laa and laa_match:
            k = f"patch_embed{int(laa_match.group(1)) + 1}.{laa[laa_match.group(2)]}{k[laa_match.end() :]}"
        elif has_sia and sia_match:
            k = f"patch_embed4.{sia[sia_match.group(1)]}{k[sia_match.end() :]}"
        k = re.sub(r"^stages\.(\d)\.patch_embed\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", k)
        k = re.sub(r"^stages\.(\d)\.pos_embed$", lambda m: f"pos_embed{int(m.group(1)) + 1}", k)
        k = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"block{int(m.group(1)) + 1}.", k)
        if k.endswith(".skip.weight"):
            v = v.unsqueeze(-1)
        out["cls_token" if k == "stages.3.cls_token" else k] = v
    return out


def _assert_first_stages_equal(reference, model, stages=3, size=(224, 224)):
    x = torch.randn(2, 3, *size)
    indices = list(range(stages))
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=indices, intermediates_only=True)
        got = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_hafa_pvt_v2_in_baseline_mode_from_timm_checkpoint_reproduces_stages_1_to_3():
    reference, state = _timm_baseline_state("pvt_v2_b1")
    model = timm.create_model("hafa_pvt_v2_b1", laa_norm="baseline").eval()
    adapted, report = adapt_state_dict(state, model)
    model.load_state_dict(adapted)
    assert report.laa_norm == "baseline"
    assert all(".offset." in n or "stages.3.downsample." in n for n in report.newly_initialised)
    assert "stages.1.downsample.proj.weight" in report.copied
    assert "stages.3.downsample.proj.weight" in report.copied  # SIA projects with PVT v2's own conv
    assert not report.unused
    _assert_first_stages_equal(reference, model)


def test_default_hafa_model_from_a_baseline_reports_its_new_batch_norms():
    reference, state = _timm_baseline_state("pvt_v2_b1")
    model = timm.create_model("hafa_pvt_v2_b1").eval()
    adapted, report = adapt_state_dict(state, model)
    model.load_state_dict(adapted)
    assert report.laa_norm == "batch"
    assert report.laa_batch_norms_new
    assert "stages.1.downsample.norm" in report.new_layers
    assert "stages.1.downsample.norm.weight" in report.newly_initialised
    assert "stages.1.downsample.norm.weight" in report.unused  # the baseline's LayerNorm is not a BatchNorm
    assert report.sia_stages == [3]
    assert len(report.function_changes) == 2  # LAA's BatchNorm + GELU, SIA before stage 4
    assert "at step 0 the model computes another function than the checkpoint" in report.summary()
    assert "'baseline' keeps the transition's norm" in report.summary()
    _assert_first_stages_equal(reference, model, stages=1)


def test_a_conversion_says_whether_it_keeps_the_function_at_step_0():
    model = timm.create_model("pvt_v2_b0").eval()
    kept = hafa.convert(model, laa_norm="baseline", stage_aggregation=("laa", "laa", "conv"))
    assert kept.conversion_report.function_changes == []
    assert "at step 0 the model computes what the model it was converted from computes" in (
        kept.conversion_report.summary()
    )
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(kept.eval()(images), model(images), rtol=1e-5, atol=1e-5)
    changed = hafa.convert(model, laa_norm="baseline").conversion_report
    assert changed.sia_stages == [3]
    assert [change.split(":")[0] for change in changed.function_changes] == ["SIA before stage 4"]


def test_a_batch_norm_checkpoint_refuses_the_baseline_laa_mode(tmp_path):
    path = tmp_path / "hafa.pth"
    torch.save(timm.create_model("hafa_pvt_v2_b0").state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="laa_norm='batch'"):
        hafa.load_pretrained(timm.create_model("hafa_pvt_v2_b0", laa_norm="baseline"), str(path))


def test_hafa_swin_in_baseline_mode_from_timm_checkpoint_reproduces_stages_1_to_3():
    reference, state = _timm_baseline_state("swin_tiny_patch4_window7_224")
    model = timm.create_model("hafa_swin_tiny_patch4_window7_224", laa_norm="baseline").eval()
    adapted, report = adapt_state_dict(state, model)
    model.load_state_dict(adapted)
    # SIA projects with Swin's patch merging: the baseline's last downsampling fills it
    torch.testing.assert_close(
        model.layers[3].downsample.proj.reduction.weight, state["layers.3.downsample.reduction.weight"]
    )
    assert "layers.3.downsample.proj.norm.weight" in report.copied
    # the stage after SIA takes the baseline's fused qkv as separate q and kv
    torch.testing.assert_close(
        model.layers[3].blocks[0].attn.kv.weight, state["layers.3.blocks.0.attn.qkv.weight"][768:]
    )
    assert "layers.3.blocks.0.attn.q.weight" in report.copied
    # global attention over merged tokens has no window position bias
    assert report.unused == [f"layers.3.blocks.{i}.attn.relative_position_bias_table" for i in (0, 1)]
    _assert_first_stages_equal(reference, model)


def test_hafa_pvt_from_official_baseline_file_reproduces_stages_1_to_3(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("pvt_tiny").eval()
    path = tmp_path / "pvt_tiny_official.pth"
    torch.save({"model": _official_pvt_v1_layout(reference.state_dict())}, path)
    model = timm.create_model("hafa_pvt_tiny", laa_norm="baseline").eval()
    report = hafa.load_pretrained(model, str(path), verbose=False)
    assert "stages.2.patch_embed.offset.weight" in report.newly_initialised
    # the HAFA model has no class token and no position embedding after SIA
    assert "stages.3.cls_token" in report.unused
    assert "stages.3.pos_embed" in report.unused
    _assert_first_stages_equal(reference, model)
    _assert_first_stages_equal(reference, model, size=(250, 310))  # resized position embeddings


def test_official_hafa_checkpoint_loads_every_tensor(tmp_path):
    torch.manual_seed(0)
    trained = timm.create_model("hafa_pvt_tiny", num_classes=5)
    for p in trained.parameters():  # offsets, BatchNorm affine: nothing left at its initial value
        p.data.normal_(std=0.02)
    trained.train()(torch.randn(4, 3, 64, 64))  # BatchNorm statistics
    official = _official_pvt_v1_layout(trained.state_dict())
    assert "patch_embed2.dconv.conv_offset.weight" in official
    assert "patch_embed3.norm_layer.running_var" in official
    assert "patch_embed4.Multiscale.depth_conv.weight" in official
    assert "patch_embed4.norm1.weight" in official
    path = tmp_path / "hafa_pvt_tiny_official.pth"
    torch.save({"model": official}, path)
    model = timm.create_model("hafa_pvt_tiny", num_classes=5)
    report = hafa.load_pretrained(model, str(path), verbose=False)
    assert not report.newly_initialised
    assert not report.unused
    assert len(report.copied) == len(official)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), trained.eval()(x))


def _task_checkpoint(state_dict, prefix, extra):
    """A checkpoint as the project's training commands write it, the network's keys under `prefix`."""
    return dict(
        format="hafa",
        version=1,
        task="segmentation",
        state_dict={**{prefix + k: v for k, v in state_dict.items()}, **extra},
    )


@pytest.mark.parametrize(
    ("prefix", "extra"),
    [
        ("", {}),  # classification
        ("backbone.model.", {"head.classifier.weight": torch.zeros(3, 8, 1, 1)}),  # Semantic FPN
        ("backbone.body.", {"backbone.fpn.inner_blocks.0.0.weight": torch.zeros(8, 32, 1, 1)}),  # Mask R-CNN
    ],
)
def test_backbone_of_any_tasks_checkpoint(tmp_path, prefix, extra):
    torch.manual_seed(0)
    trained = timm.create_model("hafa_pvt_v2_b0", num_classes=0).eval()
    path = tmp_path / "task.pth"
    torch.save(_task_checkpoint(trained.state_dict(), prefix, extra), path)
    model = timm.create_model("hafa_pvt_v2_b0", num_classes=0).eval()
    report = hafa.load_pretrained(model, str(path), verbose=False)
    assert report.source_prefix == prefix
    assert report.left_outside_prefix == len(extra)
    assert not report.newly_initialised
    assert not report.unused
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))


@pytest.mark.parametrize("name", ["pvt_v2_b0", "swin_tiny_patch4_window7_224"])
def test_a_baseline_checkpoint_loads_into_timms_flattened_features_only_wrapper(tmp_path, name):
    # seg-train --backbone-checkpoint with a baseline: timm's FeatureListNet names stages.0 as stages_0
    torch.manual_seed(0)
    trained = timm.create_model(name, num_classes=3).eval()
    path = tmp_path / "baseline.pth"
    torch.save(trained.state_dict(), path)
    features = timm.create_model(name, features_only=True).eval()
    assert isinstance(features, timm.models._features.FeatureDictNet)
    report = hafa.load_pretrained(features, str(path), verbose=False)
    assert not report.newly_initialised
    assert all(n.startswith(("head.", "norm.")) for n in report.unused)  # the classifier, the final norm
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for a, b in zip(features(x), trained.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a if a.shape == b.shape else a.permute(0, 3, 1, 2), b)  # Swin's NHWC


def test_features_only_model_as_the_target(tmp_path):
    torch.manual_seed(0)
    trained = timm.create_model("hafa_pvt_v2_b0").eval()
    path = tmp_path / "classification.pth"
    torch.save({"format": "hafa", "version": 1, "state_dict": trained.state_dict()}, path)
    features = timm.create_model("hafa_pvt_v2_b0", features_only=True).eval()
    report = hafa.load_pretrained(features, str(path), verbose=False)
    assert report.copied
    assert not report.newly_initialised
    assert "head.weight" in report.unused  # features_only models have no classifier
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = trained.forward_intermediates(x, intermediates_only=True)
        for a, b in zip(features(x), expected):
            torch.testing.assert_close(a, b)


def test_legacy_checkpoint_keeps_the_state_dict_under_model(tmp_path):
    torch.manual_seed(0)
    trained = timm.create_model("hafa_pvt_v2_b0").eval()
    path = tmp_path / "legacy.pth"
    torch.save({"model": trained.state_dict(), "config": {}}, path)
    report = hafa.load_pretrained(timm.create_model("hafa_pvt_v2_b0"), str(path), verbose=False)
    assert not report.newly_initialised


def test_pretrained_through_timm_file_overlay(tmp_path):
    reference, state = _timm_baseline_state("pvt_v2_b0")
    path = tmp_path / "pvt_v2_b0.pth"
    torch.save(state, path)
    model = timm.create_model(
        "hafa_pvt_v2_b0", pretrained=True, laa_norm="baseline", pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    torch.testing.assert_close(model.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    _assert_first_stages_equal(reference, model)


@pytest.mark.parametrize(
    ("name", "baseline", "hub_id"),
    [
        ("hafa_pvt_v2_b0", "pvt_v2_b0", "timm/pvt_v2_b0.in1k"),
        (
            "hafa_swin_tiny_patch4_window7_224",
            "swin_tiny_patch4_window7_224",
            "timm/swin_tiny_patch4_window7_224.ms_in1k",
        ),
    ],
)
def test_from_baseline_tag_loads_the_hub_weights_in_baseline_mode(monkeypatch, caplog, name, baseline, hub_id):
    reference, state = _timm_baseline_state(baseline)
    asked = []

    def hub_download(model_id, **kwargs):  # what timm would fetch from the Hugging Face Hub
        asked.append(model_id)
        return dict(state)

    monkeypatch.setattr(timm_builder, "load_state_dict_from_hf", hub_download)
    with caplog.at_level(logging.INFO, logger="hafa.pretrained"):
        model = timm.create_model(f"{name}.in1k_from_baseline", pretrained=True).eval()
    assert asked == [hub_id]
    assert model.options.laa_norm == "baseline"
    assert "new layers" in caplog.text
    assert "offset" in caplog.text
    _assert_first_stages_equal(reference, model)
    # and the untagged name is the paper's network, without weights
    assert timm.create_model(name).options.laa_norm == "batch"


def test_pvt_v1_tag_loads_the_official_release_file(monkeypatch):
    torch.manual_seed(0)
    reference = timm.create_model("pvt_tiny").eval()
    asked = []

    def url_download(url, **kwargs):
        asked.append(url)
        return {"model": _official_pvt_v1_layout(reference.state_dict())}

    monkeypatch.setattr(timm_builder, "load_state_dict_from_url", url_download)
    model = timm.create_model("hafa_pvt_tiny.in1k_from_baseline", pretrained=True, num_classes=10).eval()
    assert asked == ["https://github.com/whai362/PVT/releases/download/v2/pvt_tiny.pth"]
    assert model.num_classes == 10
    _assert_first_stages_equal(reference, model)


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
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        hafa.load_pretrained(model, str(bad))


def test_checkpoints_are_never_unpickled_as_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors and plain data"):
        hafa.load_pretrained(timm.create_model("hafa_pvt_v2_b0"), str(path))

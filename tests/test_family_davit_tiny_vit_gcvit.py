"""What is particular to DaViT, TinyViT and GCViT beyond their conformance rows (tests/test_families.py,
whose small models these tests take): the token head's pooling, every timm model of the family either
converting or refused in one line, the blocks after SIA against timm's on one window, GCViT's input size."""

import pytest
import timm
import torch

import hafa
from hafa.layers import SIA
from hafa.models.families import davit, gcvit, tiny_vit
from hafa.ops import TokenLayout
from test_families import CASES, NUM_CLASSES, base_model, trained_like

ROWS = ("davit", "tiny_vit", "gcvit")
# the pool types whose head on a map timm computes as the head's pooling of the map's positions
POOLS = {"davit": ("avg", "max", ""), "tiny_vit": ("avg", "max", ""), "gcvit": ("avg", "max")}
# the number of timm models of the family's module that convert with the defaults (the others are refused)
CONVERTS = {"davit": 8, "tiny_vit": 5, "gcvit": 5}


@pytest.mark.slow
@pytest.mark.parametrize("name", ROWS)
def test_the_token_head_pools_as_the_models_head_pools_a_map(name):
    """On a grid's tokens the head after SIA gives what the model's own head gives on the map; without
    pooling it predicts for each merged token."""
    side = CASES[name].side
    for pool in ("avg", "max", ""):
        torch.manual_seed(0)
        model = trained_like(CASES[name].make(global_pool=pool).eval(), seed=0)
        if pool in POOLS[name]:
            converted = hafa.convert(model, stage_aggregation=("laa", "laa", "laa")).eval()
            with torch.no_grad():
                feature_map = converted.forward_features(torch.randn(2, 3, side, side))
                expected = converted.forward_head(feature_map)
                tokens = feature_map.flatten(2).transpose(1, 2)
                got = converted.family.token_head(converted, tokens, pre_logits=False)
            if not pool:  # a prediction per token, B x N x classes
                expected = expected.flatten(2).transpose(1, 2)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        clustered = hafa.convert(model).eval()
        with torch.no_grad():
            logits = clustered(torch.randn(2, 3, side, side))
        assert logits.shape[0] == 2
        assert logits.shape[-1] == NUM_CLASSES
        assert logits.dim() == (2 if pool else 3)  # without pooling B x merged tokens x classes


@pytest.mark.slow
@pytest.mark.parametrize("name", ROWS)
def test_every_timm_model_of_the_family_converts_or_is_refused_in_one_line(name):
    converted, refused = 0, {}
    for model_name in timm.list_models(module=name):
        with torch.device("meta"):
            model = timm.create_model(model_name)
            try:
                hafa.convert(model)
                converted += 1
            except ValueError as error:
                refused[model_name] = str(error)
    assert all("\n" not in reason and reason for reason in refused.values()), refused
    assert converted == CONVERTS[name], refused


def test_davit_blocks_after_sia_on_one_window_are_timms():
    """A stage's blocks rebuilt for merged tokens, run on a grid that is one window (where windowed
    attention is global), compute timm's blocks."""
    model = base_model("davit")
    dual = model.stages[3].blocks[0]  # a spatial and a channel block; 4 x 4 windows
    x = torch.randn(2, model.feature_info[3]["num_chs"], 4, 4)
    with torch.no_grad():
        expected = dual(x).flatten(2).transpose(1, 2)
        got = davit.clustered_dual_block(dual)(x.flatten(2).transpose(1, 2), TokenLayout((4, 4)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tiny_vit_blocks_after_sia_on_one_window_are_timms():
    """As DaViT's, the position bias (left out) set to zero."""
    model = base_model("tiny_vit")
    block = model.stages[3].blocks[0]  # 2 x 2 windows
    x = torch.randn(2, 2, 2, model.feature_info[3]["num_chs"])
    with torch.no_grad():
        block.attn.attention_biases.zero_()
        expected = block(x).flatten(1, 2)
        got = tiny_vit.ClusteredBlock(block=block)(x.flatten(1, 2), TokenLayout((2, 2)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gcvit_blocks_after_sia_on_one_window_are_timms():
    """As DaViT's, the relative position bias (left out) set to zero; global queries unpooled."""
    model = base_model("gcvit")
    stage = model.stages[3]  # 3 x 3, one window
    x = torch.randn(2, model.feature_info[2]["num_chs"], 6, 6)
    with torch.no_grad():
        for block in stage.blocks:
            block.attn.rel_pos.relative_position_bias_table.zero_()
        expected = stage(x).flatten(2).transpose(1, 2)
        grid = stage.downsample(x)
        layout = TokenLayout(grid.shape[-2:])
        clustered = gcvit.ClusteredStage(sia=SIA(in_dim=1, out_dim=1), stage=stage)
        tokens = grid.flatten(2).transpose(1, 2)
        queries = clustered.global_queries(tokens, layout)
        for block in clustered.blocks:
            tokens = block(tokens, layout, None, queries)
    torch.testing.assert_close(clustered.norm(tokens), expected, rtol=1e-5, atol=1e-5)


def test_gcvit_global_queries_pooled_to_a_window_are_timms_at_each_place():
    """Where the global queries are pooled to a window (stage 2: 12 x 12 map, 6 x 6 windows), each
    position takes the query at its place in its window, as timm's windows do."""
    model = base_model("gcvit")
    stage = model.stages[1]
    grid = stage.downsample(torch.randn(2, model.feature_info[0]["num_chs"], 24, 24))
    clustered = gcvit.ClusteredStage(sia=SIA(in_dim=1, out_dim=1), stage=stage)
    with torch.no_grad():
        queries = clustered.global_queries(grid.flatten(2).transpose(1, 2), TokenLayout((12, 12)))
        pooled = stage.global_block(grid)
    assert pooled.shape[-2:] == (6, 6)
    torch.testing.assert_close(queries.view(2, 12, 12, -1)[:, 6:, 6:], pooled.permute(0, 2, 3, 1))
    torch.testing.assert_close(queries.view(2, 12, 12, -1)[:, :6, 6:], pooled.permute(0, 2, 3, 1))


def test_gcvit_refuses_another_input_size_in_one_line():
    converted = hafa.convert(base_model("gcvit"))
    with pytest.raises(ValueError, match=r"takes the input size it was built for \(96 x 96"):
        converted(torch.randn(1, 3, 64, 64))

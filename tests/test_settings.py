"""Every setting has a type and a range: the spec's own rules, a seeded fuzz of every declared setting
through the command line and the Python API (a SettingError naming the setting, never another
exception), the public API's argument checks, and the layering of the package's modules."""

import ast
import dataclasses
import math
import os
import random
from pathlib import Path

import pytest
import timm
import torch

import hafa
from hafa.cli import COMMANDS, CommandParser, _load, main
from hafa.layers import LAA, SIA, DeformableConv2d, HafaOptions, LAAPatchMerging
from hafa.models.common import MODEL_ARGUMENTS
from hafa.ops import TokenLayout, cluster_dpc_knn, map2token, merge_tokens, token2map
from hafa.spec import CheckedOption, Choice, Flag, Number, RecipeSpec, Relation, SettingError, Text, Values, Whole
from hafa.tasks.job import TRAIN_STATE
from hafa.tasks.run_settings import (
    CLASSIFICATION_RECIPE,
    DETECTION_RECIPE,
    SEGMENTATION_RECIPE,
    ClassificationSettings,
    DetectionSettings,
    SegmentationSettings,
    override_recipe,
)
from hafa.tasks.training import TrainState

MISSING = "/nonexistent/data"
# Texts a user could type for any setting: numbers out of every range, NaN and infinities, wrong types.
CANDIDATES = ["nan", "inf", "-inf", "-1", "0", "-0.5", "0.5", "1.5", "2.5", "7", "1e9", "-1e9", "abc", "true", "[1, 2]"]


def test_numbers_are_finite_and_in_range():
    share = Number(0.5, low=0, high=1)
    assert share.check(1, "p") == 1.0
    for bad in (math.nan, math.inf, -0.1, 1.1, True, "x", [0.5]):
        with pytest.raises(SettingError, match="^p must be a number from 0 to 1, not "):
            share.check(bad, "p")
    assert Number(low=0, low_open=True).allowed() == "a number > 0"
    assert Number(low=0, high=1, high_open=True).allowed() == "a number >= 0 and < 1"
    whole = Whole(3, low=1)
    assert whole.parse("4", "--n") == 4
    assert whole.check(4.0, "--n") == 4
    for bad in ("2.5", "1e3", "0", "true", "four"):
        with pytest.raises(SettingError, match="^--n must be a whole number >= 1, not "):
            whole.parse(bad, "--n")


def test_other_kinds_and_none():
    assert Flag(True).parse("false", "f") is False
    with pytest.raises(SettingError, match="f must be true or false, not 1"):
        Flag(True).check(1, "f")
    mode = Choice("a", choices=("a", "b"))
    with pytest.raises(SettingError, match="m must be one of a, b, not 'c'"):
        mode.parse("c", "m")
    pair = Values([1, 2], item=Whole(low=1), length=2, ordered=True)
    assert pair.parse("[1, 3]", "v") == [1, 3]
    for bad in ("[3, 1]", "[1]", "[1, 0]", "5", "[1, x]"):
        with pytest.raises(SettingError, match="v must be a list of 2 whole numbers >= 1, in increasing order"):
            pair.parse(bad, "v")
    optional = Number(None, low=0, low_open=True, optional=True)
    assert optional.parse("none", "c") is None
    assert optional.check(None, "c") is None
    with pytest.raises(SettingError, match="c must be a number > 0, or none, not -1"):
        optional.parse("-1", "c")
    with pytest.raises(SettingError, match="needs"):
        Text(describe="needs an x", valid=lambda t: "x" in t).check("y", "t")


def test_a_recipe_checks_its_keys_and_relations():
    spec = RecipeSpec(
        dict(low=Whole(1, low=0), high=Whole(2, low=0)),
        [Relation(("low", "high"), lambda a, b: a <= b, "low must be at most high")],
    )
    assert spec.check({"low": 2, "high": 3}) == {"low": 2, "high": 3}
    with pytest.raises(SettingError, match="low 3, high 2: low must be at most high"):
        spec.check({"low": 3})
    with pytest.raises(SettingError, match="recipe has unknown settings: hihg"):
        spec.check({"hihg": 1})


def test_repeated_set_keys_take_the_last_checked_against_the_settings_type():
    recipe = CLASSIFICATION_RECIPE.defaults()
    assert override_recipe(recipe, {}, ["mixup=0", "mixup=0.5"], CLASSIFICATION_RECIPE)["mixup"] == 0.5
    with pytest.raises(SettingError, match="--set epochs must be a whole number >= 1, not 2.5"):
        override_recipe(recipe, {}, ["epochs=3", "epochs=2.5"], CLASSIFICATION_RECIPE)


@pytest.mark.parametrize(
    ("settings_class", "extra"),
    [
        (ClassificationSettings, dict(data="d")),
        (SegmentationSettings, dict(data={}, num_classes=3, reduce_zero_label=True, class_names=["a", "b", "c"])),
        (DetectionSettings, dict(data="d", train_split="train", val_split="val")),
    ],
)
def test_settings_built_in_python_are_checked_like_the_command_line(settings_class, extra):
    base = dict(model="pvt_v2_b0", run_dir="r", **extra)
    recipe = settings_class(recipe={}, **base).check().recipe
    assert recipe == settings_class.RECIPE.defaults()
    with pytest.raises(SettingError, match="recipe setting: seed must be a whole number >= 0, not -3"):
        settings_class(recipe={"seed": -3}, **base).check()
    with pytest.raises(SettingError, match="workers must be a whole number >= 0"):
        settings_class(recipe={}, workers=-1, **base).check()
    with pytest.raises(SettingError, match="knn_k must be a whole number >= 1"):
        settings_class(recipe={}, hafa_options={"knn_k": 0}, **base).check()


def bad_texts(setting, rng: random.Random, count: int = 3, words: int = 1) -> list[str]:
    """Up to `count` candidate texts the setting refuses (typed `words` times, as an option of that many
    values takes them), chosen by a seeded generator."""
    refused = []
    for text in CANDIDATES:
        try:
            setting.parse(text, "x") if words == 1 else setting.parse_items([text] * words, "x")
        except SettingError:
            refused.append(text)
    return rng.sample(refused, min(count, len(refused)))


def one_line_refusal(argv, capsys, name: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2, argv
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"hafa {argv[0]}: error: "), (argv, error)
    assert name in error, (argv, error)
    assert "Traceback" not in error


TRAINING = {
    "train": CLASSIFICATION_RECIPE,
    "seg-train": SEGMENTATION_RECIPE,
    "det-train": DETECTION_RECIPE,
}


@pytest.mark.parametrize("command", list(TRAINING))
def test_fuzz_every_recipe_setting_through_set(command, tmp_path, capsys):
    rng = random.Random(f"recipe {command}")
    base = [command, "--model", "pvt_v2_b0", "--data", MISSING, "--output", str(tmp_path)]
    for key, setting in TRAINING[command].settings.items():
        for text in bad_texts(setting, rng):
            one_line_refusal([*base, "--set", f"{key}={text}"], capsys, f"--set {key} must be ")
    assert not os.listdir(tmp_path)


REQUIRED = {
    "eval": ["--checkpoint", MISSING],
    "seg-eval": ["--checkpoint", MISSING],
    "det-eval": ["--checkpoint", MISSING],
    "predict": ["--checkpoint", MISSING],
}


def checked_options(command: str):
    parser = CommandParser(prog=f"hafa {command}")
    _load(COMMANDS[command][0])[0](parser, [])
    return [action for action in parser._actions if isinstance(action, CheckedOption)]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_fuzz_every_checked_option_of_every_command(command, tmp_path, capsys):
    rng = random.Random(f"options {command}")
    options = checked_options(command)
    assert options, command
    for action in options:
        name = action.option_strings[0]
        count = action.nargs if isinstance(action.nargs, int) else 1
        for text in bad_texts(action.setting, rng, words=count):
            if count > 1 and (text.startswith(("[", "-"))):
                continue  # a list is typed as separate words; a word starting with '-' would read as an option
            words = [f"{name}={text}"] if count == 1 else [name, *[text] * count]
            one_line_refusal([command, *REQUIRED.get(command, []), *words], capsys, f"{name} ")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["hafa_pvt_v2_b0", "hafa_pvt_tiny", "hafa_swin_tiny_patch4_window7_224"])
def test_fuzz_the_model_constructors_arguments(name):
    rng = random.Random(name)
    values = [math.nan, math.inf, -1, 0, 2.5, 1e9, "abc", True, [1, 2]]
    settings = {**HafaOptions.SETTINGS, **{k: v for k, v in MODEL_ARGUMENTS.items() if k != "in_chans"}}
    with torch.device("meta"):
        for argument, setting in settings.items():
            for value in rng.sample(values, 5):
                try:
                    setting.check(value, argument)
                except SettingError:
                    with pytest.raises(ValueError, match=f"^{argument} must be "):
                        timm.create_model(name, **{argument: value})


def test_model_forwards_check_their_images():
    model = timm.create_model("hafa_pvt_v2_b0", num_classes=2).eval()
    for shape in ((0, 3, 64, 64), (3, 64, 64), (1, 1, 64, 64)):
        with pytest.raises(ValueError, match="images must be B x 3 x H x W with B >= 1"):
            model(torch.zeros(shape))
    with pytest.raises(ValueError, match="images must be at least 32 x 32 pixels"):
        model(torch.zeros(1, 3, 16, 64))
    with pytest.raises(ValueError, match="images must be B x 3"):
        model.forward_intermediates(torch.zeros(2, 64, 64))


def test_dictionary_and_merging_check_their_arguments():
    tokens, index = torch.randn(2, 4, 8), torch.randint(0, 4, (2, 16))
    token2map(tokens, index, (4, 4), (2, 2))
    with pytest.raises(ValueError, match="token2map: grid_size"):
        token2map(tokens, index, (3, 4), (2, 2))
    with pytest.raises(ValueError, match="token2map: index must be long"):
        token2map(tokens, index.float(), (4, 4), (2, 2))
    with pytest.raises(ValueError, match="token2map: out_size"):
        token2map(tokens, index, (4, 4), (0, 2))
    with pytest.raises(ValueError, match="map2token: num_tokens"):
        map2token(torch.randn(2, 8, 4, 4), index, (4, 4), 0)
    with pytest.raises(ValueError, match="map2token: index must be long B x"):
        map2token(torch.randn(3, 8, 4, 4), index, (4, 4), 4)
    ids = torch.randint(0, 3, (2, 4))
    with pytest.raises(ValueError, match="merge_tokens: cluster_ids"):
        merge_tokens(tokens, ids[:, :3], 3)
    with pytest.raises(ValueError, match="merge_tokens: num_clusters"):
        merge_tokens(tokens, ids, 0)
    with pytest.raises(ValueError, match="merge_tokens: scores"):
        merge_tokens(tokens, ids, 3, torch.randn(2, 5))
    # N x B scores hold B * N values, but in the wrong order: refused, not reshaped
    with pytest.raises(ValueError, match=r"merge_tokens: scores must be B x N = 2 x 4 or B x N x 1, got \(4, 2\)"):
        merge_tokens(tokens, ids, 3, torch.randn(4, 2))
    merge_tokens(tokens, ids, 3, torch.randn(2, 4, 1))
    for size in ((2, 3, 4), (6,), (2.0, 3), (0, 3), 6, (True, 2)):
        with pytest.raises(ValueError, match="TokenLayout: map_size must be \\(H, W\\), two whole numbers >= 1"):
            TokenLayout(size)
    assert TokenLayout(torch.Size([2, 3])).num_tokens == 6
    sia = timm.create_model("hafa_pvt_v2_b0").stages[3].downsample
    with pytest.raises(ValueError, match="SIA takes tokens B x 16 x 160"):
        sia(torch.randn(1, 15, 160), TokenLayout((4, 4)))


# Lower layers never import higher ones (an import inside a function counts too).
LAYERS = [
    {"errors", "spec", "progress", "compiled"},
    {"ops"},
    {"layers"},
    {"checkpoint"},
    {"models", "pretrained"},  # pretrained.py reads checkpoints into a family's models
    {"data"},
    {"tasks"},
    {"tools"},
    {"cli", "__main__", "__init__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imports(path: Path, package: str) -> set[str]:
    """The hafa modules a source file imports, as paths below hafa (e.g. 'tasks.networks')."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
                if not module.startswith("hafa"):
                    continue
            names.add(module.removeprefix("hafa").lstrip("."))
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix("hafa").lstrip(".") for a in node.names if a.name.startswith("hafa."))
    return {name for name in names if name}


def test_lower_layers_never_import_higher_ones():
    root = Path(hafa.__file__).parent
    problems = []
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        package = "hafa." + ".".join(path.relative_to(root).parent.parts) if path.parent != root else "hafa"
        for imported in _imports(path, package):
            if _layer(imported) > _layer(module):
                problems.append(f"{module} imports {imported}")
    assert not problems


def test_clustering_and_laa_check_their_arguments():
    x = torch.randn(2, 10, 4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="cluster_dpc_knn: num_clusters must be a whole number >= 1"):
            cluster_dpc_knn(x, bad)
        with pytest.raises(ValueError, match="cluster_dpc_knn: k must be a whole number >= 1"):
            cluster_dpc_knn(x, 3, k=bad)
    with pytest.raises(ValueError, match="at least one image, token and channel"):
        cluster_dpc_knn(torch.randn(0, 10, 4), 3)
    with pytest.raises(ValueError, match="mask must be bool"):
        cluster_dpc_knn(x, 3, mask=torch.full((2, 10), 0.5))
    with pytest.raises(ValueError, match="mask must be bool"):
        cluster_dpc_knn(x, 3, mask=torch.zeros(3, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must be floating-point tokens"):
        cluster_dpc_knn(torch.ones(2, 10, 4, dtype=torch.long), 3)
    assert cluster_dpc_knn(x, 30, k=50)[1].shape == (2, 10)  # capped at N, as documented
    laa = timm.create_model("hafa_pvt_v2_b0").stages[1].downsample
    for shape in ((0, 32, 8, 8), (1, 16, 8, 8), (32, 8, 8)):
        with pytest.raises(ValueError, match="LAA takes maps B x 32 x H x W"):
            laa(torch.randn(shape))
    for args, message in (
        ((8, 16, 0, 2), "LAA: kernel_size must be a whole number >= 1 or a pair of them, got 0"),
        ((0, 16, 2, 2), "LAA: in_channels must be a whole number >= 1, got 0"),
        ((8, 16.0, 2, 2), "LAA: out_channels must be a whole number >= 1, got 16.0"),
        ((8, 16, 2, (2, 0)), r"LAA: stride must be a whole number >= 1 or a pair of them, got \(2, 0\)"),
        ((8, 16, 3, 2, -1), "LAA: padding must be a whole number >= 0 or a pair of them, got -1"),
    ):
        with pytest.raises(ValueError, match=message):
            LAA(*args)
    with pytest.raises(ValueError, match="DeformableConv2d: kernel_size must be"):
        DeformableConv2d(8, 16, 0, stride=2)
    with pytest.raises(ValueError, match="LAAPatchMerging: in_channels must be a whole number >= 1, got 0"):
        LAAPatchMerging(dim=0, out_dim=8)
    assert LAA(8, 16, (3, 3), 2, (1, 1))(torch.randn(1, 8, 9, 9)).shape == (1, 5, 5, 16)


def test_sia_checks_its_arguments_and_its_layout():
    with pytest.raises(ValueError, match="SIA in_dim must be a whole number >= 1, not 0"):
        SIA(in_dim=0, out_dim=16)
    with pytest.raises(ValueError, match="cluster_qkv must be true or false, not 'yes'"):
        SIA(in_dim=8, out_dim=16, options=HafaOptions(cluster_qkv="yes"))
    sia = SIA(in_dim=8, out_dim=16)
    x = torch.randn(1, 64, 8)
    with pytest.raises(ValueError, match=r"SIA: layout must be a hafa.ops.TokenLayout .* got tuple \(8, 8\)"):
        sia(x, (8, 8))
    assert sia(x, TokenLayout((8, 8))).queries.shape == (1, 16, 16)


@pytest.mark.parametrize("settings_class", [ClassificationSettings, SegmentationSettings, DetectionSettings])
def test_every_settings_field_has_a_setting_a_checkpoint_is_read_through(settings_class):
    assert set(settings_class.FIELDS) == {f.name for f in dataclasses.fields(settings_class)}
    assert set(TRAIN_STATE) == {f.name for f in dataclasses.fields(TrainState)}
    with pytest.raises(SettingError, match=r"^x.pth: settings has unknown fields: 'colour'$"):
        settings_class.from_saved({"colour": 1}, "x.pth: settings")
    with pytest.raises(SettingError, match="^x.pth: settings lacks model, recipe, run_dir"):
        settings_class.from_saved({}, "x.pth: settings")

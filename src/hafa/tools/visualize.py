"""`hafa visualize`: what HAFA's layers do to one image, in one PNG.

Three panels: the input; SIA's cluster map (each merged token a colour, cluster boundaries drawn, as
in the paper's Fig. 4, second column); LAA's sampling points over the image (as in Fig. 1, right):
for a sparse grid of output positions of each LAA, its kernel's points at P_I + O_f, mapped from the
layer's input map to image pixels through the stride. Everything is read from forward hooks on the
SIA modules and on the LAA offset predictors, so any model and input size works.

With random weights (or a baseline checkpoint) LAA's offsets are exactly zero and the points sit on
the fixed grid; a trained HAFA checkpoint (--checkpoint) moves them. The title says which.
"""

from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint import Checkpoint, check_model_options, check_task
from ..errors import UserError, unknown_name
from ..layers import LAA, SIA, DeformableConv2d, HafaOptions, LAAPatchMerging, SIAOutput
from ..layers.laa import sampling_positions
from ..models.common import SMALLEST_INPUT
from ..models.table import BASELINE
from ..spec import OutputFile, Values, Whole, add_setting
from ..tasks.networks import build_classifier_from_state_dict
from ..tasks.networks import build_model as build_model_of
from ..tasks.run_settings import image_side
from ..tasks.saved import read_saved_or_state_dict

DEFAULT_MODEL = "hafa_pvt_v2_b1"
SHORT_SIDE, LONG_SIDE = 224, 1024  # default model input of an image
TITLE_BAND_PX = 64
MAX_PICTURE_PIXELS = 64 * 10**6  # an RGBA picture of 256 MB while it is drawn
POINTS_PER_SIDE = 6  # output positions of each LAA shown per image side
SAMPLE_IMAGE = "grace_hopper.jpg"  # matplotlib's bundled sample
LAA_FORMS = (LAA, LAAPatchMerging, DeformableConv2d)  # each has an `offset` predictor and sampling_geometry()
LAA_COLOURS = {"yellow": "#ffd400", "cyan": "#00e5ff", "magenta": "#ff4fd8"}  # transitions 1->2, 2->3, 3->4


def add_arguments(parser):
    parser.add_argument("--image", help=f"image file (default: matplotlib's bundled {SAMPLE_IMAGE})")
    parser.add_argument(
        "--model", help=f"HAFA model (default: the checkpoint's, else {DEFAULT_MODEL} with random weights)"
    )
    parser.add_argument(
        "--checkpoint", help="best.pth / last.pth of hafa train, or a plain state dict with --model and --num-classes"
    )
    add_setting(
        parser, "--num-classes", setting=Whole(None, low=1, optional=True), help="classes of a plain state dict"
    )
    add_setting(
        parser,
        "--cluster-ratio",
        setting=HafaOptions.SETTINGS["cluster_ratio"],
        default=None,
        help="SIA's clusters per token (default: the model's or the checkpoint's; it has no weights, so a "
        "checkpoint can be drawn at another ratio)",
    )
    add_setting(
        parser,
        "--img-size",
        setting=Values(None, item=image_side(largest=LONG_SIDE), min_length=1, optional=True),
        nargs="+",
        metavar="N",
        help="model input: N (square) or H W (default: the image's aspect, shorter side 224)",
    )
    add_setting(parser, "--scale", setting=Whole(2, low=1, high=16), help="PNG pixels per input pixel")
    add_setting(parser, "--seed", setting=Whole(0, low=0), help="seed of the random weights and of the cluster colours")
    add_setting(parser, "--output", "-o", setting=OutputFile("hafa_visualize.png"), help="PNG to write")


def figure_size(input_size: tuple[int, int], scale: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for a model input of (H, W): three panels and a title band."""
    height, width = input_size
    return 3 * width * scale, height * scale + TITLE_BAND_PX


def input_size_for(image: Image.Image, img_size: list[int] | None) -> tuple[int, int]:
    """(H, W) of the model input: as asked, or the image's aspect with the shorter side 224 (the longer at
    most 1024, neither under the smallest input the models take)."""
    if img_size:
        if len(img_size) > 2:
            raise UserError(f"--img-size takes N or H W, not {len(img_size)} numbers")
        return (img_size[0], img_size[-1])
    width, height = image.size
    scale = min(SHORT_SIDE / min(width, height), LONG_SIDE / max(width, height))
    return max(SMALLEST_INPUT, round(height * scale)), max(SMALLEST_INPUT, round(width * scale))


def load_image(path: str | None) -> Image.Image:
    if path is None:
        import matplotlib.cbook

        path = matplotlib.cbook.get_sample_data(SAMPLE_IMAGE, asfileobj=False)
    try:
        return Image.open(path).convert("RGB")
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"no image at {path}") from None
    except OSError as error:
        raise UserError(f"cannot read {path} as an image: {error}") from None


class Recorder:
    """Forward hooks that keep SIA outputs and, for every LAA, its input size and predicted offsets."""

    def __init__(self, model: torch.nn.Module):
        self.sia: list[SIAOutput] = []
        self.laa: list[dict] = []
        self.handles = []
        for module in model.modules():
            if isinstance(module, SIA):
                self.handles.append(module.register_forward_hook(lambda m, args, out: self.sia.append(out)))
            elif isinstance(module, LAA_FORMS):
                self.handles.append(
                    module.offset.register_forward_hook(
                        lambda m, args, out, layer=module: self.laa.append(
                            dict(
                                offsets=out.detach(),
                                input_size=tuple(args[0].shape[-2:]),
                                geometry=layer.sampling_geometry(),
                            )
                        )
                    )
                )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def cluster_labels(sia: SIAOutput, image_size: tuple[int, int]) -> np.ndarray:
    """H x W cluster id of every image pixel (first image of the batch), nearest cell of the dictionary grid."""
    grid = sia.layout.index[0].view(1, 1, *sia.layout.grid_size).float()
    return F.interpolate(grid, size=image_size, mode="nearest")[0, 0].long().numpy()


def boundaries(labels: np.ndarray) -> np.ndarray:
    """H x W bool: pixels whose right or lower neighbour is in another cluster."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def cluster_picture(image: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """The image blended with one random colour per cluster, boundaries in white: H x W x 3 floats in [0, 1]."""
    colours = np.random.default_rng(seed).uniform(0.1, 1.0, size=(int(labels.max()) + 1, 3))
    picture = 0.35 * image + 0.65 * colours[labels]
    picture[boundaries(labels)] = 1.0
    return picture


def sampling_points(record: dict, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image-pixel (x, y) of a sparse grid of an LAA's output positions, first image of the batch:
    the centres of their fixed kernels (P x 2) and their sampling points P_I + O_f (P x K x 2)."""
    offsets = record["offsets"][:1].float()
    kernel, stride, padding = record["geometry"]
    moved = sampling_positions(offsets, kernel, stride, padding)[0]  # K x Ho x Wo x (y, x), input-map pixels
    fixed = sampling_positions(torch.zeros_like(offsets), kernel, stride, padding)[0]
    _, Ho, Wo, _ = moved.shape
    rows = torch.linspace(0, Ho - 1, min(Ho, POINTS_PER_SIDE)).round().long()
    cols = torch.linspace(0, Wo - 1, min(Wo, POINTS_PER_SIDE)).round().long()

    def to_image(position: torch.Tensor) -> torch.Tensor:
        """K x Ho x Wo x (y, x) map pixels -> P x K x (x, y) image pixels of the chosen positions; map
        pixel p covers the image around (p + 0.5) * image / map - 0.5."""
        chosen = position[:, rows][:, :, cols].flatten(1, 2).transpose(0, 1)
        scale = torch.tensor([image_size[0] / record["input_size"][0], image_size[1] / record["input_size"][1]])
        return ((chosen + 0.5) * scale - 0.5).flip(-1)

    return to_image(fixed).mean(1).numpy(), to_image(moved).numpy()


def draw(
    image: np.ndarray,
    labels: np.ndarray | None,
    laa_points: list[tuple[np.ndarray, np.ndarray]],
    title: str,
    captions: list[str],
    scale: int,
    seed: int,
    path: str,
) -> tuple[int, int]:
    """Write the three-panel PNG; returns its (width, height) in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    height, width = image.shape[:2]
    fig_w, fig_h = figure_size((height, width), scale)
    dpi = 100
    fig = plt.figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    panel_h = height * scale / fig_h
    axes = [fig.add_axes([i / 3, 0, 1 / 3, panel_h]) for i in range(3)]
    for ax, caption in zip(axes, captions):
        ax.set_axis_off()
        ax.text(0.5, 1.0 + 4 / (height * scale), caption, transform=ax.transAxes, ha="center", va="bottom", fontsize=9)
    fig.text(0.5, 1 - 6 / fig_h, title, ha="center", va="top", fontsize=10, wrap=True)
    axes[0].imshow(image, interpolation="nearest")
    if labels is None:
        axes[1].imshow(image * 0.3, interpolation="nearest")
        axes[1].text(0.5, 0.5, "no SIA in this model", transform=axes[1].transAxes, ha="center", color="white")
    else:
        axes[1].imshow(cluster_picture(image, labels, seed), interpolation="nearest")
    axes[2].imshow(image, interpolation="nearest")
    for (centres, points), colour in zip(laa_points, LAA_COLOURS.values()):
        segments = np.stack([np.broadcast_to(centres[:, None], points.shape), points], 2).reshape(-1, 2, 2)
        axes[2].add_collection(LineCollection(segments, colors=colour, linewidths=0.6, alpha=0.7))
        axes[2].scatter(
            points[..., 0].ravel(), points[..., 1].ravel(), s=6, color=colour, edgecolors="black", linewidths=0.3
        )
        axes[2].scatter(centres[:, 0], centres[:, 1], s=14, marker="+", color="white", linewidths=0.8)
    for ax in axes:
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return fig_w, fig_h


def build_model(args) -> tuple[torch.nn.Module, str]:
    """The model to draw, in eval mode, and where its weights come from (a checkpoint exactly, or random)."""
    options = {} if args.cluster_ratio is None else dict(cluster_ratio=args.cluster_ratio)
    if args.checkpoint is None:
        name = args.model or DEFAULT_MODEL
        if name not in BASELINE:
            raise unknown_name("HAFA model", name, sorted(BASELINE))
        torch.manual_seed(args.seed)
        return timm.create_model(name, **options).eval(), "random weights"
    source = read_saved_or_state_dict(args.checkpoint)
    if isinstance(source, Checkpoint):
        check_task(source, "classification", "hafa visualize")
        check_model_options(source, model_name=args.model, num_classes=args.num_classes)
        trained = source.model_args.get("cluster_ratio")
        if args.cluster_ratio is None or trained is None or args.cluster_ratio == trained:
            return build_model_of(source), Path(args.checkpoint).name
        return build_model_of(source, options), f"{Path(args.checkpoint).name}, trained at cluster ratio {trained:g}"
    model = build_classifier_from_state_dict(
        source, args.checkpoint, args.model, args.num_classes, HafaOptions.of(options)
    )
    return model, Path(args.checkpoint).name


def run(args) -> int:
    image = load_image(args.image)
    size = input_size_for(image, args.img_size)
    width, height = figure_size(size, args.scale)
    if width * height > MAX_PICTURE_PIXELS:
        raise UserError(
            f"--scale {args.scale} with an input of {size[0]}x{size[1]} makes a {width}x{height} picture; at most "
            f"{MAX_PICTURE_PIXELS // 10**6} million pixels are drawn: lower --scale or --img-size"
        )
    model, weights = build_model(args)
    name = model.pretrained_cfg["architecture"]
    sia = [module for module in model.modules() if isinstance(module, SIA)]
    cluster_ratio = sia[0].options.cluster_ratio if sia else 0.0
    resized = image.resize((size[1], size[0]), Image.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    cfg = model.pretrained_cfg
    x = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(
        cfg["std"]
    )[:, None, None]

    recorder = Recorder(model)
    with torch.no_grad():
        model.forward_features(x[None])
    recorder.remove()

    labels = cluster_labels(recorder.sia[0], size) if recorder.sia else None
    laa_points = [sampling_points(record, size) for record in recorder.laa]
    moved = any(bool(record["offsets"].any()) for record in recorder.laa)
    clusters = recorder.sia[0].layout.num_tokens if recorder.sia else 0
    title = f"{name} ({weights}), input {size[0]}x{size[1]}, cluster ratio {cluster_ratio:g}: {clusters} clusters" + (
        ""
        if moved or not recorder.laa
        else "\nLAA offsets are all zero (random or baseline weights): "
        "points sit on the fixed grid; a trained HAFA --checkpoint moves them"
    )
    laa_caption = "LAA sampling points: " + ", ".join(
        f"{name} {i + 1}->{i + 2}" for i, name in zip(range(len(laa_points)), LAA_COLOURS)
    )
    captions = ["input", "SIA clusters (dictionary of stage 3)", laa_caption if laa_points else "no LAA in this model"]
    width, height = draw(pixels, labels, laa_points, title, captions, args.scale, args.seed, args.output)
    print(
        f"wrote {args.output} ({width}x{height}): {clusters} clusters, {len(laa_points)} LAA layers"
        + ("" if moved else ", offsets zero")
    )
    return 0

"""`hafa predict`: one image through a checkpoint of hafa train, seg-train or det-train -> a PNG
(top classes, the segmentation overlay, or the boxes and masks drawn on the image)."""

import os

from matplotlib import cbook
from PIL import Image

from ..checkpoint import Checkpoint, read_checkpoint_or_state_dict
from ..errors import UserError
from .options import check_device, check_output_file

# Pictures are drawn (and dense predictions made) at most this many pixels on their longer side, so
# that a huge image costs seconds and bounded memory.
DRAW_LONG_SIDE = 2048


def shrink_to_draw(image: Image.Image) -> tuple[Image.Image, float]:
    """The image with its longer side at most DRAW_LONG_SIDE, and the factor it was scaled by."""
    scale = min(1.0, DRAW_LONG_SIDE / max(image.size))
    if scale == 1.0:
        return image, scale
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR), scale


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="best.pth / last.pth of hafa train, seg-train or det-train")
    parser.add_argument("--image", help="the image (default: a photograph bundled with matplotlib)")
    parser.add_argument("--output", help="the PNG to write (default: <image name>_prediction.png here)")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="detection: smallest score drawn")
    parser.add_argument("--device", default="cpu")


def run(args) -> int:
    image = args.image or str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    if not os.path.isfile(image):
        raise UserError(f"image not found: {image}")
    output = args.output or f"{os.path.splitext(os.path.basename(image))[0]}_prediction.png"
    check_output_file(output, "--output")
    check_device(args.device)
    source = read_checkpoint_or_state_dict(args.checkpoint)
    if not isinstance(source, Checkpoint):
        raise UserError(
            f"{args.checkpoint} is a plain state dict; hafa predict takes a checkpoint of hafa train, seg-train or "
            "det-train (best.pth / last.pth), which records the model, its class names and its recipe"
        )
    task = source.task
    if task == "segmentation":
        from .segmentation import predict_segmentation

        result = predict_segmentation(args.checkpoint, image, output, device=args.device)
        summary = ", ".join(f"{name} {share:.1f}%" for name, share in result["class_shares"].items())
    elif task == "detection":
        from .detection import predict_detection

        result = predict_detection(args.checkpoint, image, output, args.score_threshold, device=args.device)
        summary = f"{len(result['detections'])} detections: " + ", ".join(
            f"{name} {score:.2f}" for name, score, _ in result["detections"]
        )
    else:
        from .classification import predict_classification

        result = predict_classification(args.checkpoint, image, output, device=args.device)
        summary = ", ".join(f"{name} {p:.1f}%" for name, p in result["top"])
    print(f"{task}: {summary}\nwrote {result['output']}")
    return 0

"""`hafa predict`: one image through a checkpoint of hafa train, seg-train or det-train -> a PNG
(top classes, the segmentation overlay, or the boxes and masks drawn on the image)."""

import os

from matplotlib import cbook

from ..checkpoint import Checkpoint
from ..errors import UserError
from ..spec import Device, Number, OutputFile, add_setting
from .saved import read_saved_or_state_dict


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="best.pth / last.pth of hafa train, seg-train or det-train")
    parser.add_argument("--image", help="the image (default: a photograph bundled with matplotlib)")
    add_setting(
        parser,
        "--output",
        "-o",
        setting=OutputFile(),
        help="the PNG to write (default: <image name>_prediction.png in the current folder)",
    )
    add_setting(
        parser, "--score-threshold", setting=Number(0.5, low=0, high=1), help="detection: the smallest score drawn"
    )
    add_setting(parser, "--device", setting=Device("cpu"))


def run(args) -> int:
    image = args.image or str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    if not os.path.isfile(image):
        raise UserError(f"image not found: {image}")
    output = args.output or OutputFile().check(
        f"{os.path.splitext(os.path.basename(image))[0]}_prediction.png", "--output"
    )
    source = read_saved_or_state_dict(args.checkpoint)
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

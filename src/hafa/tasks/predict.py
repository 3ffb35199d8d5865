"""`hafa predict`: one image through a checkpoint of hafa train, seg-train or det-train -> a PNG
(top classes, the segmentation overlay, or the boxes and masks drawn on the image)."""

import os

from matplotlib import cbook

from ..errors import UserError
from .engine import load_checkpoint


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
    task = load_checkpoint(args.checkpoint).get("task", "classification")
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
    elif task == "classification":
        from .classification import predict_classification

        result = predict_classification(args.checkpoint, image, output, device=args.device)
        summary = ", ".join(f"{name} {p:.1f}%" for name, p in result["top"])
    else:
        raise UserError(f"{args.checkpoint} holds a checkpoint of an unknown task {task!r}")
    print(f"{task}: {summary}\nwrote {result['output']}")
    return 0

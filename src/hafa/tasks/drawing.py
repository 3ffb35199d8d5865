"""Drawing what the tasks predict: images bounded for drawing, a segmentation as the image with each
class tinted and a legend, and the colours of detections."""

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


def class_colours(num_classes: int) -> np.ndarray:
    """[K, 3] uint8 colours, well apart in hue (golden-ratio steps), the same for every call."""
    colours = [
        colorsys.hsv_to_rgb((0.13 + 0.618034 * i) % 1.0, 0.75 if i % 2 else 0.95, 0.95 if i % 3 else 0.8)
        for i in range(num_classes)
    ]
    return (np.array(colours) * 255).round().astype(np.uint8)


def draw_segmentation(
    image: Image.Image, labels: np.ndarray, class_names: Sequence[str], alpha: float = 0.5
) -> Image.Image:
    """image (RGB, W x H), labels [H, W] class ids -> RGB image of the overlay plus a legend panel."""
    colours = class_colours(len(class_names))
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    tinted = (1 - alpha) * pixels + alpha * colours[labels].astype(np.float32)
    overlay = Image.fromarray(tinted.round().clip(0, 255).astype(np.uint8))
    present, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts)
    font_size = max(11, min(18, image.height // 20))
    font = ImageFont.load_default(size=font_size)
    line = font_size + 6
    entries = [(int(present[i]), f"{class_names[present[i]]} {100 * counts[i] / labels.size:.1f}%") for i in order]
    width = 24 + max(int(font.getlength(text)) for _, text in entries) + 12
    canvas = Image.new("RGB", (image.width + width, max(image.height, 8 + line * len(entries))), (255, 255, 255))
    canvas.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (class_id, text) in enumerate(entries):
        top = 6 + row * line
        draw.rectangle(
            [image.width + 6, top, image.width + 6 + font_size, top + font_size],
            fill=tuple(int(c) for c in colours[class_id]),
            outline=(0, 0, 0),
        )
        draw.text((image.width + 12 + font_size, top - 1), text, fill=(0, 0, 0), font=font)
    return canvas


# Colours of the detected classes (class id - 1, modulo the length).
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
]

"""The embedded default data of the dense tasks: scenes drawn deterministically, written in the real
formats so that the loaders of real data serve them too.

Each scene is a textured background with a few non-overlapping shapes (circle, square, triangle) of
random size, colour, position and rotation, at sizes that are not multiples of 32. The same scenes
are written twice:
    ROOT/ade/images/{training,validation}/scene_NNNN.jpg
    ROOT/ade/annotations/{training,validation}/scene_NNNN.png   ADE20K convention: 0 = ignore
        (a one-pixel outline around each shape), 1 = background, 2.. = the shape classes
    ROOT/coco/{train,val}/scene_NNNN.jpg
    ROOT/coco/annotations/instances_{train,val}.json             COCO: polygons, boxes, areas
"""

import json
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle")
SEGMENTATION_CLASSES = ("background",) + SHAPES  # annotation values 1.. (0 is ignore), 0.. after the shift
SPLITS = {"train": ("training", 48), "val": ("validation", 16)}


def default_scenes_root() -> str:
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(cache, "hafa", "scenes")


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    corners = {"circle": 24, "square": 4, "triangle": 3}[shape]
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * i / corners),
            cy + radius * math.sin(angle + 2 * math.pi * i / corners),
        )
        for i in range(corners)
    ]


def make_scene(rng: np.random.Generator, height: int, width: int):
    """-> (RGB image H x W x 3 uint8, ADE-style annotation H x W uint8, [(shape index, polygon)])."""
    base = rng.integers(40, 200, 3)
    noise = rng.normal(0, 18, (height // 4 + 1, width // 4 + 1, 3))
    texture = np.kron(noise, np.ones((4, 4, 1)))[:height, :width]
    image = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    annotation = Image.new("L", (width, height), 1)
    draw, label_draw = ImageDraw.Draw(image), ImageDraw.Draw(annotation)
    objects, placed = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            radius = float(rng.uniform(0.12, 0.3) * min(height, width))
            cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
            if all(math.hypot(cx - x, cy - y) > radius + r + 3 for x, y, r in placed):
                break
        else:
            continue
        shape = int(rng.integers(0, len(SHAPES)))
        polygon = _polygon(SHAPES[shape], cx, cy, radius, float(rng.uniform(0, 2 * math.pi)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.polygon(polygon, fill=colour)
        label_draw.polygon(polygon, fill=2 + shape, outline=0)
        placed.append((cx, cy, radius))
        objects.append((shape, polygon))
    return np.asarray(image), np.asarray(annotation), objects


def prepare_scenes(root: str = None, seed: int = 0) -> str:
    """Write the scenes once (atomically). -> ROOT."""
    root = root or default_scenes_root()
    if os.path.isfile(os.path.join(root, "COMPLETE")):
        return root
    partial = f"{root}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    rng = np.random.default_rng(seed)
    categories = [dict(id=i + 1, name=name, supercategory="shape") for i, name in enumerate(SHAPES)]
    number = 0
    for coco_split, (ade_split, count) in SPLITS.items():
        for folder in (
            f"ade/images/{ade_split}",
            f"ade/annotations/{ade_split}",
            f"coco/{coco_split}",
            "coco/annotations",
        ):
            os.makedirs(os.path.join(partial, folder), exist_ok=True)
        images, annotations = [], []
        for _ in range(count):
            height, width = int(rng.integers(90, 170)), int(rng.integers(90, 170))
            image, annotation, objects = make_scene(rng, height, width)
            name = f"scene_{number:04d}"
            Image.fromarray(image).save(os.path.join(partial, "ade", "images", ade_split, f"{name}.jpg"), quality=95)
            Image.fromarray(annotation).save(os.path.join(partial, "ade", "annotations", ade_split, f"{name}.png"))
            Image.fromarray(image).save(os.path.join(partial, "coco", coco_split, f"{name}.jpg"), quality=95)
            images.append(dict(id=number + 1, file_name=f"{name}.jpg", height=height, width=width))
            for shape, polygon in objects:
                xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
                area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
                annotations.append(
                    dict(
                        id=len(annotations) + 1,
                        image_id=number + 1,
                        category_id=shape + 1,
                        iscrowd=0,
                        area=area,
                        bbox=[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                        segmentation=[[round(v, 2) for point in polygon for v in point]],
                    )
                )
            number += 1
        with open(os.path.join(partial, "coco", "annotations", f"instances_{coco_split}.json"), "w") as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    with open(os.path.join(partial, "COMPLETE"), "w") as f:
        f.write("hafa scenes: ADE20K layout in ade/, COCO json in coco/\n")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    os.replace(partial, root)
    return root

"""The data checks run before training (hafa.data.checks) and the reading rules the three datasets share
(hafa.data.files): each class of bad input written as small files, with its exact refusal or result."""

import copy
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from hafa.data.checks import check_coco, check_image_folder, check_segmentation_pairs
from hafa.data.coco import CocoInstances, compressed_runs
from hafa.data.files import MAX_REPLACEMENTS, first_readable, many_problems, read_header, read_rgb
from hafa.data.segmentation import LabelMapping, SegmentationDataset, data_pairs, read_mask
from hafa.errors import UserError

NOT_AN_IMAGE = b"\x89PNG\r\n\x1a\n truncated"


def refusal(call, *args, **kwargs) -> str:
    """The message of the UserError that call(*args, **kwargs) raises."""
    with pytest.raises(UserError) as caught:
        call(*args, progress=False, **kwargs)
    return str(caught.value)


# ---------------------------------------------------------------- reading images


@pytest.mark.parametrize(
    ("mode", "values"),
    [
        ("I;16", np.array([[1000, 1500], [2000, 3000]], np.uint16)),
        ("I", np.array([[-70000, 0], [5, 200000]], np.int32)),
        ("F", np.array([[0.25, 0.5], [0.75, 2.0]], np.float32)),
    ],
)
def test_wide_images_are_scaled_by_their_value_range_not_clipped(tmp_path, mode, values):
    path = str(tmp_path / ("image.png" if mode == "I;16" else "image.tif"))
    Image.fromarray(values).save(path)
    assert read_header(path).mode == mode
    low, high = float(values.min()), float(values.max())
    expected = np.rint((values.astype(np.float64) - low) * 255 / (high - low)).astype(np.uint8)
    pixels = np.asarray(read_rgb(path))
    assert pixels.shape == (2, 2, 3)
    assert (pixels == expected[..., None]).all()


def test_non_finite_and_constant_float_images(tmp_path):
    path = str(tmp_path / "nan.tif")
    Image.fromarray(np.array([[np.nan, 1.0], [np.inf, 3.0]], np.float32)).save(path)
    assert np.asarray(read_rgb(path))[..., 0].tolist() == [[0, 0], [255, 255]]
    Image.fromarray(np.full((2, 2), 7, np.uint16)).save(tmp_path / "flat.png")
    assert np.asarray(read_rgb(str(tmp_path / "flat.png"))).max() == 0


def test_eight_bit_images_are_read_as_they_are(tmp_path):
    values = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(values).save(tmp_path / "gray.png")
    assert (np.asarray(read_rgb(str(tmp_path / "gray.png")))[..., 1] == values).all()


def test_unreadable_files_are_none_with_a_warning(tmp_path, caplog):
    (tmp_path / "bad.png").write_bytes(NOT_AN_IMAGE)
    with caplog.at_level(logging.WARNING):
        assert read_rgb(str(tmp_path / "bad.png")) is None
    assert "skipping unreadable image" in caplog.text
    assert "bad.png" in caplog.text


def test_first_readable_replaces_only_when_asked_and_stops_after_a_run_of_unreadable_files():
    files = [None, None, "c", None]
    assert first_readable(files.__getitem__, 0, 4, True, str) == ("c", 2)
    assert first_readable(files.__getitem__, 3, 4, True, str) == ("c", 3)  # wraps around
    assert first_readable(files.__getitem__, 0, 4, False, str) == (None, 1)
    assert first_readable(files.__getitem__, 2, 4, False, str) == ("c", 0)
    unreadable = [None] * 40
    with pytest.raises(UserError, match=f"^{MAX_REPLACEMENTS} files in a row cannot be read, starting at 5;"):
        first_readable(unreadable.__getitem__, 5, 40, True, str)


def test_many_problems_lists_the_first_ten():
    assert str(many_problems(["one thing"])) == "one thing"
    message = str(many_problems([f"problem {i}" for i in range(13)]))
    lines = message.splitlines()
    assert lines[0] == "13 problems in the data:"
    assert lines[1:11] == [f"  problem {i}" for i in range(10)]
    assert lines[11] == "  ... and 3 more"


# ---------------------------------------------------------------- classification


def write_classes(root, classes=("a", "b"), count=2):
    for split in ("train", "val"):
        for name in classes:
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (12, 9), (40 * i, 90, 200)).save(root / split / name / f"{i}.png")
    return root


def test_good_image_folder_passes(tmp_path):
    report = check_image_folder(str(write_classes(tmp_path)), progress=False)
    assert report.files == 8
    assert report.warnings == []


def test_some_unreadable_images_are_a_warning_naming_them(tmp_path, caplog):
    root = write_classes(tmp_path)
    (root / "train" / "a" / "1.png").write_bytes(NOT_AN_IMAGE)
    with caplog.at_level(logging.WARNING):
        report = check_image_folder(str(root), progress=False)
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith(f"1 of the 4 files of {root}/train cannot be read and will be skipped: ")
    assert str(root / "train" / "a" / "1.png") in report.warnings[0]
    assert report.warnings[0] in caplog.text


def test_every_image_unreadable_and_other_classes_are_refused_together(tmp_path):
    root = write_classes(tmp_path)
    for name in ("a", "b"):
        for i in range(2):
            (root / "val" / name / f"{i}.png").write_bytes(NOT_AN_IMAGE)
    os.rename(root / "val" / "b", root / "val" / "c")
    message = refusal(check_image_folder, str(root))
    assert message.startswith("2 problems in the data:\n")
    assert "val classes differ from the train classes: ['b', 'c'] are not in both" in message
    assert f"none of the 4 files of {root}/val can be read (first: {root}/val/a/0.png: " in message


def test_layout_problems_of_both_splits_are_listed(tmp_path):
    root = write_classes(tmp_path)
    os.makedirs(root / "train" / "empty")
    os.rename(root / "val", root / "validation")
    message = refusal(check_image_folder, str(root))
    assert f"class folders without images in {root}/train: empty" in message
    assert f"{root} has no 'val' folder" in message


# ---------------------------------------------------------------- segmentation


def write_pairs(root, count=3, size=(14, 10), value=1):
    """Folder pairs ROOT/{images,masks}/{train,val}/<n>.png; masks are `value` with a 255 border."""
    for split in ("train", "val"):
        os.makedirs(root / "images" / split, exist_ok=True)
        os.makedirs(root / "masks" / split, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, (i * 50, 30, 60)).save(root / "images" / split / f"{i}.png")
            mask = np.full(size[::-1], value, np.uint8)
            mask[0] = 255
            Image.fromarray(mask).save(root / "masks" / split / f"{i}.png")
    return dict(layout="folders", **{s: [str(root / "images" / s), str(root / "masks" / s)] for s in ("train", "val")})


def test_good_segmentation_pairs_pass(tmp_path):
    report = check_segmentation_pairs(write_pairs(tmp_path), num_classes=3, reduce_zero_label=False, progress=False)
    assert report.files == 12
    assert report.warnings == []


def test_bad_masks_are_refused_together_naming_each_file(tmp_path):
    data = write_pairs(tmp_path)
    masks = tmp_path / "masks"
    Image.fromarray(np.full((10, 14), 7, np.uint8)).save(masks / "val" / "0.png")  # not a class
    Image.new("L", (5, 5), 1).save(masks / "train" / "1.png")  # another size
    Image.new("RGB", (14, 10)).save(masks / "train" / "2.png")  # a colour mask
    message = refusal(check_segmentation_pairs, data, num_classes=3, reduce_zero_label=False)
    assert message.splitlines() == [
        "3 problems in the data:",
        f"  {masks}/train/1.png is 5x5 but its image {tmp_path}/images/train/1.png is 14x10 (width x height)",
        f"  {masks}/train/2.png: a mask must hold one class id per pixel (PNG mode L, P, I, I;16 or 1), "
        "not a RGB image",
        f"  {masks}/val/0.png: mask values 7 are not classes: with 3 classes the values are 0..2 (255 = ignore); "
        "check --num-classes and --reduce-zero-label",
    ]


def test_jpeg_masks_are_refused_by_the_check_and_by_the_loader(tmp_path):
    data = write_pairs(tmp_path)
    os.remove(tmp_path / "masks" / "train" / "0.png")
    jpeg = tmp_path / "masks" / "train" / "0.jpg"
    Image.new("L", (14, 10), 1).save(jpeg)
    expected = (
        f"{jpeg}: a JPEG mask is lossy (its compression changes the class ids along every edge); save the masks as PNG"
    )
    assert refusal(check_segmentation_pairs, data, num_classes=3, reduce_zero_label=False) == expected
    with pytest.raises(UserError) as caught:
        read_mask(str(jpeg))
    assert str(caught.value) == expected
    dataset = SegmentationDataset(data_pairs(data, "train"), lambda *pair: pair, LabelMapping(3, False))
    assert dataset[0].problem == expected


def test_sixteen_bit_masks_keep_their_class_ids(tmp_path):
    data = write_pairs(tmp_path)
    values = np.tile(np.array([0, 1, 2, 255], np.uint16).repeat(4)[:14], (10, 1))
    Image.fromarray(values).save(tmp_path / "masks" / "train" / "0.png")
    assert check_segmentation_pairs(data, num_classes=3, reduce_zero_label=False, progress=False).warnings == []
    assert (read_mask(str(tmp_path / "masks" / "train" / "0.png")) == values).all()
    Image.fromarray(np.full((10, 14), 300, np.uint16)).save(tmp_path / "masks" / "val" / "2.png")
    assert "mask values 300 are not classes" in refusal(check_segmentation_pairs, data, 3, False)


def test_a_split_whose_masks_label_no_pixel_is_refused(tmp_path):
    data = write_pairs(tmp_path, value=0)  # with reduce_zero_label, 0 is ignore as 255 is
    message = refusal(check_segmentation_pairs, data, num_classes=3, reduce_zero_label=True, splits=("val",))
    assert message == (
        f"no mask of the val split (images {tmp_path}/images/val, masks {tmp_path}/masks/val) labels any pixel "
        "(every value is ignore: 0 and 255); "
        "check --reduce-zero-label"
    )
    assert check_segmentation_pairs(data, 3, False, splits=("val",), progress=False).files == 6


def test_unreadable_pairs_warn_and_a_split_of_unreadable_pairs_is_refused(tmp_path):
    data = write_pairs(tmp_path)
    (tmp_path / "masks" / "train" / "0.png").write_bytes(NOT_AN_IMAGE)
    report = check_segmentation_pairs(data, 3, False, progress=False)
    split = f"the train split (images {tmp_path}/images/train, masks {tmp_path}/masks/train)"
    assert report.warnings[0].startswith(f"1 of the 3 files of {split} cannot be read")
    for i in range(3):
        (tmp_path / "images" / "val" / f"{i}.png").write_bytes(NOT_AN_IMAGE)
    message = refusal(check_segmentation_pairs, data, 3, False)
    assert message.startswith(
        f"none of the 3 files of the val split (images {tmp_path}/images/val, masks {tmp_path}/masks/val) can be "
        f"read (first: {tmp_path}/images/val/0.png: "
    )


# ---------------------------------------------------------------- COCO

SQUARE = [[2.0, 2.0, 12.0, 2.0, 12.0, 10.0, 2.0, 10.0]]


def coco_content(sizes=((12, 16), (14, 20))) -> dict:
    images = [dict(id=i + 1, file_name=f"{i + 1}.png", height=h, width=w) for i, (h, w) in enumerate(sizes)]
    annotations = [
        dict(
            id=10 * i + k, image_id=i + 1, category_id=k, iscrowd=0, area=80.0, bbox=[2, 2, 10, 8], segmentation=SQUARE
        )
        for i in range(len(sizes))
        for k in (1, 2)
    ]
    return dict(images=images, annotations=annotations, categories=[dict(id=1, name="a"), dict(id=2, name="b")])


def write_coco(root, splits=("train", "val"), content=None) -> dict:
    content = content or coco_content()
    os.makedirs(root / "annotations", exist_ok=True)
    for split in splits:
        os.makedirs(root / split, exist_ok=True)
        for image in content["images"]:
            Image.new("RGB", (image["width"], image["height"]), (9, 99, 199)).save(root / split / image["file_name"])
        write_json(root, split, content)
    return content


def write_json(root, split, content) -> None:
    with open(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(content, f)  # NaN and Infinity are written as JSON's non-standard tokens, as Python reads them


def test_good_coco_passes(tmp_path):
    write_coco(tmp_path)
    report = check_coco(str(tmp_path), ["train", "val"], progress=False)
    assert report.files == 4
    assert report.warnings == []


def annotation_change(change):
    def apply(content):
        change(content["annotations"][1])
        return content

    return apply


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            annotation_change(lambda a: a.update(bbox=[float("nan"), 1, 10, 10])),
            "annotations 2: bbox holds NaN or infinity",
        ),
        (
            annotation_change(lambda a: a.update(bbox=[1, 1, float("inf"), 10])),
            "annotations 2: bbox holds NaN or infinity",
        ),
        (
            annotation_change(lambda a: a.update(bbox=[1, 1, "10", 10])),
            "annotations 2: bbox must be [x, y, width, height], four numbers",
        ),
        (
            annotation_change(lambda a: a.update(bbox=[5, 5, 2, -3])),
            "annotations 2: bbox has a negative width or height (COCO boxes are [x, y, width, height], not corners)",
        ),
        (
            annotation_change(lambda a: a.update(segmentation=[[1, 2, 3, 4]])),
            "annotations 2: a polygon needs at least 3 points (an even count of 6 or more numbers); fix or drop it",
        ),
        (
            annotation_change(lambda a: a.update(segmentation=[[1, 2, 3, 4, 5, float("nan")]])),
            "annotations 2: polygon coordinates must be finite numbers (NaN, infinity or a non-number found)",
        ),
        (
            annotation_change(lambda a: a.update(segmentation=[[1, 2, 3, "4", 5, 6]])),
            "annotations 2: polygon coordinates must be finite numbers (NaN, infinity or a non-number found)",
        ),
        (
            annotation_change(lambda a: a.update(bbox=[1, None, 3, 4])),
            "annotations 2: bbox must be [x, y, width, height], four numbers",
        ),
        (
            annotation_change(lambda a: (a.update(segmentation=[]), a.pop("area"))),
            "annotations 2: segmentation is empty: Mask R-CNN needs a mask per object (give a polygon, or drop the "
            "annotation)",
        ),
        (
            annotation_change(lambda a: a.update(segmentation=dict(size=[99, 16], counts=[192]))),
            "annotations 2: RLE size differs from the image's [height, width]; the RLE belongs to another image",
        ),
        (
            annotation_change(lambda a: a.update(segmentation=dict(size=[12, 16], counts=[100, 5]))),
            "annotations 2: RLE counts must be whole numbers >= 0 adding up to height * width",
        ),
        *[
            (
                annotation_change(lambda a, counts=counts: a.update(segmentation=dict(size=[12, 16], counts=counts))),
                "annotations 2: compressed RLE counts do not decode to runs >= 0 adding up to height * width",
            )
            # pycocotools decoded these without a word (pixels left unset) or crashed the process
            for counts in ("", "0", "06", "!!!!", "`", "0160000000006")
        ],
        (
            annotation_change(lambda a: a.update(segmentation=[[0, 0, 1e7, 0, 1e7, 1e7]])),
            "annotations 2: polygon points lie farther outside the image than its own width or height",
        ),
        (
            lambda c: (c["images"][0].update(file_name="../1.png"), c)[1],
            "images 1: file_name must be a path inside the split's folder, without '..' or a leading '/' "
            "(first: '../1.png')",
        ),
        (
            lambda c: (c["images"][1].update(file_name="/etc/hostname"), c)[1],
            "images 2: file_name must be a path inside the split's folder",
        ),
        (annotation_change(lambda a: a.update(area=float("nan"))), "annotations 2: area must be a finite number >= 0"),
        (annotation_change(lambda a: a.update(iscrowd=2)), "annotations 2: iscrowd must be 0 or 1"),
        (
            annotation_change(lambda a: a.update(category_id="2")),
            "annotations category_ids must be whole numbers, not '2'",
        ),
        (annotation_change(lambda a: a.update(id=2.5)), "annotations ids must be whole numbers, not 2.5"),
        (
            lambda c: (c["images"][0].update(height="12"), c)[1],
            "images 1 need a file_name and a height and width in whole pixels > 0",
        ),
        (lambda c: dict(c, annotations=[]), "no annotations (nothing to train on or to evaluate against)"),
        (lambda c: (c["categories"][0].update(name=["a"]), c)[1], "categories 1 need a name (a non-empty string)"),
        (lambda c: dict(c, categories=[], annotations=[]), "no categories"),
    ],
)
def test_each_bad_annotation_is_refused_naming_its_id(tmp_path, change, problem):
    content = write_coco(tmp_path)
    write_json(tmp_path, "val", change(copy.deepcopy(content)))
    path = f"{tmp_path}/annotations/instances_val.json"
    assert f"{path}: {problem}" in refusal(check_coco, str(tmp_path), ["train", "val"])
    with pytest.raises(UserError) as caught:
        CocoInstances(str(tmp_path), "val", train=False)  # the dataset, and so COCOeval, never sees it
    assert f"{path}: {problem}" in str(caught.value)


def test_compressed_rle_and_polygons_near_the_image_train(tmp_path):
    content = coco_content()
    mask = np.zeros((12, 16), dtype=np.uint8)
    mask[3:9, 4:12] = 1
    counts = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
    assert sum(compressed_runs(counts)) == 12 * 16
    content["annotations"][0]["segmentation"] = dict(size=[12, 16], counts=counts)
    content["annotations"][1]["segmentation"] = [
        [-10.0, -5.0, 30.0, -5.0, 30.0, 20.0, -10.0, 20.0]
    ]  # beyond, within reach
    content["annotations"][1]["bbox"] = [0, 0, 16, 12]
    write_coco(tmp_path, content=content)
    assert check_coco(str(tmp_path), ["train", "val"], progress=False).files == 4
    _, target, _ = CocoInstances(str(tmp_path), "train", train=True, hflip=0.0)[0]
    assert target["masks"][0].sum() == 48
    assert target["masks"][1].sum() == 12 * 16


def test_the_same_problem_in_several_annotations_is_one_line(tmp_path):
    content = write_coco(tmp_path)
    for annotation in content["annotations"]:
        annotation["bbox"][0] = float("nan")
    content["annotations"][0]["segmentation"] = [[1, 2]]
    write_json(tmp_path, "train", content)
    message = refusal(check_coco, str(tmp_path), ["train"])
    path = f"{tmp_path}/annotations/instances_train.json"
    assert message.splitlines() == [
        "2 problems in the data:",
        f"  {path}: annotations 1, 2, 11, 12: bbox holds NaN or infinity",
        f"  {path}: annotations 1: a polygon needs at least 3 points (an even count of 6 or more numbers); fix or "
        "drop it",
    ]


def test_image_files_missing_unreadable_or_of_another_size(tmp_path):
    write_coco(tmp_path)
    os.remove(tmp_path / "train" / "1.png")
    Image.new("RGB", (16, 13)).save(tmp_path / "val" / "1.png")
    message = refusal(check_coco, str(tmp_path), ["train", "val"])
    assert message.splitlines()[1:] == [
        f"  1 images listed in {tmp_path}/annotations/instances_train.json are missing from {tmp_path}/train: 1.png",
        f"  {tmp_path}/val/1.png is 16 x 13 pixels, but {tmp_path}/annotations/instances_val.json says 16 x 12; "
        "fix the json's width and height (or the file)",
    ]
    write_coco(tmp_path)
    (tmp_path / "val" / "2.png").write_bytes(NOT_AN_IMAGE)
    assert "1 of the 2 files of" in check_coco(str(tmp_path), ["val"], progress=False).warnings[0]
    (tmp_path / "val" / "1.png").write_bytes(NOT_AN_IMAGE)
    assert refusal(check_coco, str(tmp_path), ["val"]).startswith(
        f"none of the 2 files of {tmp_path}/val can be read (first: {tmp_path}/val/1.png: "
    )


def test_boxes_beyond_the_image_warn_and_are_clipped_in_training(tmp_path):
    content = write_coco(tmp_path)
    content["annotations"][0]["bbox"] = [10, 4, 20, 5]  # image 1 is 16 wide
    write_json(tmp_path, "train", content)
    report = check_coco(str(tmp_path), ["train"], progress=False)
    path = f"{tmp_path}/annotations/instances_train.json"
    assert report.warnings == [f"{path}: 1 boxes extend beyond their image (clipped in training): annotations 1"]
    dataset = CocoInstances(str(tmp_path), "train", train=True)
    assert dataset.dropped.clipped_boxes == [1]
    assert dataset.objects[1][0]["box"] == [10, 4, 16.0, 9]


def test_categories_and_folders_of_the_splits(tmp_path):
    content = write_coco(tmp_path)
    content["categories"][1]["name"] = "c"
    write_json(tmp_path, "val", content)
    os.rename(tmp_path / "train", tmp_path / "elsewhere")
    message = refusal(check_coco, str(tmp_path), ["train", "val"])
    assert (
        f"image folder not found: {tmp_path}/train (the images of {tmp_path}/annotations/instances_train.json)"
        in message
    )
    assert (
        f"the categories of {tmp_path}/annotations/instances_val.json differ from those of "
        f"{tmp_path}/annotations/instances_train.json: [(2, 'b'), (2, 'c')] are not in both" in message
    )
    assert (
        refusal(check_coco, str(tmp_path), ["test"])
        == f"annotation file not found: {tmp_path}/annotations/instances_test.json"
    )


def _field_paths(value, prefix=()):
    """Every (key or index) path into a json value."""
    if prefix:
        yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _field_paths(child, (*prefix, key))


def test_randomly_broken_fields_give_a_result_or_a_refusal_never_a_traceback(tmp_path):
    good = write_coco(tmp_path)
    replacements = [None, "x", -1, 0, 1.5, float("nan"), float("inf"), [], {}, [1, 2], True, [[1, 2]], 10**20, "1"]
    paths = list(_field_paths(good))
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(150):
        content = copy.deepcopy(good)
        for path in [paths[i] for i in rng.choice(len(paths), size=2)]:
            *parents, last = path
            try:
                container = content
                for key in parents:
                    container = container[key]
                container[last] = copy.deepcopy(replacements[rng.integers(len(replacements))])
            except (KeyError, IndexError, TypeError):
                pass  # an earlier change removed the path
        write_json(tmp_path, "val", content)
        for call in (
            lambda: check_coco(str(tmp_path), ["train", "val"], progress=False),
            lambda: CocoInstances(str(tmp_path), "val", train=True),
        ):
            try:
                call()
            except UserError:
                refused += 1
    assert refused > 150  # most changes break the file; none raised anything but a UserError

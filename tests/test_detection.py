"""Detection / instance segmentation: the padding mask of HAFA backbones, the COCO data checks, the
metric wiring (ground truth as predictions gives AP 100), and det-train / det-eval / predict end to
end on tiny COCO datasets at non-square sizes not divisible by 32, with a HAFA and a baseline backbone."""

import copy
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from hafa import HafaOptions
from hafa.checkpoint import read_file
from hafa.cli import main
from hafa.data.coco import CocoInstances, collate_detection
from hafa.data.scenes import SHAPES, make_scene
from hafa.errors import UserError
from hafa.layers import SIA
from hafa.models.mask_rcnn import batch_padding_mask, pad_to_buckets, side_buckets
from hafa.pretrained import load_pretrained
from hafa.tasks.detection import TASK, predict_detection
from hafa.tasks.detection_metrics import coco_metrics, detections_to_coco
from hafa.tasks.networks import backbone_of, create_network, detector_arguments

SIZES = [(72, 100), (97, 66), (120, 84), (88, 110), (66, 90), (100, 76)]  # (height, width)
TINY = [
    "--min-size",
    "72",
    "--max-size",
    "120",
    "--batch-size",
    "2",
    "--workers",
    "0",
    "--set",
    "fpn_channels=32",
    "rpn_pre_nms_top_n_train=50",
    "rpn_post_nms_top_n_train=30",
    "rpn_pre_nms_top_n_test=50",
    "rpn_post_nms_top_n_test=30",
    "box_batch_size_per_image=16",
    "box_detections_per_img=10",
    "warmup_iters=2",
    "lr=0.001",
    "lr_base_batch=2",
    "drop_path=0.0",
]


def write_coco(root, split: str, sizes, seed: int = 0) -> dict:
    """Scenes of the given sizes as ROOT/split/*.png and ROOT/annotations/instances_<split>.json; -> the json."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images, annotations = [], []
    for number, (height, width) in enumerate(sizes, start=1):
        pixels, _, objects = make_scene(rng, height, width)
        Image.fromarray(pixels).save(os.path.join(root, split, f"img{number}.png"))
        images.append(dict(id=number, file_name=f"img{number}.png", height=height, width=width))
        for shape, polygon in objects:
            xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
            area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=number,
                    category_id=shape + 1,
                    iscrowd=0,
                    area=area,
                    bbox=[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    segmentation=[[v for point in polygon for v in point]],
                )
            )
    content = dict(
        images=images, annotations=annotations, categories=[dict(id=i + 1, name=name) for i, name in enumerate(SHAPES)]
    )
    write_json(root, split, content)
    return content


def write_json(root, split: str, content) -> None:
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, "train", SIZES[:4], seed=1)
    write_coco(root, "val", SIZES[4:], seed=2)
    return str(root)


# ---------------------------------------------------------------- model


def test_padding_mask_reaches_sia_as_tokens_outside_the_images():
    model = timm.create_model("hafa_pvt_v2_b0", num_classes=0).eval()
    seen = []
    sia = next(m for m in model.modules() if isinstance(m, SIA))
    sia.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[2]), with_kwargs=True)
    images = torch.rand(2, 3, 128, 96)
    padding = batch_padding_mask(images, [(128, 96), (80, 60)])
    with torch.no_grad():
        model.forward_intermediates(images, intermediates_only=True, padding_mask=padding)
    mask = seen[0].view(2, 8, 6)  # the stride-16 grid
    assert not mask[0].any()
    expected = torch.ones(8, 6, dtype=torch.bool)
    expected[:5, :4] = False  # 80 / 16 = 5 rows; 60 / 16 = 3.75 -> 4 columns touch the image
    assert torch.equal(mask[1], expected)


def small_detector(name: str) -> torch.nn.Module:
    args = detector_arguments(
        name,
        num_classes=3,
        options=HafaOptions(),
        drop_path_rate=0.0,
        fpn_channels=32,
        rcnn=dict(min_size=72, max_size=120),
    )
    return create_network("detection", name, args)


def test_mask_rcnn_trains_and_detects_on_images_of_different_sizes():
    for name in ("hafa_pvt_v2_b0", "pvt_v2_b0"):
        model = small_detector(name)
        images = [torch.rand(3, 72, 100), torch.rand(3, 97, 66)]
        masks = [torch.zeros(1, 72, 100, dtype=torch.uint8), torch.zeros(1, 97, 66, dtype=torch.uint8)]
        masks[0][0, 10:40, 20:50] = masks[1][0, 30:60, 5:40] = 1
        targets = [
            dict(boxes=torch.tensor([[20.0, 10, 50, 40]]), labels=torch.tensor([1]), masks=masks[0]),
            dict(boxes=torch.tensor([[5.0, 30, 40, 60]]), labels=torch.tensor([3]), masks=masks[1]),
        ]
        losses = model(images, targets)
        assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            detections = model(images)
        assert detections[1]["masks"].shape[1:] == (1, 97, 66)


def test_backbone_initialised_from_an_imagenet_baseline_checkpoint(tmp_path):
    baseline = timm.create_model("pvt_v2_b0")
    path = str(tmp_path / "pvt_v2_b0.pth")
    torch.save(baseline.state_dict(), path)
    model = small_detector("hafa_pvt_v2_b0")
    load_pretrained(backbone_of("detection", model), path, verbose=False)
    body = model.backbone.body
    assert torch.equal(body.patch_embed.proj.weight, baseline.patch_embed.proj.weight)
    assert torch.equal(body.stages[1].blocks[0].attn.q.weight, baseline.stages[1].blocks[0].attn.q.weight)


def test_step_schedule_warms_up_then_steps_after_the_milestone_epochs():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    recipe = dict(lr_steps=[2, 3], lr_step_rate=0.1, warmup_iters=4, warmup_ratio=0.001)
    scheduler = TASK.scheduler(optimizer, recipe, updates_per_epoch=5, epochs=4)
    lrs = []
    for update in range(1, 21):  # the lr of update u, then the training loop's step_update(num_updates=u)
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(num_updates=update)
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[1] < lrs[2] < lrs[3] < 1.0
    assert lrs[4:10] == [1.0] * 6  # rest of epoch 1, all of epoch 2
    assert lrs[10:15] == [pytest.approx(0.1)] * 5  # epoch 3
    assert lrs[15:] == [pytest.approx(0.01)] * 5  # epoch 4


# ---------------------------------------------------------------- data


def test_training_samples_flip_boxes_and_masks_together(tiny_coco):
    dataset = CocoInstances(tiny_coco, "train", train=True, hflip=1.0)
    plain = CocoInstances(tiny_coco, "train", train=True, hflip=0.0)
    for index in range(len(dataset)):
        image, target, skipped = dataset[index]
        plain_image, plain_target, _ = plain[index]
        assert skipped == 0
        assert image.shape == plain_image.shape
        assert image.dtype == torch.float32
        assert torch.equal(image, plain_image.flip(-1))
        assert torch.equal(target["masks"], plain_target["masks"].flip(-1))
        width = image.shape[-1]
        assert torch.allclose(target["boxes"][:, [0, 2]], width - plain_target["boxes"][:, [2, 0]])
        for box, mask in zip(target["boxes"], target["masks"]):  # the mask lies inside its box
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert xs.min() >= box[0] - 1
            assert xs.max() <= box[2]
            assert ys.min() >= box[1] - 1
            assert ys.max() <= box[3]
    seeded = CocoInstances(tiny_coco, "train", train=True, hflip=0.5, seed=3)
    flips = [torch.equal(seeded[i][0], plain[i][0]) for i in range(len(seeded))]
    assert flips == [torch.equal(seeded[i][0], plain[i][0]) for i in range(len(seeded))]  # the same every time


def test_ground_truth_as_predictions_gives_ap_100(tiny_coco):
    dataset = CocoInstances(tiny_coco, "val", train=False)
    coco = dataset.coco
    detections, image_ids = [], []
    for image_id in dataset.image_ids:
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in annotations])).float()[:, None]
        labels = torch.tensor([dataset.category_ids.index(a["category_id"]) + 1 for a in annotations])
        detections.append(dict(boxes=boxes, labels=labels, scores=torch.ones(len(annotations)), masks=masks))
        image_ids.append(image_id)
    metrics = coco_metrics(coco, detections_to_coco(detections, image_ids, dataset.category_ids), image_ids)
    for kind in ("bbox", "segm"):
        assert metrics[f"{kind}_AP"] == pytest.approx(100)
        assert metrics[f"{kind}_AP50"] == pytest.approx(100)
        assert metrics[f"{kind}_AP75"] == pytest.approx(100)
        assert all(
            np.isnan(metrics[f"{kind}_{s}"]) or metrics[f"{kind}_{s}"] == pytest.approx(100)
            for s in ("APs", "APm", "APl")
        )
    wrong = detections_to_coco(
        [dict(d, labels=d["labels"] % 3 + 1) for d in detections], image_ids, dataset.category_ids
    )
    assert coco_metrics(coco, wrong, image_ids)["bbox_AP"] == 0
    assert coco_metrics(coco, [], image_ids)["segm_AP"] == 0


@pytest.fixture
def coco_copy(tiny_coco, tmp_path):
    """A writable copy of the tiny dataset: -> (root, train json)."""

    root = tmp_path / "copy"
    shutil.copytree(tiny_coco, root)
    with open(root / "annotations" / "instances_train.json") as f:
        return str(root), json.load(f)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: "{not json", "is not valid JSON"),
        (lambda c: {k: v for k, v in c.items() if k != "categories"}, "no list of categories"),
        (
            lambda c: dict(c, annotations=[{k: v for k, v in a.items() if k != "bbox"} for a in c["annotations"]]),
            "lack 'bbox'",
        ),
        (
            lambda c: dict(c, annotations=c["annotations"] + [dict(c["annotations"][0], id=99, image_id=77)]),
            "image ids that are not in its images: 77",
        ),
        (
            lambda c: dict(c, annotations=c["annotations"] + [dict(c["annotations"][0], id=99, category_id=42)]),
            "category ids that are not in its categories (1, 2, 3): 42",
        ),
        (
            lambda c: dict(c, images=c["images"] + [dict(id=50, file_name="gone.png", height=80, width=80)]),
            "missing from",
        ),
        (lambda c: dict(c, images=c["images"] + [dict(c["images"][0])]), "duplicate images ids: 1"),
        (lambda c: dict(c, annotations=[dict(c["annotations"][0], segmentation="oops")]), "polygons or RLE"),
    ],
)
def test_bad_annotation_files_get_a_clear_message(coco_copy, change, message):
    root, content = coco_copy
    write_json(root, "train", change(copy.deepcopy(content)))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CocoInstances(root, "train", train=True)


def test_degenerate_boxes_empty_masks_crowds_and_images_without_objects(coco_copy):
    root, content = coco_copy
    annotations = content["annotations"]
    first_image = [a for a in annotations if a["image_id"] == 1]
    for a in first_image:  # image 1 keeps no object
        a["iscrowd"] = 1
    others = [a for a in annotations if a["image_id"] != 1]
    others[0]["bbox"] = [10, 10, 1.0, 30]  # degenerate
    others[1]["area"] = 0  # an empty mask
    del others[2]["area"]  # computed from the mask
    write_json(root, "train", content)
    dataset = CocoInstances(root, "train", train=True)
    assert dataset.dropped.degenerate_boxes == [others[0]["id"]]
    assert dataset.dropped.empty_masks == [others[1]["id"]]
    assert dataset.dropped.crowd == len(first_image)
    assert 1 in dataset.dropped.images_without_objects
    assert 1 not in dataset.image_ids
    assert dataset.coco.anns[others[2]["id"]]["area"] > 0
    messages = "\n".join(dataset.dropped.messages(filter_empty=True))
    assert "1 degenerate boxes" in messages
    assert "1 empty masks" in messages
    assert "skipped" in messages
    kept = CocoInstances(root, "train", train=True, filter_empty=False)
    index = kept.image_ids.index(1)
    image, target, _ = kept[index]
    assert target["boxes"].shape == (0, 4)
    assert target["masks"].shape == (0, *image.shape[-2:])
    images, targets, skipped = collate_detection([kept[index], kept[(index + 1) % len(kept)]])
    model = small_detector("pvt_v2_b0")
    assert torch.isfinite(sum(model(images, targets).values()))  # a pure negative trains


def test_unreadable_images_are_skipped_and_counted(coco_copy):
    root, _ = coco_copy
    with open(os.path.join(root, "val", "img2.png"), "wb") as f:
        f.write(b"not a png")
    dataset = CocoInstances(root, "val", train=False)
    image, target, skipped = dataset[dataset.image_ids.index(2)]
    assert image is None
    assert skipped == 1
    assert target["image_id"] == 2


# ---------------------------------------------------------------- commands


def test_det_train_eval_and_predict_end_to_end(tiny_coco, tmp_path, capsys):
    output = str(tmp_path / "runs")
    assert (
        main(
            [
                "det-train",
                "--data",
                tiny_coco,
                "--model",
                "hafa_pvt_v2_b0",
                "pvt_v2_b0",
                "--epochs",
                "1",
                "--output",
                output,
                *TINY,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| hafa_pvt_v2_b0 |" in printed
    assert "| pvt_v2_b0 |" in printed
    assert "box AP" in printed
    assert "hafa_pvt_v2_b0 vs pvt_v2_b0:" in printed
    best = os.path.join(output, "hafa_pvt_v2_b0", "best.pth")
    saved = read_file(best)
    assert saved["task"] == "detection"
    assert saved["classes"] == list(SHAPES)
    assert set(saved["metrics"]) >= {
        f"{k}_{m}" for k in ("bbox", "segm") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")
    }
    for name in ("log.csv", "curves.png", "last.pth"):
        assert os.path.isfile(os.path.join(output, "hafa_pvt_v2_b0", name))
    metrics_json = str(tmp_path / "metrics.json")
    assert main(["det-eval", "--checkpoint", best, "--workers", "0", "--json", metrics_json]) == 0
    assert "mask AP" in capsys.readouterr().out
    with open(metrics_json) as f:
        evaluated = json.load(f)
    assert evaluated["images"] == 2
    assert evaluated["bbox_AP"] == pytest.approx(saved["metrics"]["bbox_AP"])
    png = str(tmp_path / "predicted.png")
    result = predict_detection(best, os.path.join(tiny_coco, "val", "img1.png"), png, score_threshold=0.0)
    with Image.open(png) as drawn:
        assert drawn.size == (90, 66)
    assert all(name in SHAPES for name, _, _ in result["detections"])
    nothing = predict_detection(best, os.path.join(tiny_coco, "val", "img1.png"), png, score_threshold=1.1)
    assert nothing["detections"] == []
    assert os.path.isfile(png)
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                best,
                "--image",
                os.path.join(tiny_coco, "val", "img1.png"),
                "--output",
                str(tmp_path / "cli.png"),
                "--score-threshold",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("detection: 0 detections")
    assert main(["predict", "--checkpoint", best, "--score-threshold", "1.1"]) == 2
    assert "--score-threshold must be a number from 0 to 1, not 1.1" in capsys.readouterr().err
    assert os.path.isfile(tmp_path / "cli.png")


def test_det_train_resumes_exactly(tiny_coco, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = ["det-train", "--data", tiny_coco, "--model", "pvt_v2_b0", *TINY]
    assert main([*common, "--epochs", "2", "--output", straight]) == 0
    assert main([*common, "--epochs", "1", "--output", split]) == 0
    assert main([*common, "--epochs", "2", "--output", split, "--resume"]) == 0
    a = read_file(os.path.join(straight, "pvt_v2_b0", "last.pth"))
    b = read_file(os.path.join(split, "pvt_v2_b0", "last.pth"))
    assert a["train_state"] == b["train_state"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert main([*common, "--epochs", "2", "--output", split]) == 2  # never overwrites a run


def test_det_eval_rejects_other_checkpoints(tmp_path):
    path = str(tmp_path / "plain.pth")
    torch.save({"weight": torch.zeros(1)}, path)
    assert main(["det-eval", "--checkpoint", path]) == 2


def test_size_buckets():
    assert side_buckets(800, 1333) == (800, 1088, 1344)
    assert side_buckets(72, 120) == (96, 128)
    images = torch.ones(2, 3, 70, 100)
    padded = pad_to_buckets(images, (96, 128))
    assert padded.shape == (2, 3, 96, 128)
    assert padded[..., :70, :100].eq(1).all()
    assert padded.sum() == images.sum()
    assert pad_to_buckets(torch.ones(1, 3, 160, 96), (96, 128)).shape == (1, 3, 160, 96)  # above the last: as is


def test_compiled_det_train_pads_to_size_buckets_and_its_checkpoint_evaluates_alike(tiny_coco, tmp_path, caplog):
    output = str(tmp_path / "runs")
    argv = ["det-train", "--data", tiny_coco, "--model", "hafa_pvt_v2_b0", "--epochs", "1", "--output", output]
    with caplog.at_level(logging.INFO, logger="hafa"):
        assert main([*argv, "--compile", "aot_eager", *TINY]) == 0
    assert "batches padded to size buckets: sides 96, 128" in caplog.text
    shapes = [r.message.split("input ")[1].split(",")[0] for r in caplog.records if "compiling for input" in r.message]
    assert shapes, "the backbone was not compiled"
    assert all(re.fullmatch(r"[12] x 3 x (96|128) x (96|128)", shape) for shape in shapes), shapes
    best = os.path.join(output, "hafa_pvt_v2_b0", "best.pth")
    saved = read_file(best)
    assert saved["settings"]["size_buckets"] is True
    metrics_json = str(tmp_path / "metrics.json")
    assert main(["det-eval", "--checkpoint", best, "--workers", "0", "--json", metrics_json]) == 0  # eager
    with open(metrics_json) as f:
        evaluated = json.load(f)
    for key in ("bbox_AP", "segm_AP"):
        assert evaluated[key] == pytest.approx(saved["metrics"][key]), key
    assert main(["det-eval", "--checkpoint", best, "--workers", "0", "--no-size-buckets"]) == 0

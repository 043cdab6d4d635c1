"""Real microscopy, trained from scratch on the CPU: ours through ``maskrcnn train --images
--labels`` with a validation set, against torchvision's own ``maskrcnn_resnet50_fpn`` trained
the same way on the same data for the same number of steps.

The data: the fluorescence nuclei image that StarDist ships for its tests
(``stardist/data/images/img2d.tif`` + ``mask2d.tif``: a 512 x 512 16-bit image from the 2018
Kaggle Data Science Bowl, values 0..235, with its instance label image).  It is cut into 128 x
128 tiles, kept 16-bit (so the per-image percentile stretch is exercised), 12 for training and
4 (one per tile row) for validation.  Nothing is downloaded here; install the package into a
scratch folder first, never into the project's environment::

    pip install --no-deps --target /tmp/stardist_pkg stardist
    python benchmarks/bench_microscopy.py --stardist /tmp/stardist_pkg --out /tmp/bench_micro

Both models: ResNet-50 FPN (``--backbone`` picks a smaller one for both), trainable BatchNorm
(torchvision's choice without pretrained weights), images upscaled to 256 x 256 (``--side``), anchors 8..128, the same proposal and sampling
counts, SGD with the same learning rate, warm-up, cosine decay and gradient clipping, the same
augmentation (``build_transforms(train=True)``), the same batches; validation mask AP@0.5 by
the same COCO evaluator every ``--eval-every`` steps, best kept.  Prints a table of
validation mask AP@0.5 over the steps and writes it to ``OUT/results.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TILE = 128
ANCHOR_SCALES = (8, 16, 32, 64, 128)
#: Proposal and sampling counts for both models (torchvision's names in comments), smaller than
#: either's defaults so that a CPU run fits in minutes.
RPN_PRE_NMS = 1000            # rpn_pre_nms_top_n_{train,test}
RPN_POST_NMS_TRAIN = 500      # rpn_post_nms_top_n_train
RPN_POST_NMS_TEST = 300       # rpn_post_nms_top_n_test
ROIS_PER_IMAGE = 128          # box_batch_size_per_image
DETECTIONS_PER_IMAGE = 100    # box_detections_per_img
MIN_SCORE = 0.05              # box_score_thresh
LEARNING_RATE = 0.02
WARMUP_STEPS = 20
BATCH = 2


def find_data(stardist: Path) -> tuple[Path, Path]:
    for base in (stardist, stardist / "stardist", stardist / "stardist" / "data" / "images", stardist / "data" / "images"):
        if (base / "img2d.tif").is_file():
            return base / "img2d.tif", base / "mask2d.tif"
        if (base / "stardist" / "data" / "images" / "img2d.tif").is_file():
            base = base / "stardist" / "data" / "images"
            return base / "img2d.tif", base / "mask2d.tif"
    sys.exit(f"error: {stardist}: no stardist/data/images/img2d.tif (pip install --no-deps --target DIR stardist)")


def make_tiles(image_path: Path, mask_path: Path, root: Path) -> tuple[int, int]:
    """16-bit image tiles and label tiles into root/{train,val}/{images,labels}; returns the
    instance counts (train, val)."""
    image = np.asarray(Image.open(image_path))
    labels = np.asarray(Image.open(mask_path)).astype(np.uint16)
    counts = {"train": 0, "val": 0}
    rows, cols = image.shape[0] // TILE, image.shape[1] // TILE
    for r in range(rows):
        for c in range(cols):
            split = "val" if c == (r * 3 + 1) % cols else "train"
            window = (slice(r * TILE, (r + 1) * TILE), slice(c * TILE, (c + 1) * TILE))
            for kind, array in (("images", image[window]), ("labels", labels[window])):
                (root / split / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(array)).save(root / split / kind / f"tile_{r}_{c}.tif")
            counts[split] += len(np.setdiff1d(np.unique(labels[window]), [0]))
    return counts["train"], counts["val"]


def our_settings(backbone: str, side: int, width: int | None) -> dict:
    narrow = {} if width is None else {"top_down_pyramid_size": width, "rpn_conv_channels": width,
                                       "fpn_classif_fc_layers_size": 4 * width, "mask_head_channels": width}
    return {**narrow,
        "backbone": backbone, "backbone_style": "pytorch", "train_bn": True,
        "image_resize_mode": "square", "image_min_dim": side, "image_max_dim": side,
        "rpn_anchor_scales": list(ANCHOR_SCALES), "pre_nms_limit": RPN_PRE_NMS,
        "post_nms_rois_training": RPN_POST_NMS_TRAIN, "post_nms_rois_inference": RPN_POST_NMS_TEST,
        "train_rois_per_image": ROIS_PER_IMAGE, "roi_positive_ratio": 0.25,
        "detection_max_instances": DETECTIONS_PER_IMAGE, "detection_min_confidence": MIN_SCORE,
        "images_per_gpu": BATCH, "learning_rate": LEARNING_RATE, "warmup_steps": WARMUP_STEPS,
        "lr_schedule": "cosine", "gradient_clip_norm": 5.0}


def train_ours(data: Path, out: Path, steps: int, eval_every: int, backbone: str, side: int,
               width: int | None) -> tuple[list, float]:
    """``maskrcnn train --images --labels --val-images --val-labels``; (curve, seconds).  Where
    the command has no --val-labels yet, the same through the Python Trainer's val_dataset."""
    run = out / "ours"
    shutil.rmtree(run, ignore_errors=True)
    maskrcnn = str(Path(sys.executable).with_name("maskrcnn"))
    settings = our_settings(backbone, side, width)
    started = time.perf_counter()
    if "--val-labels" in subprocess.run([maskrcnn, "train", "--help"], capture_output=True, text=True).stdout:
        cmd = [maskrcnn, "train", "--images", str(data / "train" / "images"), "--labels", str(data / "train" / "labels"),
               "--val-images", str(data / "val" / "images"), "--val-labels", str(data / "val" / "labels"),
               "--class-name", "nucleus", "--out", str(run), "--steps", str(steps),
               "--eval-every", str(eval_every), "--checkpoint-every", str(steps), "--workers", "0",
               "--device", "cpu", "--seed", "0"]
        for key, value in settings.items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    else:
        from maskrcnn import Config, MaskRCNN
        from maskrcnn.data import TorchDataset, build_transforms, open_dataset
        from maskrcnn.engine.trainer import Trainer

        print("maskrcnn train has no --val-labels here: the Python Trainer with val_dataset", flush=True)
        train = open_dataset(images=data / "train" / "images", labels=data / "train" / "labels", class_name="nucleus")
        val = open_dataset(images=data / "val" / "images", labels=data / "val" / "labels", class_name="nucleus")
        torch.manual_seed(0)
        config = Config(num_classes=2, **settings)
        model = MaskRCNN(config, train.class_names)
        Trainer(model, TorchDataset(train, build_transforms(train=True)), run, config, val_dataset=val,
                eval_every=eval_every, checkpoint_every=steps, seed=0).fit(steps)
    seconds = time.perf_counter() - started
    curve = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        value = next((v for k, v in record.items() if k.endswith("mask_AP50")), "absent")
        if value != "absent":
            curve.append((record["step"], value))
    if not (run / "model_best").is_dir():
        sys.exit(f"error: {run / 'model_best'} was not written")
    return curve, seconds


def torchvision_model(backbone: str, side: int, width: int | None):
    """torchvision's Mask R-CNN without pretrained weights (so with trainable BatchNorm and
    every layer trainable, as torchvision builds it then): ``maskrcnn_resnet50_fpn`` itself for
    ResNet-50 at full width; with ``width``, torchvision's own FPN, RPN head, box head and mask
    head built ``width`` channels wide (box head 4 x width), as ours then is."""
    from torch import nn
    from torchvision.models import resnet
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    anchors = AnchorGenerator(tuple((s,) for s in ANCHOR_SCALES), ((0.5, 1.0, 2.0),) * len(ANCHOR_SCALES))
    options = dict(
        min_size=side, max_size=side,
        rpn_anchor_generator=anchors, rpn_pre_nms_top_n_train=RPN_PRE_NMS, rpn_pre_nms_top_n_test=RPN_PRE_NMS,
        rpn_post_nms_top_n_train=RPN_POST_NMS_TRAIN, rpn_post_nms_top_n_test=RPN_POST_NMS_TEST,
        box_batch_size_per_image=ROIS_PER_IMAGE, box_detections_per_img=DETECTIONS_PER_IMAGE,
        box_score_thresh=MIN_SCORE)
    if backbone == "resnet50" and width is None:
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, **options)
    body = getattr(resnet, backbone)(weights=None, norm_layer=nn.BatchNorm2d)
    stages = [body.inplanes // 8, body.inplanes // 4, body.inplanes // 2, body.inplanes]
    fpn = 256 if width is None else width
    fc, mask = (1024, 256) if width is None else (4 * width, width)
    features = BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in range(1, 5)}, stages, fpn,
                               extra_blocks=LastLevelMaxPool())
    return MaskRCNN(features, num_classes=None, rpn_head=RPNHead(fpn, 3),
                    box_head=TwoMLPHead(fpn * 7 * 7, fc), box_predictor=FastRCNNPredictor(fc, 2),
                    mask_head=MaskRCNNHeads(fpn, [mask] * 4, 1), mask_predictor=MaskRCNNPredictor(mask, mask, 2),
                    **options)


def train_torchvision(data: Path, steps: int, eval_every: int, backbone: str, side: int,
                      width: int | None) -> tuple[list, float]:
    """torchvision's Mask R-CNN on the same tiles, read by the same reader, same schedule."""
    from maskrcnn.data import TorchDataset, build_transforms, open_dataset
    from maskrcnn.evaluation.coco_eval import evaluate_detections
    from maskrcnn.structures import Detections

    torch.manual_seed(0)
    train_set = TorchDataset(open_dataset(images=data / "train" / "images", labels=data / "train" / "labels",
                                          class_name="nucleus"), build_transforms(train=True))
    val_set = TorchDataset(open_dataset(images=data / "val" / "images", labels=data / "val" / "labels",
                                        class_name="nucleus"))
    model = torchvision_model(backbone, side, width)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=LEARNING_RATE, momentum=0.9)

    def factor(step):  # linear warm-up, then cosine to 0 (as the trainer's "cosine" schedule)
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(0)
    order: list[int] = []
    curve = []
    started = time.perf_counter()

    def validate() -> float:
        model.eval()
        targets, detections = [], []
        with torch.no_grad():
            for i in range(len(val_set)):
                image, target = val_set[i]
                out = model([image.float() / 255])[0]
                masks = out["masks"][:, 0] > 0.5
                detections.append(Detections(boxes=out["boxes"], labels=out["labels"], scores=out["scores"],
                                             masks=masks))
                targets.append(target)
        model.train()
        return evaluate_detections(targets, detections, ["BG", "nucleus"])["segm"]["AP50"]

    model.train()
    for step in range(steps):
        if len(order) < BATCH:
            order += torch.randperm(len(train_set), generator=generator).tolist()
        batch = [train_set[order.pop(0)] for _ in range(BATCH)]
        images = [image.float() / 255 for image, _ in batch]
        targets = [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"].to(torch.uint8)}
                   for _, t in batch]
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, validate()))
            print(f"torchvision step {step + 1}: loss {loss.item():.3f}, val mask AP@0.5 {curve[-1][1]:.3f}",
                  flush=True)
    return curve, time.perf_counter() - started


def table(results: dict) -> str:
    """Validation mask AP@0.5 over the steps, both models, as a Markdown table."""
    curves = [dict(results["ours"]), dict(results["torchvision"])]
    lines = ["| step | ours: val mask AP@0.5 | torchvision: val mask AP@0.5 |", "|---:|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for step in sorted(set(curves[0]) | set(curves[1])):
        lines.append(f"| {step} | {fmt(curves[0].get(step))} | {fmt(curves[1].get(step))} |")
    best = [max((v for v in c.values() if v is not None), default=None) for c in curves]
    lines.append(f"| best | {fmt(best[0])} | {fmt(best[1])} |")
    lines.append(f"| minutes | {results['ours_seconds'] / 60:.1f} | {results['torchvision_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stardist", type=Path, required=True, help="folder stardist was installed into (--target)")
    parser.add_argument("--out", type=Path, default=Path("bench_microscopy"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone", default="resnet50", choices=("resnet18", "resnet34", "resnet50"),
                        help="both models' backbone (default resnet50: torchvision's maskrcnn_resnet50_fpn)")
    parser.add_argument("--side", type=int, default=256, help="image side the models see (tiles are 128)")
    parser.add_argument("--only", choices=("ours", "torchvision"),
                        help="train one of the two (run two processes side by side; results_<which>.json)")
    parser.add_argument("--width", type=int, help="FPN, RPN and mask head channels of both models (box head 4x); "
                        "default the libraries' own (256, box head 1024)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image_path, mask_path = find_data(args.stardist)
    data = args.out / "data"
    n_train, n_val = make_tiles(image_path, mask_path, data)
    print(f"{image_path}: 12 training tiles ({n_train} nuclei), 4 validation tiles ({n_val} nuclei)", flush=True)
    shape = (args.backbone, args.side, args.width)
    ours, ours_s = train_ours(data, args.out, args.steps, args.eval_every, *shape) if args.only != "torchvision" else ([], 0.0)
    theirs, theirs_s = (train_torchvision(data, args.steps, args.eval_every, *shape) if args.only != "ours"
                        else ([], 0.0))
    results = {"train_nuclei": n_train, "val_nuclei": n_val, "steps": args.steps, "backbone": args.backbone,
               "side": args.side, "width": args.width, "ours": ours, "torchvision": theirs,
               "ours_seconds": ours_s, "torchvision_seconds": theirs_s}
    (args.out / f"results{'_' + args.only if args.only else ''}.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

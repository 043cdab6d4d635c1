"""Peak training memory with and without Matterport's mini masks (issue 9.5).

One training step (forward + backward) on one 1024x1024 image with 300 instances (random
ellipses), run in a fresh process per variant so each peak is its own:

    python benchmarks/bench_mini_mask.py                 # both variants, a table
    python benchmarks/bench_mini_mask.py --instances 100 --size 512

"input" is the resident memory once the model and the image's target (300 full-size masks,
as ``Dataset.load_mask`` gives them: 300 MB of bool at 1024x1024) exist; "step peak" the
highest resident memory during the step (ru_maxrss); "added" their difference, what the step
itself needs; the last row, one instance, is what the network's own activations take.  With mini masks the target masks are shrunk to ``mini_mask_shape`` before
anything else (``model.training.mold_target``), so the step no longer copies them at full size.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_step(use_mini_mask: bool, instances: int, size: int, from_mini_target: bool) -> dict:
    import numpy as np
    import torch

    from maskrcnn import Config, MaskRCNN
    from maskrcnn.boxes import masks_to_boxes
    from maskrcnn.model.targets import minimize_masks

    torch.manual_seed(0)
    config = Config(backbone="resnet18", num_classes=2, image_min_dim=size, image_max_dim=size,
                    images_per_gpu=1, top_down_pyramid_size=64, rpn_conv_channels=64,
                    fpn_classif_fc_layers_size=256, mask_head_channels=64, train_rois_per_image=200,
                    use_mini_mask=use_mini_mask, max_gt_instances=instances)
    model = MaskRCNN(config).train()
    rng = np.random.default_rng(0)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    masks = torch.zeros(instances, size, size, dtype=torch.bool)
    for i in range(instances):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(size / 100, size / 12, 2)
        masks[i] = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    del ys, xs
    image = torch.from_numpy(rng.integers(0, 256, (3, size, size), dtype=np.uint8))
    target = {"masks": masks, "labels": torch.ones(instances, dtype=torch.int64), "boxes": masks_to_boxes(masks).float()}
    if from_mini_target:  # minimized in the data pipeline: the full masks never reach the step
        target = {"mini_masks": minimize_masks(masks, target["boxes"], config.mini_mask_shape),
                  "labels": target["labels"], "boxes": target["boxes"]}
        del masks
    before = rss_mb()
    start = time.perf_counter()
    losses = model([image], [target])
    sum(losses.values()).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mini_mask": use_mini_mask, "minimized_in_data": from_mini_target, "input_mb": round(before),
            "step_peak_mb": round(peak), "added_mb": round(peak - before), "step_s": round(seconds, 1),
            "mask_loss": round(float(losses["mrcnn_mask_loss"].detach()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--variant", choices=("full", "mini", "mini-data"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        result = one_step(args.variant != "full", args.instances, args.size, args.variant == "mini-data")
        print(json.dumps(result))
        return
    print(f"one training step, {args.instances} instances on a {args.size}x{args.size} image (MB resident)")
    print(f"{'masks':32} {'input':>8} {'step peak':>10} {'added':>8} {'step s':>7}")
    labels = {"full": "full-size (use_mini_mask=False)", "mini": "mini 56x56 (minimized in step)",
              "mini-data": "mini 56x56 (minimized in data)"}
    runs = [(variant, args.instances) for variant in ("full", "mini", "mini-data")] + [("full", 1)]
    for variant, instances in runs:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--instances", str(instances),
                              "--size", str(args.size)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        label = labels[variant] if instances == args.instances else "the network alone (1 instance)"
        print(f"{label:32} {r['input_mb']:>8} {r['step_peak_mb']:>10} {r['added_mb']:>8} {r['step_s']:>7}")


if __name__ == "__main__":
    main()

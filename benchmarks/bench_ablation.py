"""What each speed idea gives: ours with channels-last and BN folding off in turn, and (inference
only) the Winograd convolutions and embedding_bag ROI pooling off in turn, against torchvision,
interleaved; inference on a 480x640 image and a training step.

    python benchmarks/bench_ablation.py --reps 5
"""
from __future__ import annotations

import harness
import maskrcnn.model.maskrcnn as model_module
import torch
from bench_training import training_step_fns
from harness import (build_ours, build_torchvision, fmt_ms, interleaved, median, set_score_threshold, smooth_image,
                     threshold_for)
from maskrcnn.model import roi_align
from maskrcnn.model.fuse import set_bn_folding


ABLATIONS = [("neither (NCHW, conv then BN)", False, False), ("channels-last only", False, True),
             ("BN folding only", True, False), ("both (default)", True, True)]


#: Inference-only ideas, on the default model (both of the above on): (name, Winograd 3x3
#: convolutions, embedding_bag ROI pooling).  Off means oneDNN's direct convolutions and
#: torchvision's one-threaded roi_align kernel on NCHW maps.
INFERENCE_ABLATIONS = [("+ direct convolutions (Winograd off)", False, True),
                       ("+ torchvision roi_align (embedding_bag pooling off)", True, False),
                       ("+ both off", False, False)]


def detect_with(model, image, winograd: bool, bags: bool):
    """``model.detect([image])`` with the Winograd convolutions and the embedding_bag pooling on
    or off for this call."""
    setting, pooling = model.config.cpu_inference_conv, roi_align.fast_pooling
    model.config.cpu_inference_conv = "winograd" if winograd else "direct"
    if not bags:
        roi_align.fast_pooling = lambda feature: False
    try:
        return model.detect([image])
    finally:
        model.config.cpu_inference_conv, roi_align.fast_pooling = setting, pooling


def bench_ablation(args, device) -> None:
    """Ours with each speed idea off in turn, against torchvision, interleaved; 480x640 image."""
    tv = build_torchvision(800, 1333).to(device)
    variants = {}
    for name, fold, cl in ABLATIONS:
        m = build_ours(tv, 800, 1333).to(device)
        set_bn_folding(m.backbone, fold)
        m.backbone.channels_last = cl
        variants[name] = m
    image = smooth_image(480, 640, seed=1120)
    threshold = threshold_for(tv, image, 10, device)
    for m in variants.values():
        set_score_threshold(tv, m, threshold)
    dev_image = image.to(device)
    batch, _ = model_module.mold_images([dev_image], next(iter(variants.values())).config, device)

    def run_tv():
        with torch.inference_mode():
            return tv([dev_image.float() / 255])

    def run_tv_backbone():
        with torch.inference_mode():
            return tv.backbone(batch)

    fns = {"torchvision": run_tv}
    for name, m in variants.items():
        fns[name] = (lambda m=m: m.detect([dev_image]))
    default = variants["both (default)"]
    for name, winograd, bags in INFERENCE_ABLATIONS:
        fns[name] = (lambda winograd=winograd, bags=bags: detect_with(default, dev_image, winograd, bags))
    t = interleaved(fns, args.reps, device)
    bfns = {"torchvision": run_tv_backbone}
    for name, m in variants.items():
        bfns[name] = (lambda m=m: torch.inference_mode()(m.features)(batch))
    tb = interleaved(bfns, args.reps, device)
    print(f"\n## Ablation: 480x640 -> 800x1066, ~10 detections ({device}, {torch.get_num_threads()} threads, "
          f"median of {args.reps}, interleaved)\n")
    print("| variant | end to end ms | / torchvision | backbone+FPN ms | / torchvision |")
    print("|---|---:|---:|---:|---:|")
    ref, bref = median(t["torchvision"]), median(tb["torchvision"])
    for name in fns:
        a = median(t[name])
        b = f"{fmt_ms(median(tb[name]))} | {median(tb[name]) / bref:.2f}" if name in tb else " | "
        print(f"| {name} | {fmt_ms(a)} | {a / ref:.2f} | {b} |", flush=True)
    del variants, fns, bfns
    train = training_step_fns(device, variants={name: (fold, cl) for name, fold, cl in ABLATIONS})
    del train["ours"]
    t = interleaved(train, args.train_reps, device)
    print(f"\n## Ablation: training, batch 2, 512x512 (median of {args.train_reps}, interleaved)\n")
    print("| variant | s / iteration | / torchvision |")
    print("|---|---:|---:|")
    ref = median(t["tv"])
    for name in t:
        a = median(t[name])
        print(f"| {'torchvision' if name == 'tv' else name} | {a:.3f} | {a / ref:.2f} |", flush=True)


def main(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--train-reps", type=int, default=5)
    args = p.parse_args(argv)
    bench_ablation(args, harness.setup(args))


if __name__ == "__main__":
    main()

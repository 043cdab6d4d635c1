"""Training speed and memory, ours against torchvision: seconds per iteration (forward,
backward, SGD step) and peak memory, batch 2, 512x512, 3 instances per image.

    python benchmarks/bench_training.py --reps 5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import harness
import torch
from harness import NUM_CLASSES, build_ours, build_torchvision, interleaved, median, smooth_image
from maskrcnn.model.fuse import set_bn_folding


def training_batch(seed: int = 0, size: int = 512, instances: int = 3):
    """Two [3, size, size] uint8 images, each with ``instances`` ellipses as masks."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(2):
        images.append(smooth_image(size, size, seed=seed * 10 + i))
        masks = []
        for _ in range(instances):
            cy, cx = (torch.rand(2, generator=g) * size * 0.6 + size * 0.2).tolist()
            ry, rx = (torch.rand(2, generator=g) * size * 0.15 + size * 0.05).tolist()
            masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
        masks = torch.stack(masks)
        labels = torch.randint(1, NUM_CLASSES, (instances,), generator=g)
        boxes = torch.stack([torch.tensor([x.min(), y.min(), x.max() + 1, y.max() + 1], dtype=torch.float32)
                             for x, y in ((torch.nonzero(m)[:, 1], torch.nonzero(m)[:, 0]) for m in masks)])
        targets.append(dict(masks=masks, labels=labels, boxes=boxes))
    return images, targets


def training_step_fns(device, size: int = 512, variants=None):
    """One SGD iteration (forward, backward, step) of each model on the same batch, as
    functions: {"ours": ..., "tv": ...}, plus one per ``variants`` entry (name -> (fold BN,
    channels-last)) of ours."""
    tv = build_torchvision(size, size).to(device).train()
    models = {"tv": tv}
    for name, (fold, cl) in {"ours": (None, None), **(variants or {})}.items():
        ours = build_ours(tv, size, size).to(device).train()
        ours.set_trainable("3+")  # torchvision's trainable_backbone_layers=3: layer2..layer4 + heads
        if fold is not None:
            set_bn_folding(ours.backbone, fold)
            ours.backbone.channels_last = cl
        models[name] = ours
    images, targets = training_batch(size=size)
    dev_targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    tv_images = [im.to(device).float() / 255 for im in images]
    ours_images = [im.to(device) for im in images]

    def step(model, imgs):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)

        def run():
            losses = model(imgs, dev_targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    return {k: step(m, tv_images if k == "tv" else ours_images) for k, m in models.items()}


def peak_memory_child(which: str, device: str, iters: int) -> None:
    """Child process: run ``iters`` steps of one model; print the peak memory the steps added
    over what the process held before them (MiB): CUDA's peak allocation, or on a CPU the
    resident set sampled every millisecond (the kernel's high-water mark would include the
    building of both models)."""
    import gc
    import threading
    fns = training_step_fns(device)
    fn = fns[which]
    del fns
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss, peak_rss, done = _rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak_rss[0] = max(peak_rss[0], _rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(iters):
        fn()
    done.set()
    sampler.join()
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        peak = peak_rss[0] - base_rss
    print(json.dumps({"peak_mib": peak}))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def bench_training(args, device) -> None:
    fns = training_step_fns(device)
    t = interleaved(fns, args.reps, device, warmup=1)
    mo, mt = median(t["ours"]), median(t["tv"])
    mem = {}
    for which in ("ours", "tv"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", which, "--device", str(device),
                              "--threads", str(torch.get_num_threads())], capture_output=True, text=True)
        try:
            mem[which] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
        except (IndexError, ValueError):
            mem[which] = float("nan")
            print(out.stderr[-2000:], file=sys.stderr)
    kind = "peak allocated" if device == "cuda" else "peak RSS growth"
    print(f"\n## Training: batch 2, 512x512, 3 instances per image ({device}, {torch.get_num_threads()} threads, "
          f"median of {args.reps}, interleaved)\n")
    print(f"| model | s / iteration | {kind} MiB |")
    print("|---|---:|---:|")
    print(f"| ours | {mo:.3f} | {mem['ours']:.0f} |")
    print(f"| torchvision | {mt:.3f} | {mem['tv']:.0f} |")
    print(f"| ours / torchvision | {mo / mt:.2f} | {mem['ours'] / mem['tv']:.2f} |")


def main(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--memory-child", choices=["ours", "tv"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        peak_memory_child(args.memory_child, args.device, iters=3)
        return
    bench_training(args, harness.setup(args))


if __name__ == "__main__":
    main()

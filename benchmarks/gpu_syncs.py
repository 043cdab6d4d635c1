"""Where a GPU waits for its host: the synchronising calls of one detection and one training
iteration, ours against torchvision's on the same weights, counted by PyTorch itself.

    python benchmarks/gpu_syncs.py                 # on a CUDA machine
    python benchmarks/gpu_syncs.py --cases small   # training at batch 2 of 512x512 only

Each call that makes the host wait for the GPU's queue (``nonzero``, ``.item()``, NMS's
read-back, a copy from ordinary host memory) leaves the GPU idle while the host queues the
next kernels.  ``torch.cuda.set_sync_debug_mode("warn")`` reports every such call; they are
counted by the line of Python that made them, next to the ATen ops dispatched (about one kernel
launch each).  On a machine without CUDA the ops are counted on the CPU and the syncs estimated
from the op names (:class:`harness.DispatchCounter`), which cannot see host-to-device copies.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from pathlib import Path

import torch

from maskrcnn.device import host_waits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_train import AMP, CASES, batch, build_models, step_fn  # noqa: E402
from harness import (DispatchCounter, build_ours, build_torchvision, gpu_form,  # noqa: E402
                     set_score_threshold, smooth_image, threshold_for)


def counted(fn, device: str) -> tuple[int, Counter]:
    """Run ``fn`` twice: once to count the ATen ops it dispatches, once (on CUDA) to record its
    synchronising calls (apart, so that each warning names the line that made the call, not the
    op counter's).  Returns (ops, synchronising calls by file:line)."""
    ops = DispatchCounter()
    with ops:
        fn()
    if not device.startswith("cuda"):
        return ops.total, ops.sync_sites
    sites = host_waits(fn)
    return ops.total, sites


def report(label: str, results: dict) -> None:
    for name, (ops, sites) in results.items():
        print(f"| {label} | {name} | {ops} | {sum(sites.values())} |", flush=True)
    top = ", ".join(f"{site} {n}" for site, n in results["ours"][1].most_common(10))
    print(f"\n  ours' syncs by line: {top or 'none'}\n", flush=True)


def inference(device: str, counts: list[int]) -> None:
    tv = build_torchvision(800, 1333).to(device)
    ours = build_ours(tv, 800, 1333).to(device)
    image = smooth_image(480, 640, seed=1120)
    dev_image = image.to(device)
    for count in counts:
        set_score_threshold(tv, ours, threshold_for(tv, image, count, device))
        fns = {"torchvision": lambda: tv([dev_image.float() / 255]), "ours": lambda: ours.detect([dev_image])}
        results = {}
        with torch.inference_mode():
            for name, fn in fns.items():
                fn()  # warm: anchors, folded weights and device constants made once
                results[name] = counted(fn, device)
        n = len(ours.detect([dev_image])[0])
        report(f"detect 480x640 -> 800x1066, {n} dets", results)


def training(device: str, cases: list[str], amp: str) -> None:
    for case in cases:
        n, h, w, k = CASES[case]
        images, targets = batch(n, h, w, k)
        models = build_models(h, w, ["ours"], device=device)
        results = {}
        for name, model in models.items():
            fn = step_fn(model, images, targets, AMP[amp], name == "torchvision", device=device)
            fn()
            fn()
            results[name] = counted(fn, device)
        report(f"train {n}x{h}x{w}, {k} inst, {amp}", results)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dets", default="10,100", help="detection counts of the inference rows ('' for none)")
    ap.add_argument("--cases", default="small,large", help="training cases ('' for none)")
    ap.add_argument("--amp", default="fp32")
    args = ap.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    with contextlib.nullcontext() if on_gpu else gpu_form():  # on a CPU: count what a GPU dispatches
        report_all(args)


def report_all(args) -> None:
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        how = "synchronising calls reported by torch.cuda.set_sync_debug_mode"
    else:
        how = "no CUDA: syncs estimated from the op names on the CPU, host-to-device copies not seen"
    print(f"{args.device}, torch {torch.__version__}; {how}\n")
    print("| run | model | ATen ops | syncs |")
    print("|---|---|---:|---:|", flush=True)
    if args.dets:
        inference(args.device, [int(c) for c in args.dets.split(",")])
    if args.cases:
        training(args.device, args.cases.split(","), args.amp)


if __name__ == "__main__":
    main()

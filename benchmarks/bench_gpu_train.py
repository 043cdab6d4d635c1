"""GPU training at realistic sizes: ours against torchvision on the same weights and batches.

    python benchmarks/bench_gpu_train.py                       # the table in README's GPU section
    python benchmarks/bench_gpu_train.py --cases large --amp bf16 --profile
    python benchmarks/bench_gpu_train.py --flops --cases small     # on any machine
    python benchmarks/bench_gpu_train.py --stages --cases large    # where an iteration's time goes
    python benchmarks/bench_gpu_train.py --dispatch --cases large  # kernel launches and syncs, on a CPU

Each case is one SGD iteration (forward, backward, step) on a fixed batch of smooth images with
elliptic instances: "small" is the CPU benchmark's 2 x 512x512 with 3 instances, "large" is
8 x 800x1066 with 8 instances each (COCO-like).  Both models are torchvision's
``maskrcnn_resnet50_fpn`` layout with random weights and frozen BN, layers 2-4 trainable; ours is
the torchvision preset converted from it.  The models run interleaved (one iteration of each per
round) so clock and thermal drift hit both alike; times are medians.  Peak memory is
``torch.cuda.max_memory_allocated`` during one iteration above what was allocated before it.
``--profile`` prints the 15 costliest CUDA kernels of one iteration of ours and of torchvision
(at the last ``--cudnn-benchmark`` setting of each case and precision).
``--flops`` only counts one iteration's FLOPs of each, on the CPU (no GPU needed).
``--dispatch`` only counts the ATen ops one iteration dispatches (about one kernel launch each on
a GPU) and those that make a GPU wait, on the CPU.
``--stages`` only times each stage of one iteration of each (backbone+FPN, RPN head, proposals,
targets, ROI align, heads, losses, backward, optimiser) with the device synchronised at every
stage boundary, on ``--device`` (a CPU too).

After each row group, a line per model gives every iteration's positive ROIs (summed over the
batch) and the mask head's batch, warm-up included: the mask head's convolutions are autotuned
once per batch size with cudnn.benchmark on, and ours pads its batch to ``mask_batch_bucket``.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torchvision.models.detection import roi_heads

import maskrcnn
from maskrcnn.model import losses as losses_module
from maskrcnn.model import training

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (NUM_CLASSES, DispatchCounter, StageTimer, build_ours, build_torchvision,  # noqa: E402
                     gpu_form, instrument_network, smooth_image)

CASES = {"small": (2, 512, 512, 3), "large": (8, 800, 1066, 8)}
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def batch(n: int, h: int, w: int, instances: int, seed: int = 0):
    """n [3, h, w] uint8 images, each with ``instances`` random ellipses as [N, h, w] masks."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    images, targets = [], []
    for i in range(n):
        images.append(smooth_image(h, w, seed=seed * 100 + i))
        masks = []
        for _ in range(instances):
            cy, cx = (torch.rand(2, generator=g) * torch.tensor([h, w]) * 0.6 + torch.tensor([h, w]) * 0.2).tolist()
            ry, rx = (torch.rand(2, generator=g) * torch.tensor([h, w]) * 0.12 + torch.tensor([h, w]) * 0.03).tolist()
            masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
        masks = torch.stack(masks)
        boxes = []
        for m in masks:
            ys, xs = torch.nonzero(m, as_tuple=True)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        targets.append(dict(masks=masks, labels=torch.randint(1, NUM_CLASSES, (instances,), generator=g),
                            boxes=torch.tensor(boxes, dtype=torch.float32)))
    return images, targets


class RoiCounts:
    """Per iteration of each model: its positive ROIs and its mask head's batch, recorded by
    wrapping torchvision's ``RoIHeads.select_training_samples`` and ``maskrcnn_loss`` and our
    ``sample_detection_targets_batch`` and ``MaskRCNN.mask_logits``.  Counts stay tensors until read,
    so recording adds no GPU synchronisation to the timed iterations."""

    def __init__(self):
        self.model = None
        self.rows = defaultdict(list)  # model name -> [(positive counts, mask batch sizes)] per iteration
        select, mask_loss = roi_heads.RoIHeads.select_training_samples, roi_heads.maskrcnn_loss
        build, mask_logits = training.sample_detection_targets_batch, maskrcnn.MaskRCNN.mask_logits

        def tv_select(head, proposals, targets):
            out = select(head, proposals, targets)
            self._add(0, *[(labels > 0).sum() for labels in out[2]])
            return out

        def tv_mask_loss(logits, proposals, *args):
            self._add(1, sum(len(p) for p in proposals))
            return mask_loss(logits, proposals, *args)

        def our_build(*args, **kwargs):
            out = build(*args, **kwargs)
            self._add(0, *[p for _, p in out.counts])  # the positives' counts, ints
            return out

        def our_mask_logits(model, features, boxes, image_shape, class_ids=None):
            self._add(1, sum(len(b) for b in boxes))
            return mask_logits(model, features, boxes, image_shape, class_ids)

        roi_heads.RoIHeads.select_training_samples = tv_select
        roi_heads.maskrcnn_loss = tv_mask_loss
        training.sample_detection_targets_batch = our_build
        maskrcnn.MaskRCNN.mask_logits = our_mask_logits

    def start(self, model: str) -> None:
        """The iteration of ``model`` that begins now."""
        self.model = model
        self.rows[model].append(([], []))

    def _add(self, column: int, *counts) -> None:
        if self.model is not None:
            self.rows[self.model][-1][column].extend(counts)

    def clear(self) -> None:
        self.rows.clear()

    def report(self) -> str:
        """One line per model: positives/mask-head batch of each iteration since :meth:`clear`."""
        lines = []
        for model, rows in self.rows.items():
            cells = [f"{int(sum(pos))}/{int(sum(mask))}" for pos, mask in rows]
            lines.append(f"ROIs per iteration, positives/mask-head batch, {model}: {' '.join(cells)}")
        return "\n".join(lines)


def step_fn(model, images, targets, amp_dtype, float_input: bool, counts: RoiCounts | None = None,
            name: str = "", device: str = "cuda", timer: StageTimer | None = None):
    """One SGD iteration of ``model`` on ``device`` as a function (fp16 with a GradScaler);
    ``counts`` records its ROI counts under ``name``; ``timer`` times its backward and
    optimiser step as stages."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-5, momentum=0.9)
    kind = torch.device(device).type
    scaler = torch.amp.GradScaler(kind, enabled=amp_dtype == torch.float16)
    imgs = [im.to(device).float() / 255 if float_input else im.to(device) for im in images]
    tgts = [{k: v.to(device) for k, v in t.items()} for t in targets]
    span = timer.span if timer is not None else lambda stage: contextlib.nullcontext()

    def run():
        if counts is not None:
            counts.start(name)
        with torch.autocast(kind, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = model(imgs, tgts)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        with span("backward"):
            scaler.scale(loss).backward()
        with span("optimizer"):
            scaler.step(opt)
            scaler.update()
    return run


TRAIN_STAGES = ["preprocess", "backbone+FPN", "RPN head", "proposals", "RPN targets", "RPN loss",
                "ROI targets", "box ROI align", "box head", "box loss", "mask ROI align", "mask head",
                "mask loss", "backward", "optimizer"]


def instrument_training(name: str, model, timer: StageTimer) -> None:
    """Time the stages of one training iteration of torchvision's model or ours under the same
    names: the network's (:func:`harness.instrument_network`), then preprocessing, targets and
    losses.  Where the two cut differently: torchvision builds its mask targets inside
    ``maskrcnn_loss`` ("mask loss"), ours with the ROI sample ("ROI targets")."""
    instrument_network(name, model, timer)
    if name == "torchvision":
        timer.hook(model.transform, "preprocess")
        timer.wrap(model.rpn.box_coder, "decode", "proposals")
        timer.wrap(model.rpn, "assign_targets_to_anchors", "RPN targets")
        timer.wrap(model.rpn.box_coder, "encode", "RPN targets")
        timer.wrap(model.rpn, "compute_loss", "RPN loss")
        timer.wrap(model.roi_heads, "select_training_samples", "ROI targets")
        timer.wrap(roi_heads, "fastrcnn_loss", "box loss")
        timer.wrap(roi_heads, "maskrcnn_loss", "mask loss")
        return
    timer.wrap(training, "mold_training_batch", "preprocess")
    timer.wrap(training, "build_rpn_targets_batch", "RPN targets")
    timer.wrap(losses_module, "rpn_class_loss", "RPN loss")
    timer.wrap(losses_module, "rpn_bbox_loss", "RPN loss")
    timer.wrap(training, "sample_detection_targets_batch", "ROI targets")
    timer.wrap(losses_module, "mrcnn_class_loss", "box loss")
    timer.wrap(losses_module, "mrcnn_bbox_loss", "box loss")
    timer.wrap(losses_module, "mrcnn_mask_loss", "mask loss")


def training_stages(cases: list[str], amps: list[str], reps: int, device: str) -> None:
    """Print where one training iteration's time goes, stage by stage, for torchvision's model
    and ours (medians of ``reps`` after one warm-up).  Every stage boundary synchronises the
    device, so a stage's time includes launching its kernels and waiting for them: the sum runs
    above the unsynchronised iteration, and a stage made of many tiny kernels shows up."""
    for case in cases:
        n, h, w, k = CASES[case]
        images, targets = batch(n, h, w, k)
        models = {k2: m.to(device) for k2, m in build_models(h, w, ["ours"], device="cpu").items()}
        for amp in amps:
            samples, peaks = {}, {}
            for name, model in models.items():
                timer = StageTimer(device)
                instrument_training(name, model, timer)
                fn = step_fn(model, images, targets, AMP[amp], name == "torchvision", device=device, timer=timer)
                try:
                    fn()  # warm-up (anchors, caches, cuDNN heuristics)
                    samples[name] = [timer.collect(fn) for _ in range(reps)]
                    peaks[name] = timer.peaks
                finally:
                    timer.remove()
            cuda = torch.device(device).type == "cuda"
            print(f"\n#### Training stages, {n}x{h}x{w}, {k} instances, {amp}, {device} (ms, median of {reps}, "
                  f"synchronised at every stage"
                  + ("; peak MiB: the most allocated during the stage, above the step's start" if cuda else "")
                  + ")\n")
            print("| stage | ours | torchvision | ours / torchvision |" + (" ours peak MiB | torchvision peak MiB |" if cuda else ""))
            print("|---|---:|---:|---:|" + ("---:|---:|" if cuda else ""))
            med = {name: {s: statistics.median(d.get(s, 0.0) for d in rows) for s in TRAIN_STAGES + ["total"]}
                   for name, rows in samples.items()}
            for m in med.values():
                m["other"] = max(m["total"] - sum(m[s] for s in TRAIN_STAGES), 0.0)
            for s in TRAIN_STAGES + ["other", "total"]:
                a, b = med["ours"][s], med["torchvision"][s]
                ratio = f"{a / b:.2f}" if b > 1e-4 else ""
                mem = f" {peaks['ours'].get(s, 0):.0f} | {peaks['torchvision'].get(s, 0):.0f} |" if cuda else ""
                print(f"| {s} | {a * 1e3:.1f} | {b * 1e3:.1f} | {ratio} |{mem}", flush=True)


def measure(fns: dict, reps: int, warmup: int) -> dict:
    """{name: (median seconds, peak MiB)} with the functions interleaved round by round."""
    times, peaks = {k: [] for k in fns}, {k: 0.0 for k in fns}
    for r in range(warmup + reps):
        for k, fn in fns.items():
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
                peaks[k] = max(peaks[k], (torch.cuda.max_memory_allocated() - base) / 2 ** 20)
    return {k: (statistics.median(v), peaks[k]) for k, v in times.items()}


def profile(fn, label: str, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"\n#### {label}: top CUDA kernels of one iteration\n```")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90))
    print("```", flush=True)


def training_flops(cases: list[str]) -> None:
    """Print the FLOPs of one fp32 training iteration (forward and backward) of torchvision's
    model and ours on each case's batch, counted by FlopCounterMode on the CPU: equal counts
    mean a GPU gap is kernels and scheduling, not arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode
    print("| case | torchvision GFLOP | ours GFLOP | ours / torchvision |")
    print("|---|---:|---:|---:|", flush=True)
    for case in cases:
        n, h, w, k = CASES[case]
        images, targets = batch(n, h, w, k)
        torch.manual_seed(0)
        tv = build_torchvision(min(h, w), max(h, w))
        ours = build_ours(tv, min(h, w), max(h, w))
        ours.set_trainable("3+")
        flops = {}
        for name, model, inputs in (("tv", tv, [im.float() / 255 for im in images]), ("ours", ours, images)):
            model.train()
            torch.manual_seed(0)  # the same ROI sampling draws, as far as the samplers share them
            with FlopCounterMode(display=False) as counter:
                sum(model(inputs, targets).values()).backward()
            flops[name] = counter.get_total_flops() / 1e9
        print(f"| {n}x{h}x{w}, {k} inst | {flops['tv']:.1f} | {flops['ours']:.1f} | {flops['ours'] / flops['tv']:.3f} |",
              flush=True)


def training_dispatch(cases: list[str], amps: list[str]) -> None:
    """Print the ATen ops one training iteration (forward and backward) dispatches, and how many
    of them make a GPU wait (:class:`harness.DispatchCounter`), for torchvision's model and
    ours, counted on the CPU after one warm-up iteration, with the top callers of ours.  Ours
    runs in the GPU's form (:func:`harness.gpu_form`), so the counts are those of a GPU
    iteration.  The large case takes minutes on a laptop's cores."""
    with gpu_form():
        _training_dispatch(cases, amps)


def _training_dispatch(cases: list[str], amps: list[str]) -> None:
    print("| case | precision | model | ops | syncing ops |")
    print("|---|---|---|---:|---:|", flush=True)
    for case in cases:
        n, h, w, k = CASES[case]
        images, targets = batch(n, h, w, k)
        models = build_models(h, w, ["ours"], device="cpu")
        for amp in amps:
            counters = {}
            for name, model in models.items():
                inputs = [im.float() / 255 for im in images] if name == "torchvision" else images
                for _ in range(2):  # the second iteration is counted: caches are warm
                    torch.manual_seed(0)
                    counters[name] = DispatchCounter()
                    with counters[name], torch.autocast("cpu", dtype=AMP[amp] or torch.float32,
                                                        enabled=AMP[amp] is not None):
                        sum(model(inputs, targets).values()).backward()
            for name, c in counters.items():
                print(f"| {n}x{h}x{w}, {k} inst | {amp} | {name} | {c.total} | {c.syncs} |", flush=True)
            top = ", ".join(f"{where} {count}" for where, count in counters["ours"].callers.most_common(8))
            print(f"\nops of ours by caller: {top}\n", flush=True)


def build_models(h: int, w: int, variants: list[str], device: str = "cuda"):
    """torchvision's model and ours converted from it (one per variant), on ``device``, training."""
    tv = build_torchvision(min(h, w), max(h, w))
    models = {"torchvision": tv}
    for v in variants:
        ours = build_ours(tv, min(h, w), max(h, w))
        ours.set_trainable("3+")  # torchvision's trainable_backbone_layers=3
        if v != "ours":
            ours.backbone.channels_last = v == "ours-nhwc"
        models[v] = ours
    return {k: m.to(device).train() for k, m in models.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="small,large")
    ap.add_argument("--amp", default="fp32,bf16")
    ap.add_argument("--cudnn-benchmark", default="on,off")
    ap.add_argument("--variants", default="ours", help="ours (the default layout), ours-nchw, ours-nhwc")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile", action="store_true",
                    help="also print each model's costliest CUDA kernels (at the last --cudnn-benchmark setting)")
    ap.add_argument("--flops", action="store_true", help="only count each case's training FLOPs (CPU, no GPU needed)")
    ap.add_argument("--dispatch", action="store_true",
                    help="only count each iteration's dispatched and syncing ops (CPU, no GPU needed)")
    ap.add_argument("--stages", action="store_true",
                    help="only time each training stage of both models (on --device), synchronised at every stage")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device of --stages (the table itself needs CUDA)")
    args = ap.parse_args(argv)
    if args.flops:
        return training_flops(args.cases.split(","))
    if args.dispatch:
        return training_dispatch(args.cases.split(","), args.amp.split(","))
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.stages:
        return training_stages(args.cases.split(","), args.amp.split(","), args.reps, args.device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, TF32 off, "
          f"{args.reps} timed iterations after {args.warmup} warm-up, interleaved, medians\n")
    print("| case | precision | cudnn.benchmark | model | s/iter | images/s | ratio to torchvision | peak MiB |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    variants = args.variants.split(",")
    counts = RoiCounts()
    for case in args.cases.split(","):
        n, h, w, k = CASES[case]
        images, targets = batch(n, h, w, k)
        models = build_models(h, w, variants)
        for amp in args.amp.split(","):
            for bench in args.cudnn_benchmark.split(","):
                torch.backends.cudnn.benchmark = bench == "on"
                fns = {name: step_fn(m, images, targets, AMP[amp], name == "torchvision", counts, name)
                       for name, m in models.items()}
                counts.clear()
                result = measure(fns, args.reps, args.warmup)
                ref = result["torchvision"][0]
                for name, (sec, peak) in result.items():
                    print(f"| {n}x{h}x{w}, {k} inst | {amp} | {bench} | {name} | {sec:.3f} | {n / sec:.1f} | "
                          f"{sec / ref:.2f} | {peak:.0f} |", flush=True)
                print(counts.report(), flush=True)
                if args.profile and bench == args.cudnn_benchmark.split(",")[-1]:
                    for name, fn in fns.items():
                        profile(fn, f"{case} {amp} {name}")
        del models
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

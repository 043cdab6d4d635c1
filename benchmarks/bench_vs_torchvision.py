"""Ours against torchvision's ``maskrcnn_resnet50_fpn`` on the same weights and the same images.

    python benchmarks/bench_vs_torchvision.py                 # inference + training, CPU
    python benchmarks/bench_vs_torchvision.py --mode infer --reps 3
    python benchmarks/bench_vs_torchvision.py --mode ablate   # what each speed idea gives
    python benchmarks/bench_vs_torchvision.py --device cuda

torchvision's model is built as its COCO weights build it (ResNet-50 with FrozenBatchNorm2d,
three trainable stages) with random weights scaled so activations stay O(1) and detections
spread over many classes; ours is converted from its state dict.  Both run in one process, in
turn (A B A B ...), after a warm-up, with the same thread count: the machine may be shared, and
the ratio of two interleaved medians is what survives noise.  Every table prints medians.

Inference: end-to-end latency at 800x1066 (from a 480x640 image) and 800x1333, with ~10 and
100 detections (the score threshold of both models is set to give them), a per-stage split,
a check that both produce the same detections, the model's FLOPs and the machine's measured
convolution throughput.  Training: seconds per iteration (forward, backward, SGD step) and
peak memory for both, batch 2, 512x512, 3 instances per image.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

import maskrcnn
import maskrcnn.model.maskrcnn as model_module
from maskrcnn import Config
from maskrcnn.model.fuse import set_bn_folding

NUM_CLASSES = 91
STAGES = ["preprocess", "backbone+FPN", "RPN head", "proposals", "box ROI align", "box head",
          "detection", "mask ROI align", "mask head", "mask paste"]


# ---------------------------------------------------------------------------- models and data
def build_torchvision(min_size: int, max_size: int, seed: int = 0) -> TorchvisionMaskRCNN:
    """torchvision's Mask R-CNN as ``maskrcnn_resnet50_fpn(weights="COCO_V1")`` builds it (frozen
    BN, layers 2-4 trainable), every parameter and BN statistic random."""
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    tv = TorchvisionMaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=NUM_CLASSES,
                             min_size=min_size, max_size=max_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Parameters and frozen-BN buffers alike: kernels ~ N(0, 1/fan_in), BN scales and
        # variances in [0.5, 1), everything else (biases, means) ~ N(0, 0.1^2).
        for name, t in tv.state_dict().items():
            if not t.is_floating_point():
                continue
            if t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            elif name.endswith("weight") or name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        tv.rpn.head.bbox_pred.weight.mul_(0.1)
        tv.roi_heads.box_predictor.bbox_pred.weight.mul_(0.1)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(5)
        tv.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(30)
        tv.roi_heads.mask_predictor.mask_fcn_logits.bias.add_(4.0)
    return tv.eval()


def build_ours(tv: TorchvisionMaskRCNN, min_size: int, max_size: int) -> maskrcnn.MaskRCNN:
    cfg = Config.preset("torchvision", num_classes=NUM_CLASSES, image_min_dim=min_size, image_max_dim=max_size)
    return maskrcnn.MaskRCNN.from_torchvision(tv.state_dict(), cfg)


def smooth_image(h: int, w: int, seed: int) -> torch.Tensor:
    """A [3, h, w] uint8 image of blobs and edges (upsampled noise): closer to a photo's
    statistics than white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 16 + 1, w // 16 + 1, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    img = img + 0.15 * torch.rand(3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).to(torch.uint8)


def set_score_threshold(tv, ours, threshold: float) -> None:
    tv.roi_heads.score_thresh = threshold
    ours.config.detection_min_confidence = threshold


def threshold_for(tv, image: torch.Tensor, count: int, device) -> float:
    """The score threshold at which torchvision keeps ``count`` detections on ``image``: halfway
    between its count-th and (count+1)-th scores at the lowest threshold (NMS is greedy in score
    order, so raising the threshold only drops the tail)."""
    tv.roi_heads.score_thresh = 1e-3
    with torch.inference_mode():
        scores = tv([image.to(device).float() / 255])[0]["scores"].cpu()
    if len(scores) <= count:
        return 1e-3
    return float(scores[count - 1] + scores[count]) / 2


# ---------------------------------------------------------------------------- timing helpers
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict, reps: int, device, warmup: int = 1) -> dict[str, list[float]]:
    """Run every function once per round, in turn, ``warmup`` + ``reps`` rounds; returns the
    timed seconds of each."""
    times = {k: [] for k in fns}
    for r in range(warmup + reps):
        for k, fn in fns.items():
            dt = timed(fn, device)
            if r >= warmup:
                times[k].append(dt)
    return times


class StageTimer:
    """Seconds per named stage, from forward hooks on modules and wrappers around functions."""

    def __init__(self, device):
        self.device = device
        self.times = defaultdict(float)
        self.active = False
        self._undo = []

    @contextmanager
    def span(self, stage: str):
        if not self.active:
            yield
            return
        sync(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.times[stage] += time.perf_counter() - t

    def wrap(self, owner, name: str, stage):
        """Time calls of ``owner.name`` (a function or bound method) as ``stage`` (a name, or a
        function of the call's arguments giving one)."""
        original = getattr(owner, name)
        had_own = name in vars(owner) if hasattr(owner, "__dict__") else False

        def wrapper(*args, **kwargs):
            with self.span(stage(*args, **kwargs) if callable(stage) else stage):
                return original(*args, **kwargs)

        setattr(owner, name, wrapper)
        self._undo.append(lambda: setattr(owner, name, original) if had_own else delattr(owner, name))

    def hook(self, module, stage: str):
        state = {}

        def pre(*_):
            if self.active:
                sync(self.device)
                state["t"] = time.perf_counter()

        def post(*_):
            if self.active and "t" in state:
                sync(self.device)
                self.times[stage] += time.perf_counter() - state.pop("t")

        self._undo.append(module.register_forward_pre_hook(pre).remove)
        self._undo.append(module.register_forward_hook(post).remove)

    def collect(self, fn) -> dict[str, float]:
        self.times.clear()
        self.active = True
        try:
            total = timed(fn, self.device)
        finally:
            self.active = False
        out = dict(self.times)
        out["total"] = total
        return out

    def remove(self):
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def instrument_torchvision(tv, timer: StageTimer) -> None:
    timer.hook(tv.transform, "preprocess")
    timer.hook(tv.backbone, "backbone+FPN")
    timer.hook(tv.rpn.head, "RPN head")
    timer.wrap(tv.rpn, "filter_proposals", "proposals")
    timer.hook(tv.rpn.anchor_generator, "proposals")
    timer.hook(tv.roi_heads.box_roi_pool, "box ROI align")
    timer.hook(tv.roi_heads.box_head, "box head")
    timer.hook(tv.roi_heads.box_predictor, "box head")
    timer.wrap(tv.roi_heads, "postprocess_detections", "detection")
    timer.hook(tv.roi_heads.mask_roi_pool, "mask ROI align")
    timer.hook(tv.roi_heads.mask_head, "mask head")
    timer.hook(tv.roi_heads.mask_predictor, "mask head")
    timer.wrap(tv.transform, "postprocess", "mask paste")


def instrument_ours(ours, timer: StageTimer) -> None:
    timer.wrap(model_module, "mold_images", "preprocess")
    timer.hook(ours.backbone, "backbone+FPN")
    timer.hook(ours.fpn, "backbone+FPN")
    timer.hook(ours.rpn, "RPN head")
    timer.wrap(ours, "anchors", "proposals")
    timer.wrap(ours, "propose", "proposals")
    pool = ours.config.pool_size
    timer.wrap(ours, "roi_features",
               lambda features, rois, size, shape: "box ROI align" if size == pool else "mask ROI align")
    timer.hook(ours.box_head, "box head")
    timer.wrap(model_module, "detect_boxes", "detection")
    timer.hook(ours.mask_head, "mask head")
    timer.wrap(ours, "unmold", "mask paste")


# ---------------------------------------------------------------------------- checks
def same_detections(ref: dict, ours) -> tuple[bool, str]:
    """ours (a Detections) against torchvision's output dict: every torchvision detection has a
    partner with the same label, boxes within 1e-2 px, scores within 1e-4; masks differ in at
    most 1e-4 of the pixels."""
    ref = {k: v.cpu() for k, v in ref.items()}
    if len(ours) != len(ref["boxes"]):
        return False, f"{len(ours)} vs {len(ref['boxes'])} detections"
    ref_masks = ref["masks"][:, 0] > 0.5
    used, mismatched = set(), 0
    for i in range(len(ref["boxes"])):
        close = ((ours.boxes - ref["boxes"][i]).abs().max(dim=1).values < 1e-2) & (ours.labels == ref["labels"][i])
        close &= (ours.scores - ref["scores"][i]).abs() < 1e-4
        j = [int(k) for k in torch.nonzero(close).flatten() if int(k) not in used]
        if not j:
            return False, f"torchvision detection {i} has no partner"
        used.add(j[0])
        mismatched += int((ours.masks[j[0]] != ref_masks[i]).sum())
    if mismatched > 1e-4 * max(ref_masks.numel(), 1):
        return False, f"{mismatched} mask pixels differ"
    return True, f"same ({len(ours)} dets, {mismatched} mask px differ)"


# ---------------------------------------------------------------------------- machine limits
def conv_throughput(device, reps: int = 5) -> float:
    """GFLOP/s of a 3x3 256->256 convolution on a 200x272 map (an FPN P2 conv), channels-last."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(1, 256, 200, 272, device=device).contiguous(memory_format=torch.channels_last)
    flops = 2 * 256 * 256 * 9 * 200 * 272
    with torch.inference_mode():
        conv(x)
        t = statistics.median(timed(lambda: conv(x), device) for _ in range(reps))
    return flops / t / 1e9


def model_flops(ours, image, device) -> tuple[float, float]:
    """(total GFLOPs, backbone+FPN GFLOPs) of one detect, counted by FlopCounterMode
    (convolutions and matrix products; roi_align, NMS and elementwise work not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        ours.detect([image])
    counts = counter.get_flop_counts()
    backbone = sum(sum(counts.get(k, {}).values()) for k in ("ResNet", "FPN"))  # top-level modules by class
    return counter.get_total_flops() / 1e9, backbone / 1e9


# ---------------------------------------------------------------------------- inference
CASES = [("480x640 -> 800x1066", (480, 640), 800, 1333, 10),
         ("480x640 -> 800x1066", (480, 640), 800, 1333, 100),
         ("800x1333", (800, 1333), 800, 1333, 10),
         ("800x1333", (800, 1333), 800, 1333, 100)]


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.0f}" if seconds >= 0.01 else f"{seconds * 1e3:8.1f}"


def bench_inference(args, device) -> list[dict]:
    tv = build_torchvision(800, 1333).to(device)
    ours = build_ours(tv, 800, 1333).to(device)
    rows = []
    print(f"\n## Inference ({device}, {torch.get_num_threads()} threads, median of {args.reps}, interleaved)\n")
    print("| image | dets | ours ms | torchvision ms | ours/tv | detections |")
    print("|---|---:|---:|---:|---:|---|")
    stage_rows = {}
    for label, (h, w), min_size, max_size, count in CASES[:args.cases]:
        image = smooth_image(h, w, seed=h + w)
        threshold = threshold_for(tv, image, count, device)
        set_score_threshold(tv, ours, threshold)
        dev_image = image.to(device)
        tv_input = lambda: [dev_image.float() / 255]

        def run_tv():
            with torch.inference_mode():
                return tv(tv_input())

        def run_ours():
            return ours.detect([dev_image])

        ok, note = same_detections(run_tv()[0], run_ours()[0])
        t = interleaved({"ours": run_ours, "tv": run_tv}, args.reps, device)
        mo, mt = statistics.median(t["ours"]), statistics.median(t["tv"])
        n = len(run_ours()[0])
        print(f"| {label} | {n} | {fmt_ms(mo)} | {fmt_ms(mt)} | {mo / mt:.2f} | {note} |", flush=True)
        rows.append(dict(case=label, dets=n, ours_s=mo, tv_s=mt, ratio=mo / mt, same=ok))
        if count == 10 or args.cases <= 1:
            stage_rows[(label, n)] = stage_split(tv, ours, run_tv, run_ours, args, device)
    for (label, n), (so, st) in stage_rows.items():
        print(f"\n### Stages, {label}, {n} detections (ms, median of {args.stage_reps})\n")
        print("| stage | ours | torchvision | ours/tv |")
        print("|---|---:|---:|---:|")
        for stage in STAGES + ["other", "total"]:
            a, b = so.get(stage, 0.0), st.get(stage, 0.0)
            ratio = f"{a / b:.2f}" if b > 1e-4 else ""
            print(f"| {stage} | {fmt_ms(a)} | {fmt_ms(b)} | {ratio} |")
    if not args.no_flops:
        image = smooth_image(480, 640, seed=1120)
        set_score_threshold(tv, ours, threshold_for(tv, image, 10, device))
        total, backbone = model_flops(ours, image.to(device), device)
        gflops = conv_throughput(device)
        fast = rows[0]["ours_s"] if rows else float("nan")
        print(f"\n### Compute: 480x640 -> 800x1066, ~10 detections\n")
        print(f"- model: {total:.0f} GFLOP per image (backbone+FPN {backbone:.0f}), convolutions and matrix products")
        print(f"- machine: {gflops:.0f} GFLOP/s on a 3x3 256->256 conv at 200x272 (channels-last, "
              f"{torch.get_num_threads()} threads)")
        print(f"- floor at that rate: {total / gflops * 1e3:.0f} ms; ours takes {fast * 1e3:.0f} ms "
              f"({total / gflops / fast:.0%} of the time is that floor)")
    return rows


def stage_split(tv, ours, run_tv, run_ours, args, device):
    timers = {"ours": StageTimer(device), "tv": StageTimer(device)}
    instrument_ours(ours, timers["ours"])
    instrument_torchvision(tv, timers["tv"])
    try:
        samples = {"ours": [], "tv": []}
        for _ in range(args.stage_reps):
            samples["ours"].append(timers["ours"].collect(run_ours))
            samples["tv"].append(timers["tv"].collect(run_tv))
    finally:
        for t in timers.values():
            t.remove()
    out = []
    for k in ("ours", "tv"):
        med = {s: statistics.median(d.get(s, 0.0) for d in samples[k]) for s in STAGES + ["total"]}
        med["other"] = max(med["total"] - sum(med[s] for s in STAGES), 0.0)
        out.append(med)
    return out


# ---------------------------------------------------------------------------- ablation
ABLATIONS = [("neither (NCHW, conv then BN)", False, False), ("channels-last only", False, True),
             ("BN folding only", True, False), ("both (default)", True, True)]


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
    t = interleaved(fns, args.reps, device)
    bfns = {"torchvision": run_tv_backbone}
    for name, m in variants.items():
        bfns[name] = (lambda m=m: torch.inference_mode()(m.features)(batch))
    tb = interleaved(bfns, args.reps, device)
    print(f"\n## Ablation: 480x640 -> 800x1066, ~10 detections ({device}, {torch.get_num_threads()} threads, "
          f"median of {args.reps}, interleaved)\n")
    print("| variant | end to end ms | / torchvision | backbone+FPN ms | / torchvision |")
    print("|---|---:|---:|---:|---:|")
    ref, bref = statistics.median(t["torchvision"]), statistics.median(tb["torchvision"])
    for name in fns:
        a, b = statistics.median(t[name]), statistics.median(tb[name])
        print(f"| {name} | {fmt_ms(a)} | {a / ref:.2f} | {fmt_ms(b)} | {b / bref:.2f} |", flush=True)
    del variants, fns, bfns
    train = training_step_fns(device, variants={name: (fold, cl) for name, fold, cl in ABLATIONS})
    del train["ours"]
    t = interleaved(train, args.train_reps, device)
    print(f"\n## Ablation: training, batch 2, 512x512 (median of {args.train_reps}, interleaved)\n")
    print("| variant | s / iteration | / torchvision |")
    print("|---|---:|---:|")
    ref = statistics.median(t["tv"])
    for name in t:
        a = statistics.median(t[name])
        print(f"| {'torchvision' if name == 'tv' else name} | {a:.3f} | {a / ref:.2f} |", flush=True)


# ---------------------------------------------------------------------------- training
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
    t = interleaved(fns, args.train_reps, device, warmup=1)
    mo, mt = statistics.median(t["ours"]), statistics.median(t["tv"])
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
          f"median of {args.train_reps}, interleaved)\n")
    print(f"| model | s / iteration | {kind} MiB |")
    print("|---|---:|---:|")
    print(f"| ours | {mo:.3f} | {mem['ours']:.0f} |")
    print(f"| torchvision | {mt:.3f} | {mem['tv']:.0f} |")
    print(f"| ours / torchvision | {mo / mt:.2f} | {mem['ours'] / mem['tv']:.2f} |")


# ---------------------------------------------------------------------------- main
def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "?"
    amx = ", AMX" if "amx_tile" in flags else ", no AMX"
    return f"{name}, {os.cpu_count()} cores, {isa}{amx}; torch {torch.__version__}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["all", "infer", "train", "ablate"], default="all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds per inference case")
    p.add_argument("--stage-reps", type=int, default=3)
    p.add_argument("--train-reps", type=int, default=5)
    p.add_argument("--cases", type=int, default=len(CASES), help="run the first N inference cases")
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--memory-child", choices=["ours", "tv"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # Full float32 on a GPU (no TF32 convolutions): the two models pick different conv algorithms,
    # and with TF32 their scores drift apart by more than the 1e-4 the detection check allows.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.memory_child:
        peak_memory_child(args.memory_child, args.device, iters=3)
        return
    where = torch.cuda.get_device_name() if device.type == "cuda" else machine()
    print(f"# maskrcnn vs torchvision {__import__('torchvision').__version__}: {where}")
    if args.mode in ("all", "infer"):
        bench_inference(args, device)
    if args.mode in ("all", "train"):
        bench_training(args, device)
    if args.mode == "ablate":
        bench_ablation(args, device)


if __name__ == "__main__":
    main()

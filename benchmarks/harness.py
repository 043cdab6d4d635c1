"""What every benchmark script shares: the models on the same weights, test images, interleaved
timing with medians, per-stage timers, the machine's description and common options.

Both models run in one process, in turn (A B A B ...), after a warm-up, with the same thread
count: the machine may be shared, and the ratio of two interleaved medians is what survives
noise.  The torchvision reference and the detection check live in tests/reference.py, shared
with the tests.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import NUM_CLASSES, TorchvisionMaskRCNN, build_torchvision, same_detections  # noqa: E402,F401

import maskrcnn  # noqa: E402
from maskrcnn import Config  # noqa: E402


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
    """Seconds per named stage, from forward hooks on modules and wrappers around functions;
    on CUDA also each stage's peak memory (MiB above what was allocated when :meth:`collect`
    began), spans nested or not."""

    def __init__(self, device):
        self.device = device
        self.times = defaultdict(float)
        self.peaks = defaultdict(float)
        self.active = False
        self._undo = []
        self._open = []  # peak bytes seen so far by each open span, innermost last
        self._base = 0

    def _cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def _begin(self) -> None:
        sync(self.device)
        if self._cuda():
            if self._open:  # the enclosing span keeps what it saw before this one resets the peak
                self._open[-1] = max(self._open[-1], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            self._open.append(0)

    def _end(self, stage: str) -> None:
        sync(self.device)
        if self._cuda() and self._open:
            peak = max(self._open.pop(), torch.cuda.max_memory_allocated())
            self.peaks[stage] = max(self.peaks[stage], (peak - self._base) / 2 ** 20)
            if self._open:
                self._open[-1] = max(self._open[-1], peak)
            torch.cuda.reset_peak_memory_stats()  # the enclosing span's later peak starts here

    @contextmanager
    def span(self, stage: str):
        if not self.active:
            yield
            return
        self._begin()
        t = time.perf_counter()
        try:
            yield
        finally:
            self._end(stage)
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
                self._begin()
                state["t"] = time.perf_counter()

        def post(*_):
            if self.active and "t" in state:
                self._end(stage)
                self.times[stage] += time.perf_counter() - state.pop("t")

        self._undo.append(module.register_forward_pre_hook(pre).remove)
        self._undo.append(module.register_forward_hook(post).remove)

    def collect(self, fn) -> dict[str, float]:
        """Seconds per stage of one call of ``fn``, and "total"; the peaks accumulate in
        :attr:`peaks` (MiB, "total" the whole call's) over calls."""
        self.times.clear()
        self._open.clear()
        if self._cuda():
            sync(self.device)
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self._open.append(0)
        self.active = True
        try:
            total = timed(fn, self.device)
        finally:
            self.active = False
        if self._cuda():
            peak = max(self._open.pop(), torch.cuda.max_memory_allocated())
            self.peaks["total"] = max(self.peaks["total"], (peak - self._base) / 2 ** 20)
        out = dict(self.times)
        out["total"] = total
        return out

    def remove(self):
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def instrument_network(name: str, model, timer: StageTimer) -> None:
    """Time the network stages that inference and training share, under the same names for
    torchvision's model (``name`` "torchvision") and ours: "backbone+FPN", "RPN head",
    "proposals", "box ROI align", "box head", "mask ROI align", "mask head".  Each benchmark
    adds its own (preprocessing, detection, targets, losses)."""
    if name == "torchvision":
        timer.hook(model.backbone, "backbone+FPN")
        timer.hook(model.rpn.head, "RPN head")
        timer.hook(model.rpn.anchor_generator, "proposals")
        timer.wrap(model.rpn, "filter_proposals", "proposals")
        heads = model.roi_heads
        for module, stage in ((heads.box_roi_pool, "box ROI align"), (heads.box_head, "box head"),
                              (heads.box_predictor, "box head"), (heads.mask_roi_pool, "mask ROI align"),
                              (heads.mask_head, "mask head"), (heads.mask_predictor, "mask head")):
            timer.hook(module, stage)
        return
    timer.hook(model.backbone, "backbone+FPN")
    timer.hook(model.fpn, "backbone+FPN")
    timer.hook(model.rpn, "RPN head")
    timer.wrap(model, "anchors", "proposals")
    timer.wrap(model, "propose", "proposals")
    pool = model.config.pool_size
    timer.wrap(model, "roi_features",
               lambda features, rois, size, shape: "box ROI align" if size == pool else "mask ROI align")
    timer.hook(model.box_head, "box head")
    timer.hook(model.mask_head, "mask head")


@contextmanager
def gpu_form():
    """Inside the block our model dispatches on a CPU what it dispatches on a GPU: ROI pooling
    by torchvision's roi_align and gathered crops (not the CPU's embedding_bag), direct
    convolutions (not Winograd), NMS within groups as one NMS of offset boxes (up to the GPU's
    limit).  For counting a GPU step's kernels and waits on a CPU (:class:`DispatchCounter`)."""
    from maskrcnn import boxes
    from maskrcnn.model import conv, roi_align

    saved = (roi_align.fast_pooling, conv.applies, boxes.offset_form)
    roi_align.fast_pooling = lambda feature: False
    conv.applies = lambda x, module: False
    boxes.offset_form = lambda b: b.numel() <= boxes.GPU_OFFSET_NMS_COORDINATES
    try:
        yield
    finally:
        roi_align.fast_pooling, conv.applies, boxes.offset_form = saved


class DispatchCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active (on a GPU, each is about one kernel launch),
    those that make a GPU wait for its queue (``SYNCING``: a result's size or value read back
    by the host), and which function of maskrcnn or torchvision issued them.  Runs on a CPU:
    the counts are the host's side of a GPU step, whose launches and waits bound its time when
    the kernels are small."""

    SYNCING = frozenset({"nonzero", "_local_scalar_dense", "item", "is_nonzero", "masked_select",
                         "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave", "equal",
                         "nms"})  # torchvision's CUDA nms reduces its overlap mask on the host
    _OURS = ("/maskrcnn/", "/torchvision/")

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.callers = Counter()
        self.sync_sites = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        frame = sys._getframe(1)
        while frame is not None and not any(p in frame.f_code.co_filename for p in self._OURS):
            frame = frame.f_back
        where = "autograd / elsewhere" if frame is None else f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
        self.callers[where] += 1
        if name in self.SYNCING or (name == "where" and len(args) == 1) or self._masked_index(name, args):
            self.sync_sites[where] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _masked_index(name: str, args) -> bool:
        """``x[mask]`` / ``x[mask] = values`` with a bool mask: the kernel finds the mask's size
        with ``nonzero``, which reads it back on the host (the dispatch shows only ``index`` or
        ``index_put_``).  Counted on a CPU run, so a mask that stays on the host in a GPU run
        (e.g. ``unmold``'s, after ``.cpu()``) counts too."""
        if name not in ("index", "index_put_", "index_put", "_index_put_impl_") or len(args) < 2:
            return False
        masks = [t for t in args[1] if t is not None and t.dtype in (torch.bool, torch.uint8)]
        if name != "index" and len(masks) == 1 and len(args) > 2 and args[2].numel() == 1 \
                and args[2].device.type == "cpu":
            return False  # ``x[mask] = number``: a masked_fill_, no read-back
        return bool(masks)

    #: Ops that launch no kernel: views, and allocations without a fill.
    NO_KERNEL = frozenset({"view", "reshape", "_reshape_alias", "_unsafe_view", "select", "slice", "narrow",
                           "unsqueeze", "squeeze", "permute", "expand", "expand_as", "view_as", "t", "transpose",
                           "unbind", "split", "split_with_sizes", "chunk", "unflatten", "flatten", "movedim",
                           "diagonal", "unfold", "as_strided", "alias", "detach", "lift_fresh", "empty",
                           "new_empty", "new_empty_strided", "empty_strided", "empty_like"})

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """The ops that launch a kernel on a GPU (about one each): all but views and allocations."""
        return sum(n for name, n in self.ops.items() if name not in self.NO_KERNEL)

    @property
    def syncs(self) -> int:
        return sum(self.sync_sites.values())


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
    (convolutions and matrix products; roi_align, NMS and elementwise work not counted), with
    direct convolutions: the model's arithmetic (FlopCounterMode does not see NNPACK's Winograd
    calls, which need fewer multiplications for the same outputs)."""
    from torch.utils.flop_counter import FlopCounterMode
    setting = ours.config.cpu_inference_conv
    ours.config.cpu_inference_conv = "direct"
    try:
        with FlopCounterMode(display=False) as counter:
            ours.detect([image])
    finally:
        ours.config.cpu_inference_conv = setting
    counts = counter.get_flop_counts()
    backbone = sum(sum(counts.get(k, {}).values()) for k in ("ResNet", "FPN"))  # top-level modules by class
    return counter.get_total_flops() / 1e9, backbone / 1e9


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.0f}" if seconds >= 0.01 else f"{seconds * 1e3:8.1f}"


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


def median(values) -> float:
    return statistics.median(values)


def parser(doc: str) -> argparse.ArgumentParser:
    """--device, --threads and --reps, the options every script takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds per case")
    return p


def setup(args) -> torch.device:
    """Apply --threads; full float32 on a GPU (no TF32: the two models pick different conv
    algorithms, and with TF32 their scores drift apart by more than the 1e-4 the detection
    check allows).  Prints the title line; returns the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else machine()
    print(f"# maskrcnn vs torchvision {__import__('torchvision').__version__}: {where}")
    return device

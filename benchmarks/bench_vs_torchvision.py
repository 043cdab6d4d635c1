"""Ours against torchvision's ``maskrcnn_resnet50_fpn``: inference, then training (``make bench``).

    python benchmarks/bench_vs_torchvision.py             # = bench_inference.py + bench_training.py
    python benchmarks/bench_vs_torchvision.py --device cuda

One script per question, all on benchmarks/harness.py:
    bench_inference.py   latency, per-stage split, FLOPs          (--reps, --cases)
    bench_training.py    seconds per iteration and peak memory    (--reps)
    bench_ablation.py    what channels-last and BN folding give   (--reps, --train-reps)
    bench_onnx.py        eager and ONNX Runtime, ours and torchvision's (--reps, --cases)
"""
from __future__ import annotations

import bench_inference
import bench_training
import harness
from harness import NUM_CLASSES, build_ours, build_torchvision, smooth_image  # noqa: F401 (bench_gpu_train)


def main(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--cases", type=int, default=len(bench_inference.CASES))
    args = p.parse_args(argv)
    args.stage_reps, args.no_flops = 3, False
    device = harness.setup(args)
    bench_inference.bench_inference(args, device)
    bench_training.bench_training(args, device)


if __name__ == "__main__":
    main()

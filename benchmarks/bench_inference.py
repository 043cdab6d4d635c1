"""Inference latency, ours against torchvision's ``maskrcnn_resnet50_fpn`` on the same weights.

    python benchmarks/bench_inference.py                  # 4 cases, stage split, FLOPs
    python benchmarks/bench_inference.py --reps 3 --cases 1

End-to-end latency at 800x1066 (from a 480x640 image) and 800x1333, with ~10 and 100
detections (the score threshold of both models is set to give them), a per-stage split, a
check that both produce the same detections, the model's FLOPs and the machine's measured
convolution throughput.  On a GPU a third column times torchvision with its results brought
to the host (masks thresholded, then ``.cpu()``), which is what ours' ``detect`` returns: the
full-size masks of 100 detections at 800x1066 are 85 MB to copy.
"""
from __future__ import annotations

import harness
import maskrcnn.model.maskrcnn as model_module
import torch
from harness import (StageTimer, build_ours, build_torchvision, conv_throughput, fmt_ms, instrument_network, interleaved,
                     median, model_flops, same_detections, set_score_threshold, smooth_image, threshold_for)

STAGES = ["preprocess", "backbone+FPN", "RPN head", "proposals", "box ROI align", "box head",
          "detection", "mask ROI align", "mask head", "mask paste"]


def instrument_torchvision(tv, timer: StageTimer) -> None:
    instrument_network("torchvision", tv, timer)
    timer.hook(tv.transform, "preprocess")
    timer.wrap(tv.roi_heads, "postprocess_detections", "detection")
    timer.wrap(tv.transform, "postprocess", "mask paste")


def instrument_ours(ours, timer: StageTimer) -> None:
    instrument_network("ours", ours, timer)
    timer.wrap(model_module, "mold_images", "preprocess")
    timer.wrap(model_module, "detect_boxes", "detection")
    timer.wrap(model_module, "unmold", "mask paste")


CASES = [("480x640 -> 800x1066", (480, 640), 800, 1333, 10),
         ("480x640 -> 800x1066", (480, 640), 800, 1333, 100),
         ("800x1333", (800, 1333), 800, 1333, 10),
         ("800x1333", (800, 1333), 800, 1333, 100)]


def bench_inference(args, device) -> list[dict]:
    tv = build_torchvision(800, 1333).to(device)
    ours = build_ours(tv, 800, 1333).to(device)
    rows = []
    print(f"\n## Inference ({device}, {torch.get_num_threads()} threads, median of {args.reps}, interleaved)\n")
    on_gpu = torch.device(device).type != "cpu"
    if on_gpu:
        # ours returns boxes and full-size masks on the host; torchvision leaves them on the GPU
        print("| image | dets | ours ms | torchvision ms | ours/tv | tv + results to host ms | ours/(tv + to host) "
              "| detections |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
    else:
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

        def run_tv_to_host():
            """torchvision as a user who wants ours' output: masks thresholded, all on the host."""
            return [{k: (v[:, 0] > 0.5 if k == "masks" else v).cpu() for k, v in r.items()} for r in run_tv()]

        ok, note = same_detections(run_tv()[0], run_ours()[0])
        fns = {"ours": run_ours, "tv": run_tv}
        if on_gpu:
            fns["tv_host"] = run_tv_to_host
        t = interleaved(fns, args.reps, device)
        mo, mt = median(t["ours"]), median(t["tv"])
        n = len(run_ours()[0])
        host = ""
        if on_gpu:
            mh = median(t["tv_host"])
            host = f" {fmt_ms(mh)} | {mo / mh:.2f} |"
        print(f"| {label} | {n} | {fmt_ms(mo)} | {fmt_ms(mt)} | {mo / mt:.2f} |{host} {note} |", flush=True)
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
              f"({total / gflops / fast:.0%} of the time is that floor; Winograd's 3x3 convolutions "
              f"({ours.config.cpu_inference_conv}) need fewer multiplications than counted)")
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
        med = {s: median(d.get(s, 0.0) for d in samples[k]) for s in STAGES + ["total"]}
        med["other"] = max(med["total"] - sum(med[s] for s in STAGES), 0.0)
        out.append(med)
    return out


def main(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--stage-reps", type=int, default=3)
    p.add_argument("--cases", type=int, default=len(CASES), help="run the first N cases")
    p.add_argument("--no-flops", action="store_true")
    args = p.parse_args(argv)
    bench_inference(args, harness.setup(args))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Time MONAI LocalNet (the reference implementation) on CPU or a CUDA GPU, for comparison with medray.

Usage (reference venv, see tools/make_fixtures.py)::

    /tmp/monai-ref/bin/python tools/bench_monai.py                                # all presets, 64^3 and 96x96x104
    /tmp/monai-ref/bin/python tools/bench_monai.py --presets seed --sizes 64 --repeats 3
    /tmp/monai-ref/bin/python tools/bench_monai.py --sizes 96x96x104 --kinds infer --threads 4
    python3 tools/bench_monai.py --device cuda:0 --sizes 192x192x208      # on a GPU

Presets (LocalNet(spatial_dims=3, in_channels=2, out_channels=3, num_channel_initial=32,
out_activation=None, out_kernel_initializer="zeros")):
    seed: extract_levels=[3]           (the paired_lung_ct tutorial network)
    full: extract_levels=[0, 1, 2, 3]  (U-Net decoder)

Kinds (batch 1, float32, on --device (default cpu), torch threads = --threads, default os.cpu_count()):
    train: model.train(); zero_grad; ddf = model(cat(moving, fixed)); warped = Warp()(moving, ddf);
           loss = GlobalMutualInformationLoss()(warped, fixed) + BendingEnergyLoss()(ddf);
           loss.backward(); Adam(lr=1e-5).step()
    infer: model.eval(); with torch.no_grad(): ddf = model(x); warped = Warp()(moving, ddf)

Each (preset, size, kind) runs in a fresh child process (so the peak RSS is its own): one warm-up
iteration, then --repeats timed iterations.  One JSON line per combination is printed on stdout:
    {"preset", "size", "kind", "median_s", "min_s", "times_s", "repeats", "threads",
     "peak_rss_mib", "params", "torch", "monai", "device", "gpu", "peak_gpu_mib", "max_allocated_mib"}
peak_rss_mib is the child's ru_maxrss (whole process, including the Python/torch baseline,
which is reported separately as baseline_rss_mib: RSS after imports and input creation,
before the model is built).
On a GPU every timed iteration ends with torch.cuda.synchronize(); peak_gpu_mib is the peak device
memory in use (total minus free, whole device, CUDA context included) sampled every millisecond
by a thread while the configuration ran, warm-up included: the measure medray bench uses, so the
two compare. max_allocated_mib is torch's own torch.cuda.max_memory_allocated() (tensors only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings

PRESETS = {"seed": [3], "full": [0, 1, 2, 3]}


def parse_size(s: str) -> tuple[int, int, int]:
    parts = [int(p) for p in s.lower().replace("^3", "").split("x")]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or any(p <= 0 or p % 8 for p in parts):
        raise argparse.ArgumentTypeError(f"size {s!r}: need N or HxWxD, each a positive multiple of 8")
    return tuple(parts)  # type: ignore[return-value]


def rss_mib_now() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class GpuMemorySampler:
    """Peak device memory in use (total - free, MiB), sampled every millisecond on a thread."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.peak = self.used()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def used(self) -> int:
        free, total = self.torch.cuda.mem_get_info(self.device)
        return total - free

    def loop(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.001)

    def finish(self) -> float:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.used())
        return self.peak / 2**20


def run_one(preset: str, size: tuple[int, int, int], kind: str, repeats: int, threads: int,
            device: str = "cpu") -> dict:
    warnings.filterwarnings("ignore")
    import torch

    import monai
    from monai.losses import BendingEnergyLoss, GlobalMutualInformationLoss
    from monai.networks.blocks import Warp
    from monai.networks.nets import LocalNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    # smooth-ish images in [0, 1]: low-res noise upsampled
    low = torch.rand((2, 1) + tuple(s // 8 for s in size), generator=g)
    imgs = torch.nn.functional.interpolate(low, size=size, mode="trilinear", align_corners=True)
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    dev = torch.device(device)
    imgs = imgs.to(dev)
    moving, fixed = imgs[0:1].contiguous(), imgs[1:2].contiguous()
    x = torch.cat([moving, fixed], dim=1)
    baseline = rss_mib_now()
    sampler = GpuMemorySampler(torch, dev) if on_gpu else None

    model = LocalNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=3,
        num_channel_initial=32,
        extract_levels=PRESETS[preset],
        out_activation=None,
        out_kernel_initializer="zeros",
    ).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    warp = Warp().to(dev)
    gmi = GlobalMutualInformationLoss().to(dev)
    bend = BendingEnergyLoss().to(dev)

    if kind == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            ddf = model(x)
            warped = warp(moving, ddf)
            loss = gmi(warped, fixed) + bend(ddf)
            loss.backward()
            opt.step()
            return loss.item()

    elif kind == "infer":
        model.eval()

        def step():
            with torch.no_grad():
                ddf = model(x)
                warped = warp(moving, ddf)
            return float(warped.sum())

    else:
        raise ValueError(kind)

    def timed():
        step()
        if on_gpu:
            torch.cuda.synchronize(dev)

    timed()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        timed()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    peak_gpu = sampler.finish() if sampler else None
    return {
        "preset": preset,
        "size": "x".join(map(str, size)),
        "kind": kind,
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "times_s": [round(t, 4) for t in times],
        "repeats": repeats,
        "threads": threads,
        "peak_rss_mib": round(peak, 1),
        "baseline_rss_mib": round(baseline, 1),
        "params": n_params,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(dev) if on_gpu else None,
        "peak_gpu_mib": round(peak_gpu, 1) if peak_gpu is not None else None,
        "max_allocated_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if on_gpu else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Time MONAI LocalNet train/inference steps on CPU or GPU.")
    ap.add_argument("--sizes", default="64,96x96x104", help="comma-separated: N (cube) or HxWxD; default 64,96x96x104")
    ap.add_argument("--presets", default="seed,full", help="comma-separated subset of: " + ",".join(PRESETS))
    ap.add_argument("--kinds", default="train,infer", help="comma-separated subset of: train,infer")
    ap.add_argument("--repeats", type=int, default=3, help="timed iterations after 1 warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default os.cpu_count())")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:  # preset|size|kind
        preset, size, kind = args.child.split("|")
        res = run_one(preset, parse_size(size), kind, args.repeats, args.threads, args.device)
        print(json.dumps(res), flush=True)
        return

    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    presets = [p for p in args.presets.split(",") if p]
    kinds = [k for k in args.kinds.split(",") if k]
    for p in presets:
        if p not in PRESETS:
            ap.error(f"unknown preset {p!r}")
    for k in kinds:
        if k not in ("train", "infer"):
            ap.error(f"unknown kind {k!r}")
    if args.device != "cpu" and not (args.device == "cuda" or (args.device.startswith("cuda:")
                                                               and args.device[5:].isdigit())):
        ap.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")

    failed = False
    for preset in presets:
        for size in sizes:
            for kind in kinds:
                spec = f"{preset}|{'x'.join(map(str, size))}|{kind}"
                cmd = [sys.executable, os.path.abspath(__file__), "--child", spec,
                       "--repeats", str(args.repeats), "--threads", str(args.threads),
                       "--device", args.device]
                r = subprocess.run(cmd, capture_output=True, text=True)
                lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
                if r.returncode != 0 or not lines:
                    failed = True
                    print(json.dumps({"preset": preset, "size": "x".join(map(str, size)), "kind": kind,
                                      "error": (r.stderr.strip().splitlines() or ["rc=%d" % r.returncode])[-1],
                                      "returncode": r.returncode}), flush=True)
                else:
                    print(lines[-1], flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

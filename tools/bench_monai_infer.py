#!/usr/bin/env python3
"""Per-case inference latency of the MONAI quickstart's pipeline on CPU, for comparison with
`medray infer` (scripts/infer-bench.sh runs both on the same cases).

Usage (reference venv, see tools/make_fixtures.py)::

    /tmp/monai-ref/bin/python tools/bench_monai_infer.py --data DIR --net 64 64 64 --preset seed

DIR is a Learn2Reg-layout folder (scans/<case>_{exp,insp}.nii.gz, lungMasks/...), as
`medray synth` writes. For every case, timed from the first file read to the last file
written, as the quickstart's inference notebook does it (one process, batch 1, float32,
torch threads = --threads, default os.cpu_count()):

    LoadImage (fixed, moving, both masks) -> ScaleIntensityRange [-1000, 500] -> [0, 1]
    (images) -> Resize to --net (trilinear images, nearest masks) -> LocalNet forward
    (eval, no_grad) -> Warp (bilinear image, nearest mask) -> DiceMetric of the masks ->
    save the registered image and the DDF as NIfTI (network grid, as the quickstart does).

LocalNet(spatial_dims=3, in_channels=2, out_channels=3, num_channel_initial=--channels,
extract_levels=[3] (seed) or [0,1,2,3] (full)), random weights (the timing does not depend
on them). The first case is a warm-up and not counted. Prints one JSON object:
    {"cases", "median_ms", "mean_ms", "times_ms", "forward_median_ms", "threads", "net",
     "preset", "channels", "torch", "monai"}
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import tempfile
import time
import warnings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--net", type=int, nargs=3, default=[64, 64, 64])
    p.add_argument("--preset", choices=["seed", "full"], default="seed")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--max-cases", type=int, default=0, help="0: every case")
    args = p.parse_args()

    warnings.filterwarnings("ignore")
    import nibabel as nib
    import numpy as np
    import torch

    import monai
    from monai.metrics import DiceMetric
    from monai.networks.blocks import Warp
    from monai.networks.nets import LocalNet
    from monai.transforms import LoadImage, Resize, ScaleIntensityRange

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LocalNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=3,
        num_channel_initial=args.channels,
        extract_levels=[3] if args.preset == "seed" else [0, 1, 2, 3],
        out_activation=None,
        out_kernel_initializer="kaiming_uniform",
    ).eval()
    load = LoadImage(image_only=True, ensure_channel_first=True)
    window = ScaleIntensityRange(a_min=-1000, a_max=500, b_min=0.0, b_max=1.0, clip=True)
    resize_img = Resize(spatial_size=args.net, mode="trilinear", align_corners=True)
    resize_lbl = Resize(spatial_size=args.net, mode="nearest")
    warp_img = Warp(mode="bilinear", padding_mode="border")
    warp_lbl = Warp(mode="nearest", padding_mode="border")
    dice = DiceMetric(include_background=True, reduction="mean")

    cases = sorted(
        os.path.basename(f)[: -len("_exp.nii.gz")]
        for f in glob.glob(os.path.join(args.data, "scans", "*_exp.nii.gz"))
    )
    if args.max_cases:
        cases = cases[: args.max_cases + 1]
    if len(cases) < 2:
        raise SystemExit(f"{args.data}: need at least 2 cases (the first is a warm-up)")
    out = tempfile.mkdtemp(prefix="monai-infer-")
    times, forwards = [], []
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        f = load(os.path.join(args.data, "scans", f"{case}_exp.nii.gz"))
        m = load(os.path.join(args.data, "scans", f"{case}_insp.nii.gz"))
        fm = load(os.path.join(args.data, "lungMasks", f"{case}_exp.nii.gz"))
        mm = load(os.path.join(args.data, "lungMasks", f"{case}_insp.nii.gz"))
        f, m = resize_img(window(f)), resize_img(window(m))
        fm, mm = resize_lbl(fm), resize_lbl(mm)
        with torch.no_grad():
            x = torch.cat([m, f], dim=0)[None].float()
            t1 = time.perf_counter()
            ddf = model(x)
            t2 = time.perf_counter()
            warped = warp_img(m[None].float(), ddf)
            warped_lbl = warp_lbl(mm[None].float(), ddf)
            dice(y_pred=(warped_lbl > 0.5).float(), y=(fm[None] > 0.5).float())
        affine = np.eye(4)
        nib.save(nib.Nifti1Image(warped[0, 0].numpy(), affine), os.path.join(out, f"{case}_img.nii.gz"))
        nib.save(
            nib.Nifti1Image(np.moveaxis(ddf[0].numpy(), 0, -1), affine),
            os.path.join(out, f"{case}_ddf.nii.gz"),
        )
        t3 = time.perf_counter()
        if i > 0:
            times.append((t3 - t0) * 1e3)
            forwards.append((t2 - t1) * 1e3)
    print(
        json.dumps(
            {
                "cases": len(times),
                "median_ms": statistics.median(times),
                "mean_ms": statistics.fmean(times),
                "times_ms": [round(t, 1) for t in times],
                "forward_median_ms": statistics.median(forwards),
                "threads": args.threads,
                "net": args.net,
                "preset": args.preset,
                "channels": args.channels,
                "torch": torch.__version__,
                "monai": monai.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()

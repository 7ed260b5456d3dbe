#!/usr/bin/env python3
"""Cross-check of medray's exported transform with SimpleITK (issue 19; outside CI).

Applies `<case>_transform_lps_mm.nii.gz` (or `medray predict --out-transform`) with ITK's
own DisplacementFieldTransform, as ANTs and Slicer would, and compares:

* the moving image resampled onto the fixed grid (linear) with medray's warped image;
* the fixed landmarks mapped by the transform with the moving landmarks: the TRE, against
  the TRE medray reports (`medray predict --json`, field `tre_mm`).

medray warps with border padding (MONAI's default); ITK clamps to the border within half a
voxel past the edge and gives the default value (0) beyond. So the image comparison is
reported twice: over every voxel, and over the voxels whose mapped point lies inside the
moving image's voxel grid (where both interpolate the same eight voxels).

Usage (a venv outside the repository):
  python3 -m venv /tmp/interop-venv && /tmp/interop-venv/bin/pip install SimpleITK numpy
  /tmp/interop-venv/bin/python scripts/interop-check.py --fixed F --moving M \
      --warped W --transform T [--keypoints K.csv] [--report predict.json]
Exit status 1 when a comparison exceeds its tolerance (--tol, relative to the fixed
image's intensity range; --tre-tol in mm).
"""

import argparse
import json
import sys

import numpy as np
import SimpleITK as sitk


def read_pairs(path):
    """6-column CSV of voxel coordinates (fixed i j k, moving i j k), optional header."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                values = [float(v) for v in line.split(",")]
            except ValueError:
                continue  # the header line
            if len(values) != 6:
                sys.exit(f"{path}: expected 6 columns, got {len(values)}")
            rows.append(values)
    a = np.array(rows, dtype=np.float64)
    return a[:, :3], a[:, 3:]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fixed", required=True)
    p.add_argument("--moving", required=True)
    p.add_argument("--warped", required=True, help="medray's warped moving image")
    p.add_argument("--transform", required=True, help="<case>_transform_lps_mm.nii.gz")
    p.add_argument("--keypoints", help="6-column CSV of voxel coordinates")
    p.add_argument("--report", help="medray predict --json output (for its tre_mm)")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--tre-tol", type=float, default=1e-3)
    args = p.parse_args()

    fixed = sitk.ReadImage(args.fixed, sitk.sitkFloat64)
    moving = sitk.ReadImage(args.moving, sitk.sitkFloat64)
    warped_medray = sitk.GetArrayFromImage(sitk.ReadImage(args.warped, sitk.sitkFloat64))
    field = sitk.ReadImage(args.transform, sitk.sitkVectorFloat64)
    print(f"SimpleITK {sitk.Version_VersionString()}")
    print(
        f"transform: {field.GetSize()} x {field.GetNumberOfComponentsPerPixel()} components, "
        f"spacing {np.round(field.GetSpacing(), 4).tolist()}, "
        f"origin (LPS) {np.round(field.GetOrigin(), 4).tolist()}"
    )
    # Same grid as the fixed image (ITK's geometry, LPS), as the file's header promises.
    for what, a, b in [
        ("size", field.GetSize(), fixed.GetSize()),
        ("spacing", field.GetSpacing(), fixed.GetSpacing()),
        ("origin", field.GetOrigin(), fixed.GetOrigin()),
        ("direction", field.GetDirection(), fixed.GetDirection()),
    ]:
        if not np.allclose(a, b, atol=1e-4):
            sys.exit(f"the transform's {what} {a} differs from the fixed image's {b}")
    disp = sitk.GetArrayFromImage(field)  # (z, y, x, 3), LPS mm
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))

    resampled = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    ours = sitk.GetArrayFromImage(resampled)

    # Where each fixed voxel's mapped point falls in the moving grid (continuous index).
    size = np.array(fixed.GetSize())
    idx = np.stack(
        np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1
    ).reshape(-1, 3)  # x fastest last: (i, j, k) in ITK order
    direction = np.array(fixed.GetDirection()).reshape(3, 3)
    points = (direction @ (idx * np.array(fixed.GetSpacing())).T).T + np.array(fixed.GetOrigin())
    disp_ijk = disp.transpose(2, 1, 0, 3).reshape(-1, 3)
    mapped = points + disp_ijk
    mdir = np.array(moving.GetDirection()).reshape(3, 3)
    cont = (np.linalg.inv(mdir) @ (mapped - np.array(moving.GetOrigin())).T).T / np.array(
        moving.GetSpacing()
    )
    msize = np.array(moving.GetSize())
    inside = np.all((cont >= 0) & (cont <= msize - 1), axis=1)
    inside = inside.reshape(tuple(size)).transpose(2, 1, 0)  # to (z, y, x)

    fixed_arr = sitk.GetArrayFromImage(fixed)
    span = float(fixed_arr.max() - fixed_arr.min()) or 1.0
    diff = np.abs(ours - warped_medray)
    max_all = float(diff.max())
    max_in = float(diff[inside].max()) if inside.any() else float("nan")
    print(
        f"displacement: max |v| {np.abs(disp).max():.3f} mm, "
        f"{inside.sum()} of {inside.size} voxels map inside the moving image"
    )
    print(
        f"warped image: max |ITK - medray| inside {max_in:.3e} "
        f"({max_in / span:.3e} of the range {span:.3g}); everywhere {max_all:.3e} "
        f"({max_all / span:.3e}; beyond half a voxel outside ITK pads 0, medray repeats the border)"
    )
    ok = max_in / span <= args.tol

    if args.keypoints:
        fk, mk = read_pairs(args.keypoints)
        tre = []
        for f, m in zip(fk, mk):
            q = np.array(transform.TransformPoint(fixed.TransformContinuousIndexToPhysicalPoint(f.tolist())))
            mp = np.array(moving.TransformContinuousIndexToPhysicalPoint(m.tolist()))
            tre.append(np.linalg.norm(q - mp))
        tre = np.array(tre)
        print(f"TRE (ITK transform): mean {tre.mean():.6f} mm over {len(tre)} landmarks")
        if args.report:
            with open(args.report, encoding="utf-8") as f:
                medray_tre = json.load(f).get("tre_mm")
            if medray_tre is None:
                sys.exit(f"{args.report}: no tre_mm")
            d = abs(tre.mean() - medray_tre)
            print(f"TRE (medray): mean {medray_tre:.6f} mm; difference {d:.3e} mm")
            ok = ok and d <= args.tre_tol
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

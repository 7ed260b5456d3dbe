#!/usr/bin/env python3
"""Registers one CT pair with a peer method for `medray bench --quality --compare-peers PYTHON`.

Methods:
  elastix  itk-elastix, the default "affine" then "bspline" parameter maps (multi-resolution,
           Mattes mutual information), as elastix users run it out of the box;
  ants     antspyx `ants.registration(type_of_transform="SyN")` (affine initialisation, then
           SyN), ANTs' default deformable registration.

The result is written as the displacement field medray scores: MONAI's backward DDF on the
fixed image's grid in voxel units (the moving image sampled at p + u(p) matches the fixed
image at p), little-endian float32, component-major (3, X, Y, Z) with Z fastest. Both peers give
their field in physical LPS millimetres (ITK's convention); it is converted to voxel steps
with the fixed image's own direction and spacing as ITK reads them, u_vox = S^-1 D^T u_mm, so
the conversion holds for any orientation.

Prints one JSON object: method, seconds (registration and field, not the file reading),
shape, versions. Needs `pip install antspyx itk-elastix` (numpy comes with them).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def to_voxel_units(field_mm_xyz3, direction, spacing):
    """(X, Y, Z, 3) physical displacement -> (3, X, Y, Z) voxel displacement."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    s = np.asarray(spacing, dtype=np.float64)
    m = np.diag(1.0 / s) @ d.T
    vox = np.einsum("ab,xyzb->axyz", m, field_mm_xyz3.astype(np.float64))
    return vox.astype("<f4")


def run_elastix(fixed_path, moving_path, threads):
    import itk

    # (elastix_registration_method's own number_of_threads argument crashes itk-elastix 0.25.)
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    fixed = itk.imread(fixed_path, itk.F)
    moving = itk.imread(moving_path, itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("affine"))
    params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    start = time.perf_counter()
    _, result = itk.elastix_registration_method(
        fixed,
        moving,
        parameter_object=params,
        log_to_console=False,
    )
    field = itk.transformix_deformation_field(moving, result)
    seconds = time.perf_counter() - start
    # itk arrays are (Z, Y, X, 3): back to index order (X, Y, Z, 3).
    arr = np.asarray(itk.array_from_image(field)).transpose(2, 1, 0, 3)
    direction = np.asarray(itk.array_from_matrix(fixed.GetDirection()))
    spacing = np.asarray(fixed.GetSpacing())
    return to_voxel_units(arr, direction, spacing), seconds, {"itk": itk.__version__}


def run_ants(fixed_path, moving_path, threads):
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants

    fixed = ants.image_read(fixed_path)
    moving = ants.image_read(moving_path)
    start = time.perf_counter()
    reg = ants.registration(fixed, moving, type_of_transform="SyN")
    with tempfile.TemporaryDirectory() as tmp:
        composed = ants.apply_transforms(
            fixed, moving, reg["fwdtransforms"], compose=os.path.join(tmp, "composed_")
        )
        field = ants.image_read(composed)
        arr = field.numpy()  # (X, Y, Z, 3), index order
    seconds = time.perf_counter() - start
    return (
        to_voxel_units(arr, fixed.direction, fixed.spacing),
        seconds,
        {"antspyx": ants.__version__},
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["elastix", "ants"], required=True)
    ap.add_argument("--fixed", required=True, help="fixed image (NIfTI)")
    ap.add_argument("--moving", required=True, help="moving image (NIfTI)")
    ap.add_argument("--out", required=True, help="where to write the float32 DDF")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    for name in (args.fixed, args.moving):
        if not os.path.isfile(name):
            sys.exit(f"quality_peers.py: {name}: no such file")
    run = run_elastix if args.method == "elastix" else run_ants
    fixed, moving, out = (os.path.abspath(p) for p in (args.fixed, args.moving, args.out))
    # transformix writes deformationField.nii into the working folder: run in a scratch one.
    home = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            ddf, seconds, versions = run(fixed, moving, args.threads)
        finally:
            os.chdir(home)
    tmp = out + ".part"
    with open(tmp, "wb") as f:
        f.write(np.ascontiguousarray(ddf).tobytes())
    os.replace(tmp, out)
    print(
        json.dumps(
            {
                "method": args.method,
                "seconds": seconds,
                "shape": list(ddf.shape[1:]),
                "versions": versions,
            }
        )
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Compare `medray predict` outputs on a GPU with MONAI's and with medray's own CPU outputs.

Used by scripts/gpu-check.sh: medray predicts the fixture pair in core/tests/fixtures/predict
with the MONAI seed weights once with --device cpu and once with --device cuda:0; this script
reads both DDFs and warped images (NIfTI, .nii or .nii.gz) and the MONAI reference
(predict_expected.safetensors, made by tools/make_fixtures.py) and prints one JSON object:

    {"ddf_vs_monai": e, "warped_vs_monai": e, "ddf_vs_cpu": e, "warped_vs_cpu": e,
     "tolerance": t, "pass": bool}

each e being max |a - b| / max |b| (relative to the largest reference value). Exit status 1 when
any exceeds --tolerance (default 1e-4), 2 on unreadable input. Needs only numpy: the NIfTI-1
and safetensors readers here are minimal (little-endian, uncompressed or gzip) on purpose, so
that no nibabel or safetensors package must travel to the GPU machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys

import numpy as np

NIFTI_DTYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8, 512: np.uint16}
SAFETENSORS_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16}


def read_nifti(path: str) -> np.ndarray:
    """The volume as (C, X, Y, Z) for a 5-D vector field, (1, X, Y, Z) for a scalar volume."""
    raw = open(path, "rb").read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 352 or struct.unpack_from("<i", raw, 0)[0] != 348:
        raise ValueError(f"{path}: not a little-endian NIfTI-1 file")
    dim = struct.unpack_from("<8h", raw, 40)
    datatype = struct.unpack_from("<h", raw, 70)[0]
    vox_offset = int(struct.unpack_from("<f", raw, 108)[0])
    slope, inter = struct.unpack_from("<2f", raw, 112)
    if datatype not in NIFTI_DTYPES:
        raise ValueError(f"{path}: NIfTI datatype {datatype} not handled")
    x, y, z = dim[1], dim[2], dim[3]
    c = dim[5] if dim[0] == 5 else 1
    n = x * y * z * c
    data = np.frombuffer(raw, dtype=NIFTI_DTYPES[datatype], count=n, offset=vox_offset).astype(np.float64)
    if slope not in (0.0, 1.0) or inter != 0.0:
        data = data * (slope if slope != 0.0 else 1.0) + inter
    # NIfTI stores x fastest: C-order (c, z, y, x), turned to (c, x, y, z).
    return data.reshape((c, z, y, x)).transpose(0, 3, 2, 1)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    raw = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        dtype = SAFETENSORS_DTYPES[meta["dtype"]]
        out[name] = np.frombuffer(raw[8 + n + start : 8 + n + end], dtype=dtype).reshape(meta["shape"]).astype(np.float64)
    return out


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.reshape(-1), want.reshape(-1)
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {got.shape} vs {want.shape}")
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--expected", required=True, help="predict_expected.safetensors (MONAI)")
    ap.add_argument("--gpu-ddf", required=True)
    ap.add_argument("--gpu-warped", required=True)
    ap.add_argument("--cpu-ddf", required=True)
    ap.add_argument("--cpu-warped", required=True)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()
    try:
        expected = read_safetensors(args.expected)
        gpu_ddf, cpu_ddf = read_nifti(args.gpu_ddf), read_nifti(args.cpu_ddf)
        gpu_warped, cpu_warped = read_nifti(args.gpu_warped), read_nifti(args.cpu_warped)
        result = {
            "ddf_vs_monai": rel_err(gpu_ddf, expected["ddf"]),
            "warped_vs_monai": rel_err(gpu_warped, expected["warped"]),
            "ddf_vs_cpu": rel_err(gpu_ddf, cpu_ddf),
            "warped_vs_cpu": rel_err(gpu_warped, cpu_warped),
            "cpu_ddf_vs_monai": rel_err(cpu_ddf, expected["ddf"]),
        }
    except (OSError, ValueError, KeyError) as e:
        print(json.dumps({"error": str(e), "pass": False}))
        sys.exit(2)
    result["tolerance"] = args.tolerance
    result["pass"] = all(v <= args.tolerance for k, v in result.items() if k != "tolerance")
    print(json.dumps(result))
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()

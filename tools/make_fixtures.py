#!/usr/bin/env python3
"""Generate the MONAI reference fixtures used by medray's Rust tests.

Run from the repository root (the venv is set up from
/work/shared/tools/monai-reference-requirements.txt: torch 2.15.0, monai 1.6.1,
nibabel 5.4.2, numpy 2.4.6, safetensors 0.8.0)::

    /tmp/monai-ref/bin/python tools/make_fixtures.py            # writes core/tests/fixtures/
    /tmp/monai-ref/bin/python tools/make_fixtures.py --out DIR  # somewhere else

Everything is deterministic (fixed seeds, torch.set_num_threads(2), CPU only);
rerunning it on the same library versions reproduces the files bit for bit.
The native PyTorch grid_sample path of monai.networks.blocks.Warp is used
(USE_COMPILED=False, the pip default).

Files (all tensors are stored with safetensors; scalars are 0-d tensors).  The
safetensors metadata holds one key, "medray_fixture", a JSON object with
generator/torch/monai versions and, for the weights files, "config" (the
LocalNet arguments) and "state_dict_order" (MONAI's key order; safetensors
itself stores keys sorted):

localnet_{seed,full}_weights.safetensors
    f32 state_dict of LocalNet(spatial_dims=3, in_channels=2, out_channels=3,
    num_channel_initial=4, extract_levels=[3] (seed) / [0,1,2,3] (full),
    out_kernel_initializer="kaiming_uniform", out_activation=None) after the
    seeded MONAI init; every BatchNorm's weight/bias/running_mean/running_var is
    then perturbed (seeded) so BN is not an identity.  num_batches_tracked is
    int64, 0-d, value 0.  Same key names/order as MONAI.

localnet_{seed,full}_forward.safetensors   (model.double(), f64)
    input (2,2,16,16,24); out_eval (eval mode); out_train (train mode, one
    forward on the same input, starting from the stored running stats);
    running_mean.<bn>, running_var.<bn>, num_batches_tracked.<bn> for every
    BN after that train forward (<bn> = state-dict prefix, e.g.
    encode_convs.0.0.adn.N).

localnet_{seed,full}_grad.safetensors      (fresh weights, f64, train mode)
    fixed, moving (2,1,16,16,24) smooth images in [0.05,0.95];
    ddf = model(cat([moving, fixed], 1)); warped = Warp()(moving, ddf);
    mi = GlobalMutualInformationLoss()(warped, fixed)  (the loss term, i.e. -MI);
    bending = BendingEnergyLoss()(ddf)  (MONAI 1.6.1 compact stencils);
    loss = mi + 1.0 * bending; grad.<param> for every named parameter after
    loss.backward(); also running_mean/var.<bn> after that forward.

adam_{seed,full}.safetensors               (fresh weights, f64, train mode)
    3 steps of torch.optim.Adam(lr=1e-3) on the same loss/fixed/moving:
    loss.0, loss.1, loss.2 (loss before each step), param.<name> after 3 steps,
    running_mean.<bn>, running_var.<bn> after the 3 train forwards.

warp.safetensors                           (f64)
    image (1,2,12,14,16), ddf (1,3,12,14,16) smooth with amplitude ~3 voxels
    (some samples fall outside), r (1,2,12,14,16);
    out_border = Warp()(image, ddf); out_zeros = Warp(padding_mode="zeros");
    grad_image, grad_ddf = d sum(out_border * r) / d(image, ddf);
    grad_image_zeros, grad_ddf_zeros = the same for out_zeros (extra);
    mask (1,1,12,14,16) binary 0/1, out_nearest = Warp("nearest", "border")(mask, ddf).

resize.safetensors                         (f64)
    input (1,1,10,12,14); trilinear_up = F.interpolate(input, (16,16,24),
    mode="trilinear", align_corners=True); trilinear_down = the same to (6,7,8);
    nearest_up = F.interpolate(input, (16,16,24), mode="nearest") (legacy);
    nearest_down = the same to (6,7,8) (extra).

predict/
    fixed.nii.gz, moving.nii.gz: float32 32x32x40, affine diag(1.5,1.5,2.0)
    plus a translation; np.asarray(nib.load(f).dataobj) is exactly the tensor
    used (no scaling, no reorientation).  fixed_mask.nii.gz, moving_mask.nii.gz:
    uint8 0/1 ellipsoids, same affine.
    predict_expected.safetensors (f32): ddf (1,3,32,32,40) from the seed
    weights in EVAL mode with input cat(moving, fixed) (no preprocessing),
    warped = Warp()(moving, ddf), mi_loss = GlobalMutualInformationLoss()(warped,
    fixed), bending_energy = BendingEnergyLoss()(ddf).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import monai

from monai.losses import BendingEnergyLoss, GlobalMutualInformationLoss
from monai.networks.blocks import Warp
from monai.networks.nets import LocalNet
from monai.utils import set_determinism

SEED = 20240611
PRESETS = {"seed": [3], "full": [0, 1, 2, 3]}


# --------------------------------------------------------------------------- helpers
def gen(offset: int) -> torch.Generator:
    """Independent, seeded generator for a given purpose (order-independent)."""
    g = torch.Generator().manual_seed(SEED + offset)
    return g


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    meta = {"generator": "tools/make_fixtures.py", "torch": torch.__version__, "monai": monai.__version__}
    meta.update(metadata or {})
    # one metadata key only: safetensors serialises the metadata map in hash order, so several keys would
    # make the header bytes differ from run to run (tensor data and its order are deterministic)
    save_file(out, str(path), metadata={"medray_fixture": json.dumps(meta)})
    os.chmod(path, 0o644)


def make_localnet(extract_levels: list[int]) -> LocalNet:
    return LocalNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=3,
        num_channel_initial=4,
        extract_levels=extract_levels,
        out_kernel_initializer="kaiming_uniform",
        out_activation=None,
    )


def bn_modules(model: nn.Module) -> list[tuple[str, nn.BatchNorm3d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in bn_modules(model):
        out[f"running_mean.{name}"] = m.running_mean
        out[f"running_var.{name}"] = m.running_var
        out[f"num_batches_tracked.{name}"] = m.num_batches_tracked
    return out


def seeded_state_dict(extract_levels: list[int], offset: int) -> dict[str, torch.Tensor]:
    """MONAI init under a fixed seed, then perturb every BN (weight/bias/running stats)."""
    torch.manual_seed(SEED + offset)
    model = make_localnet(extract_levels)
    g = gen(offset + 1)
    with torch.no_grad():
        for _, m in bn_modules(model):
            c = m.num_features
            m.weight.copy_(1.0 + 0.1 * torch.randn(c, generator=g))
            m.bias.copy_(0.1 * torch.randn(c, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(0.75 + 0.5 * torch.rand(c, generator=g))
    sd = model.state_dict()
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            assert v.dtype == torch.int64
        else:
            assert v.dtype == torch.float32, k
    return {k: v.clone() for k, v in sd.items()}


def model_from(sd: dict[str, torch.Tensor], extract_levels: list[int], dtype=torch.float64) -> LocalNet:
    model = make_localnet(extract_levels)
    model.load_state_dict(sd, strict=True)
    return model.to(dtype)


def smooth_pair(batch: int, shape: tuple[int, int, int], dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """fixed = spec §8 A, moving = spec §8 B, each batch item b shifted by 0.7*b voxels along i and 0.4*b along k."""
    i, j, k = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    fixed, moving = [], []
    for b in range(batch):
        ib, kb = i + 0.7 * b, k + 0.4 * b
        a = 0.5 + 0.45 * torch.sin(0.3 * ib + 0.2 * j) * torch.cos(0.25 * kb)
        bb = 0.5 + 0.45 * torch.sin(0.3 * (ib + 1.5) + 0.2 * j) * torch.cos(0.25 * kb - 0.3)
        fixed.append(a)
        moving.append(bb)
    f = torch.stack(fixed)[:, None].to(dtype)
    m = torch.stack(moving)[:, None].to(dtype)
    return f, m


def registration_loss(model, fixed, moving):
    ddf = model(torch.cat([moving, fixed], dim=1))
    warped = Warp()(moving, ddf)
    mi = GlobalMutualInformationLoss()(warped, fixed)
    bending = BendingEnergyLoss()(ddf)
    loss = mi + 1.0 * bending
    return loss, mi, bending, ddf, warped


# --------------------------------------------------------------------------- parts
def part_weights_forward_grad_adam(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    sds = {}
    for pi, (preset, levels) in enumerate(PRESETS.items()):
        # (a) weights
        sd = seeded_state_dict(levels, offset=100 * (pi + 1))
        sds[preset] = sd
        save(
            sd,
            out / f"localnet_{preset}_weights.safetensors",
            {
                "config": {"spatial_dims": 3, "in_channels": 2, "out_channels": 3,
                           "num_channel_initial": 4, "extract_levels": levels},
                # safetensors stores keys sorted; this is MONAI's state_dict order
                "state_dict_order": list(sd.keys()),
            },
        )

        # (b) forward: eval then train on the same input
        model = model_from(sd, levels)
        x = torch.rand((2, 2, 16, 16, 24), generator=gen(10), dtype=torch.float64)
        model.eval()
        with torch.no_grad():
            out_eval = model(x)
        model.train()
        with torch.no_grad():
            out_train = model(x)
        fw = {"input": x, "out_eval": out_eval, "out_train": out_train}
        fw.update(bn_stats(model))
        save(fw, out / f"localnet_{preset}_forward.safetensors")

        # (c) gradients
        fixed, moving = smooth_pair(2, (16, 16, 24))
        model = model_from(sd, levels).train()
        loss, mi, bending, ddf, warped = registration_loss(model, fixed, moving)
        loss.backward()
        gr = {
            "fixed": fixed,
            "moving": moving,
            "ddf": ddf,
            "warped": warped,
            "loss": loss,
            "mi": mi,
            "bending": bending,
        }
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            gr[f"grad.{name}"] = p.grad
        gr.update(bn_stats(model))
        save(gr, out / f"localnet_{preset}_grad.safetensors")

        # (d) Adam, 3 steps
        model = model_from(sd, levels).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        ad = {}
        for step in range(3):
            opt.zero_grad()
            loss, *_ = registration_loss(model, fixed, moving)
            ad[f"loss.{step}"] = loss.detach().clone()
            loss.backward()
            opt.step()
        for name, p in model.named_parameters():
            ad[f"param.{name}"] = p
        ad.update(bn_stats(model))
        save(ad, out / f"adam_{preset}.safetensors")
    return sds


def part_warp(out: Path) -> None:
    shape = (12, 14, 16)
    image = torch.rand((1, 2) + shape, generator=gen(20), dtype=torch.float64)
    r = torch.randn((1, 2) + shape, generator=gen(21), dtype=torch.float64)
    i, j, k = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    ph = torch.rand(3, 3, generator=gen(22), dtype=torch.float64) * 2 * math.pi
    ddf = torch.stack(
        [
            3.0 * torch.sin(0.35 * i + 0.25 * j + ph[c, 0]) * torch.cos(0.2 * k + ph[c, 1]) + 0.3 * torch.sin(0.5 * k + ph[c, 2])
            for c in range(3)
        ]
    )[None]
    mask = (torch.rand((1, 1) + shape, generator=gen(23), dtype=torch.float64) > 0.5).to(torch.float64)
    # a solid blob so nearest warping is easy to eyeball
    mask[0, 0, 3:9, 4:10, 5:12] = 1.0

    res = {"image": image, "ddf": ddf, "r": r, "mask": mask}
    for pad in ("border", "zeros"):
        img = image.clone().requires_grad_(True)
        d = ddf.clone().requires_grad_(True)
        o = Warp(padding_mode=pad)(img, d)
        (o * r).sum().backward()
        sfx = "" if pad == "border" else "_zeros"
        res[f"out_{pad}"] = o
        res[f"grad_image{sfx}"] = img.grad
        res[f"grad_ddf{sfx}"] = d.grad
    with torch.no_grad():
        res["out_nearest"] = Warp(mode="nearest", padding_mode="border")(mask, ddf)
    save(res, out / "warp.safetensors")


def part_resize(out: Path) -> None:
    x = torch.rand((1, 1, 10, 12, 14), generator=gen(30), dtype=torch.float64)
    res = {
        "input": x,
        "trilinear_up": F.interpolate(x, size=(16, 16, 24), mode="trilinear", align_corners=True),
        "trilinear_down": F.interpolate(x, size=(6, 7, 8), mode="trilinear", align_corners=True),
        "nearest_up": F.interpolate(x, size=(16, 16, 24), mode="nearest"),
        "nearest_down": F.interpolate(x, size=(6, 7, 8), mode="nearest"),
    }
    save(res, out / "resize.safetensors")


def _blobs(shape, centers, sigmas, amps) -> np.ndarray:
    idx = np.indices(shape, dtype=np.float64)
    v = np.zeros(shape)
    for c, s, a in zip(centers, sigmas, amps):
        r2 = sum(((idx[d] - c[d]) / s[d]) ** 2 for d in range(3))
        v += a * np.exp(-0.5 * r2)
    return v


def part_predict(out: Path, seed_sd: dict[str, torch.Tensor]) -> None:
    pdir = out / "predict"
    pdir.mkdir(parents=True, exist_ok=True)
    shape = (32, 32, 40)
    idx = np.indices(shape, dtype=np.float64)
    centers = [(12.0, 14.0, 18.0), (20.0, 18.0, 24.0), (16.0, 9.0, 12.0), (9.0, 22.0, 28.0)]
    sigmas = [(5.0, 6.0, 7.0), (4.0, 3.5, 5.0), (3.0, 3.0, 4.0), (3.5, 4.0, 4.5)]
    amps = [0.6, 0.5, 0.4, 0.35]
    shift = np.array([1.5, -1.0, 2.0])  # moving = fixed structures shifted by this many voxels
    base = 0.1 + 0.05 * np.sin(0.2 * idx[0] + 0.15 * idx[1]) * np.cos(0.1 * idx[2])
    fixed = np.clip(base + _blobs(shape, centers, sigmas, amps), 0.0, 1.0)
    mcent = [tuple(np.array(c) + shift) for c in centers]
    moving = np.clip(base + _blobs(shape, mcent, sigmas, amps), 0.0, 1.0)
    # quantise to multiples of 1/4096 (exact in f32): still smooth, and gzip compresses much better
    fixed = (np.round(fixed * 4096.0) / 4096.0).astype(np.float32)
    moving = (np.round(moving * 4096.0) / 4096.0).astype(np.float32)

    def ellipsoid(c, ax):
        return (sum(((idx[d] - c[d]) / ax[d]) ** 2 for d in range(3)) <= 1.0).astype(np.uint8)

    fixed_mask = ellipsoid((15.5, 15.5, 19.5), (9.0, 10.0, 12.0))
    moving_mask = ellipsoid((15.5 + shift[0], 15.5 + shift[1], 19.5 + shift[2]), (9.0, 10.0, 12.0))

    affine = np.array(
        [
            [1.5, 0.0, 0.0, -23.25],
            [0.0, 1.5, 0.0, -40.5],
            [0.0, 0.0, 2.0, 12.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )

    def write(arr: np.ndarray, name: str) -> None:
        img = nib.Nifti1Image(arr, affine)
        img.header.set_data_dtype(arr.dtype)
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        path = pdir / name
        nib.save(img, str(path))
        os.chmod(path, 0o644)
        back = nib.load(str(path))
        data = np.asarray(back.dataobj)
        assert data.dtype == arr.dtype and data.shape == arr.shape, (name, data.dtype, data.shape)
        assert np.array_equal(data, arr), name
        assert np.allclose(back.affine, affine), name

    write(fixed, "fixed.nii.gz")
    write(moving, "moving.nii.gz")
    write(fixed_mask, "fixed_mask.nii.gz")
    write(moving_mask, "moving_mask.nii.gz")

    model = model_from(seed_sd, PRESETS["seed"], dtype=torch.float32).eval()
    f = torch.from_numpy(fixed)[None, None]
    m = torch.from_numpy(moving)[None, None]
    with torch.no_grad():
        ddf = model(torch.cat([m, f], dim=1))
        warped = Warp()(m, ddf)
        mi = GlobalMutualInformationLoss()(warped, f)
        be = BendingEnergyLoss()(ddf)
    assert ddf.dtype == torch.float32
    save({"ddf": ddf, "warped": warped, "mi_loss": mi, "bending_energy": be}, pdir / "predict_expected.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_out = Path(__file__).resolve().parent.parent / "core" / "tests" / "fixtures"
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()

    torch.set_num_threads(2)
    set_determinism(seed=SEED)
    warnings.filterwarnings("ignore", message="monai.networks.blocks.Warp: Using PyTorch native grid_sample.")
    # monai 1.6.1 deform.py indexes with a list of slices; torch 2.15 warns but still treats it as a tuple
    # (checked: BendingEnergyLoss reproduces the spec §8 golden values).
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sds = part_weights_forward_grad_adam(out)
    part_warp(out)
    part_resize(out)
    part_predict(out, sds["seed"])

    total = 0
    for p in sorted(out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"{p.stat().st_size:>10}  {p.relative_to(out)}")
    print(f"{total:>10}  total bytes in {out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Convert a MONAI LocalNet PyTorch checkpoint (.pth) to safetensors with the same key names.

Usage (with the reference venv, see tools/make_fixtures.py)::

    /tmp/monai-ref/bin/python tools/pth_to_safetensors.py pair_lung_ct.pth pair_lung_ct.safetensors
    /tmp/monai-ref/bin/python tools/pth_to_safetensors.py ckpt.pth out.safetensors --key model

Accepted inputs:
  * a plain state_dict (``torch.save(model.state_dict(), path)``);
  * a checkpoint dict holding the state_dict under ``state_dict`` or ``model``
    (or the key given with ``--key``).

A leading ``module.`` prefix (from nn.DataParallel / DistributedDataParallel) is
stripped unless ``--keep-prefix`` is given.  Tensor names, shapes and dtypes are
kept exactly (f32 weights, int64 ``num_batches_tracked``); every tensor is made
contiguous and copied to CPU.  Entries that are not tensors are refused with an
error naming them.  The MONAI state_dict order is recorded in the safetensors
metadata under ``state_dict_order`` (safetensors stores keys sorted).

The checkpoint is loaded with ``torch.load(weights_only=True)``, so no pickled
code from the file is executed; pass ``--unsafe-pickle`` only for a trusted file
that needs full unpickling.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

CANDIDATE_KEYS = ("state_dict", "model", "model_state_dict", "net")


def find_state_dict(obj, key: str | None) -> Mapping:
    if not isinstance(obj, Mapping):
        raise SystemExit(f"error: the file holds a {type(obj).__name__}, not a state_dict or a checkpoint dict")
    if key is not None:
        if key not in obj:
            raise SystemExit(f"error: key {key!r} not in checkpoint; top-level keys: {sorted(map(str, obj))}")
        sd = obj[key]
        if not isinstance(sd, Mapping):
            raise SystemExit(f"error: checkpoint[{key!r}] is a {type(sd).__name__}, not a state_dict")
        return sd
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj  # plain state_dict
    for k in CANDIDATE_KEYS:
        if k in obj and isinstance(obj[k], Mapping):
            print(f"using checkpoint[{k!r}]", file=sys.stderr)
            return obj[k]
    return obj  # fall through: the non-tensor check below names the offending entries


def main() -> None:
    ap = argparse.ArgumentParser(description="Convert a MONAI LocalNet .pth state_dict to safetensors.")
    ap.add_argument("input", type=Path, help=".pth / .pt file")
    ap.add_argument("output", type=Path, help="output .safetensors file")
    ap.add_argument("--key", help="checkpoint key holding the state_dict (default: auto: state_dict, model, ...)")
    ap.add_argument("--keep-prefix", action="store_true", help="do not strip a leading 'module.' from names")
    ap.add_argument("--unsafe-pickle", action="store_true", help="torch.load(weights_only=False); trusted files only")
    args = ap.parse_args()

    obj = torch.load(args.input, map_location="cpu", weights_only=not args.unsafe_pickle)
    sd = find_state_dict(obj, args.key)

    bad = [f"{k!r} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SystemExit(
            "error: refusing to convert, these entries are not tensors: "
            + ", ".join(bad[:20])
            + (f" ... and {len(bad) - 20} more" if len(bad) > 20 else "")
            + "\n(pass --key to pick the sub-dict that holds the model state_dict)"
        )

    out: dict[str, torch.Tensor] = {}
    order: list[str] = []
    for k, v in sd.items():
        name = str(k)
        if not args.keep_prefix and name.startswith("module."):
            name = name[len("module."):]
        if name in out:
            raise SystemExit(f"error: duplicate key after prefix stripping: {name!r}")
        out[name] = v.detach().to("cpu").contiguous().clone()  # clone: safetensors rejects shared storage
        order.append(name)

    if not out:
        raise SystemExit("error: the state_dict is empty")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(args.output), metadata={"state_dict_order": json.dumps(order)})

    n_float = sum(v.numel() for v in out.values() if v.is_floating_point())
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in out.values()})
    print(f"wrote {args.output}: {len(out)} tensors, {n_float} floating-point elements, dtypes {dtypes}")


if __name__ == "__main__":
    main()

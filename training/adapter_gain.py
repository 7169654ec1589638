"""Bake a demo-strength gain into an adapter file, so SuTI Apply's default strength 1 is the chosen setting.

    python -m training.adapter_gain --gain 1.5 IN.safetensors OUT.safetensors

Each block adds strength × to_out(attention) to the hidden states, so scaling every output projection by G makes
strength 1 of the new file act as strength G of the old one, in every host. Choose G on validation subjects with a
network other than the judge (`benchmarks.quality --split val --judge models/filter/render_filter.safetensors`),
then measure the result on test subjects with the judge.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from suti_core.adapter import SuTIAdapter, load_adapter, save_adapter


def with_gain(adapter: SuTIAdapter, gain: float) -> SuTIAdapter:
    """`adapter` with every block's output projection (weight and bias) multiplied by `gain`, in place."""
    if not gain > 0:
        raise ValueError(f"gain {gain} must be positive (strength 0 already turns SuTI off)")
    with torch.no_grad():
        for spec in adapter.metadata.blocks:
            out = adapter.block(spec.key).to_out
            out.weight.mul_(gain)
            out.bias.mul_(gain)
    return adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--gain", type=float, required=True, help="strength of the input that strength 1 becomes")
    parser.add_argument("--overwrite", action="store_true", help="let OUT replace an existing file (never IN)")
    args = parser.parse_args()
    if args.out.resolve() == args.adapter.resolve():
        raise SystemExit(f"{args.out} is the input: write the scaled adapter to another file")
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists; pass --overwrite to replace it or choose another file")
    save_adapter(args.out, with_gain(load_adapter(args.adapter), args.gain), overwrite=args.overwrite)
    print(f"wrote {args.out}: strength 1 = strength {args.gain:g} of {args.adapter.name}")


if __name__ == "__main__":
    main()

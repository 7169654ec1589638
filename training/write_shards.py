"""Write the renderer's adapter-training examples as WebDataset shards (layout in `training/shards.py`), for
`python -m training.train_adapter --shards DIR`.

    python -m training.write_shards --out ~/.cache/suti/shards/render --samples 20000 --samples-per-shard 1000

Sample i is what SubjectDemoSampler draws with its rng seeded by (seed, i): it depends on nothing else, so a
sample does not change with the number written before it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .shards import ShardWriter
from .train_adapter import AdapterRecipe, SubjectDemoSampler, add_edit_mix_arguments


def write_renderer_shards(sampler: SubjectDemoSampler, out: Path, samples: int, per_shard: int, seed: int,
                          overwrite: bool = False) -> list[Path]:
    """Write `samples` examples of `sampler` into shards of `per_shard` under `out`; returns the shards."""
    with ShardWriter(out, per_shard, overwrite) as writer:
        for index in tqdm(range(samples), desc="samples", mininterval=10):
            sampler.rng = np.random.default_rng([seed, index])
            writer.write(sampler.examples(1)[0])
    return writer.paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = AdapterRecipe()
    parser.add_argument("--out", type=Path, required=True, help="folder for shard-000000.tar, ...")
    parser.add_argument("--samples", type=int, required=True, help="examples to write")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--demos", type=int, default=defaults.n_demos, help="demos per subject")
    add_edit_mix_arguments(parser, defaults)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("train", "val", "test"), default="train", help="whose subjects")
    parser.add_argument("--size", type=int, default=128, help="image side (the toy base's: 128)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    args = parser.parse_args()
    sampler = SubjectDemoSampler(args.demos, args.size, args.p_edit, np.random.default_rng(args.seed), args.split,
                                 p_recolor=args.p_recolor)
    try:
        paths = write_renderer_shards(sampler, args.out, args.samples, args.samples_per_shard, args.seed,
                                      args.overwrite)
    except FileExistsError as e:
        raise SystemExit(str(e)) from None
    print(f"wrote {args.samples} samples in {len(paths)} shards to {args.out}")


if __name__ == "__main__":
    main()

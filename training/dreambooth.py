"""DreamBooth expert for one subject (Ruiz et al. 2023): the baseline SuTI replaces, and SuTI's teacher.

The base (toy base file or diffusers SD1.x / SDXL folder) is fine-tuned on 3-5 demos whose captions name the
subject with an identifier ("a photo of a sks dog on the beach"), with class-prior preservation: class images
drawn by the frozen base itself (few DDIM steps, cached per class) keep "a dog" meaning any dog (eq. 2).
LoRA via peft on the attention projections by default, the whole UNet with --mode full; --mode textual-inversion
learns only the identifier row (Gal et al. 2023: UNet frozen, no class prior).

The identifier: the toy text encoder's vocabulary is closed and every word of it is trained, so no word is
rare; the one row the base never trained is `<unk>`, which "sks" (like any unknown word) maps to. CLIP has a
rare one-token "sks". In both the identifier is an existing row whose embedding the expert learns jointly
(a zero-initialised delta, Textual-Inversion style) and which the export writes as a rank-1 CLIP patch,
so the stock LoraLoader applies all of the expert (see training/expert_text.py). In the toy world every
unknown word shares that row: one toy expert per graph.

    python -m training.dreambooth --base models/toy/suti_toy_base.safetensors --subject 4653 --demos 3 \\
        --steps 1000 --out ComfyUI/models/loras/suti_expert_4653.safetensors [--mode lora|full|textual-inversion]
"""
from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from suti_core.world import DemoRenders, render_demos, subject_from_id

from .device import default_device
from .expert_base import ExpertBase, load_expert_base
from .expert_export import identifier_tensors, save_expert, unet_delta_tensors, unet_lora_tensors
from .expert_prior import PriorSettings, class_prior
from .expert_text import Conditioning
from .loop import optimise
from .toy_base import noised

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # every attention projection (diffusers' DreamBooth-LoRA)
DEFAULT_PRIOR_CACHE = Path.home() / ".cache/suti/dreambooth_priors"
MODES = ("lora", "full", "textual-inversion")
DEFAULT_LR = {"lora": 3e-3, "full": 2e-4, "textual-inversion": 5e-3}  # TI: the identifier row's own lr


@dataclass(frozen=True)
class DreamBoothRecipe:
    """How one expert is fine-tuned: `mode` lora | full | textual-inversion (the identifier row alone, at `lr`);
    `lr` None picks the mode's DEFAULT_LR."""

    steps: int = 1000
    mode: str = "lora"
    rank: int = 8
    lr: float | None = None
    identifier_lr: float = 5e-3
    prior_weight: float = 1.0
    identifier: str = "sks"
    seed: int = 0
    prior: PriorSettings = field(default_factory=PriorSettings)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")

    @property
    def full(self) -> bool:
        return self.mode == "full"

    @property
    def textual_inversion(self) -> bool:
        return self.mode == "textual-inversion"

    @property
    def uses_prior(self) -> bool:
        """Class-prior preservation: DreamBooth's, not Textual Inversion's (the UNet does not move)."""
        return not self.textual_inversion and self.prior_weight > 0


@dataclass(frozen=True)
class ExpertReport:
    """What one subject cost: optimiser steps, fine-tuning seconds (class images apart), bytes stored."""

    subject: int
    mode: str
    steps: int
    seconds: float
    prior_seconds: float  # class images drawn for this run; 0 when the class cache had them
    bytes_stored: int
    path: Path

    def line(self) -> str:
        return (f"subject {self.subject}: {self.mode} expert, {self.steps} steps, {self.seconds:.1f} s "
                f"(+{self.prior_seconds:.1f} s class images), {self.bytes_stored:,} bytes -> {self.path}")


@dataclass
class SubjectDemos:
    """The subject's demos as the expert trains on them (latents, identifier captions) and as rendered (images,
    masks, plain captions: what the apprentice's shards store)."""

    subject: int | str  # a world subject id, or a crawled cluster's id (training/data/experts.py)
    class_word: str
    latents: torch.Tensor  # (n, C, h, w)
    captions: list[str]
    renders: DemoRenders


def with_identifier(caption: str, class_word: str, identifier: str) -> str:
    """'a photo of a dog ...' -> 'a photo of a sks dog ...' (the identifier goes before the first class word)."""
    named = re.sub(rf"\b{re.escape(class_word)}\b", f"{identifier} {class_word}", caption, count=1)
    if named == caption:
        raise ValueError(f"caption {caption!r} does not name the class {class_word!r}")
    return named


def subject_demos(base: ExpertBase, subject_id: int, count: int, identifier: str, seed: int = 0) -> SubjectDemos:
    """`count` world demos of the subject at the base's image size, encoded once."""
    subject = subject_from_id(subject_id)
    if identifier.lower() == subject.shape:
        raise ValueError(f"the identifier must differ from the class word {subject.shape!r}")
    demos = render_demos(subject, count, seed, base.image_size)
    images = torch.from_numpy(demos.images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, S, S)
    with torch.no_grad():
        latents = base.encode_images(images)
    return SubjectDemos(subject_id, subject.shape, latents,
                        [with_identifier(c, subject.shape, identifier) for c in demos.captions], demos)


def make_trainable(unet: UNet2DConditionModel, recipe: DreamBoothRecipe) -> dict[str, torch.Tensor] | None:
    """peft LoRA on the attention projections (base frozen), the whole UNet with `full`, nothing for textual
    inversion; returns the base weights a full fine-tune's delta is taken against."""
    base_state = {k: v.clone() for k, v in unet.state_dict().items()} if recipe.full else None
    if recipe.textual_inversion:
        unet.requires_grad_(False)
        return None
    if recipe.full:
        unet.requires_grad_(True)
    else:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=recipe.rank, lora_alpha=recipe.rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    unet.train()
    return base_state


class DreamBoothTrainer:
    """One expert: makes the base trainable (LoRA, full or identifier row only), holds its class prior, trains
    and exports it."""

    def __init__(self, base: ExpertBase, demos: SubjectDemos, recipe: DreamBoothRecipe, prior_cache: Path):
        self.base, self.demos, self.recipe, self.steps = base, demos, recipe, 0
        self.prior_latents, self.prior_cond, self.prior_seconds = None, None, 0.0
        if recipe.uses_prior:
            start = time.perf_counter()
            latents, captions, cached = class_prior(base, demos.class_word, recipe.prior, prior_cache)  # frozen base
            self.prior_seconds = 0.0 if cached else time.perf_counter() - start
            with torch.no_grad():
                self.prior_latents, self.prior_cond = latents, base.text(captions)
        self.base_state = make_trainable(base.unet, recipe)
        lr = recipe.lr or DEFAULT_LR[recipe.mode]
        identifiers = [e.delta for e in base.text.identifiers]
        unet_params = [p for p in base.unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW([{"params": identifiers, "lr": lr}] if recipe.textual_inversion else [
            {"params": unet_params, "lr": lr}, {"params": identifiers, "lr": recipe.identifier_lr}])
        self.generator = torch.Generator().manual_seed(recipe.seed)

    def loss(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Instance + prior_weight * class-prior epsilon-MSE (eq. 2; instance only without the prior), one draw
        of t and noise per image (drawn on the CPU `generator`, then moved: every device draws alike)."""
        generator, device = generator or self.generator, self.base.device
        n, alphas = len(self.demos.latents), self.base.alphas_cumprod
        latents, cond = self.demos.latents, self.base.text(self.demos.captions)
        if self.prior_latents is not None:
            pick = torch.randint(len(self.prior_latents), (n,), generator=generator).to(device)
            latents = torch.cat([latents, self.prior_latents[pick]])  # (2n, C, h, w)
            cond = Conditioning.cat([cond, self.prior_cond[pick]])
        t = torch.randint(0, len(alphas), (len(latents),), generator=generator).to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        pred = self.base.predict_noise(noised(latents, noise, alphas[t].view(-1, 1, 1, 1)), t, cond)
        err = ((pred - noise) ** 2).mean(dim=(1, 2, 3))  # (n,) or (2n,)
        prior = self.recipe.prior_weight * err[n:].mean() if self.prior_latents is not None else 0.0
        return err[:n].mean() + prior

    def train(self) -> int:
        """Run the recipe's steps; returns the steps taken."""
        self.steps = optimise(self.loss, self.opt, self.steps, self.recipe.steps, float("inf"), lambda step: None,
                              f"expert {self.demos.subject}")
        return self.steps

    def save(self, path: Path) -> int:
        """The ComfyUI LoRA file (UNet LoRA or delta, none for TI + identifier row) with its metadata; returns
        bytes stored."""
        unet, recipe = self.base.unet, self.recipe
        tensors = ({} if recipe.textual_inversion else unet_delta_tensors(unet, self.base_state) if recipe.full
                   else unet_lora_tensors(unet, recipe.rank))
        metadata = {"subject": str(self.demos.subject), "identifier": self.recipe.identifier,
                    "class_word": self.demos.class_word, "steps": str(self.steps), "mode": self.recipe.mode,
                    "demos": str(len(self.demos.captions)),
                    "base": json.dumps({"architecture": self.base.architecture, "name": self.base.source.name})}
        if recipe.mode == "lora":
            metadata["rank"] = str(recipe.rank)
        return save_expert(path, tensors | identifier_tensors(self.base.text), metadata)


def fit_expert(base: ExpertBase, subject_id: int, n_demos: int, recipe: DreamBoothRecipe,
               prior_cache: Path = DEFAULT_PRIOR_CACHE, demo_seed: int | None = None) -> tuple[DreamBoothTrainer, float]:
    """Fine-tune one subject's expert on a freshly loaded base (it is modified in place); returns the trainer and
    the adaptation seconds (demo encoding and fine-tune, class images apart): the per-subject cost. `demo_seed`
    (default: the recipe's seed) picks the demos, so a benchmark can train on the demos its other rows see."""
    start = time.perf_counter()
    demo_seed = recipe.seed if demo_seed is None else demo_seed
    demos = subject_demos(base, subject_id, n_demos, recipe.identifier, demo_seed)
    trainer = DreamBoothTrainer(base, demos, recipe, prior_cache)
    trainer.train()
    return trainer, time.perf_counter() - start - trainer.prior_seconds


def train_expert(base_path: Path, subject_id: int, n_demos: int, recipe: DreamBoothRecipe, out: Path,
                 prior_cache: Path = DEFAULT_PRIOR_CACHE, device: torch.device | str = "cpu") -> ExpertReport:
    """Load the base on `device`, fine-tune one subject's expert, write it to `out`; the report times the fine-tune."""
    trainer, seconds = fit_expert(load_expert_base(base_path, recipe.identifier, device), subject_id, n_demos, recipe,
                                  prior_cache)
    return ExpertReport(subject_id, recipe.mode, trainer.steps, seconds, trainer.prior_seconds, trainer.save(out), out)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The expert recipe's options and the device it trains on, one set for every command that trains experts (this
    one, training.expert_shards, the experts data stage)."""
    parser.add_argument("--steps", type=int, default=DreamBoothRecipe.steps)
    parser.add_argument("--mode", choices=MODES, default=DreamBoothRecipe.mode,
                        help="what learns beside the identifier row: a UNet LoRA, the whole UNet, or nothing "
                             "(textual-inversion: the identifier row alone, no class prior)")
    parser.add_argument("--full", dest="mode", action="store_const", const="full", help="alias of --mode full")
    parser.add_argument("--rank", type=int, default=DreamBoothRecipe.rank, help="LoRA rank")
    parser.add_argument("--lr", type=float, help="learning rate (default 3e-3 LoRA, 2e-4 full, 5e-3 textual-inversion)")
    parser.add_argument("--prior-weight", type=float, default=DreamBoothRecipe.prior_weight,
                        help="weight of the class-prior preservation loss (0 turns it off; textual-inversion has none)")
    parser.add_argument("--identifier", default=DreamBoothRecipe.identifier, help="the subject's one-token name")
    parser.add_argument("--prior-cache", type=Path, default=DEFAULT_PRIOR_CACHE, help="class images, per class")
    parser.add_argument("--device", default=default_device(),
                        help="torch device of the base and its expert (default: cuda when there is one, else cpu)")


def recipe_from_args(args: argparse.Namespace, seed: int = 0) -> DreamBoothRecipe:
    """The recipe `add_recipe_arguments`' options describe."""
    return DreamBoothRecipe(steps=args.steps, mode=args.mode, rank=args.rank, lr=args.lr,
                            prior_weight=args.prior_weight, identifier=args.identifier, seed=seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="toy base .safetensors or diffusers SD1.x/SDXL folder")
    parser.add_argument("--subject", type=int, required=True, help="toy-world subject id")
    parser.add_argument("--demos", type=int, default=3, help="demo images (3-5 typical)")
    parser.add_argument("--out", type=Path, required=True, help="the expert's .safetensors (a ComfyUI LoRA)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_recipe_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        parser.exit(2, f"{args.out} exists; pass --overwrite to replace it or choose another --out\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = recipe_from_args(args, args.seed)
    print(train_expert(args.base, args.subject, args.demos, recipe, args.out, args.prior_cache, args.device).line())


if __name__ == "__main__":
    main()

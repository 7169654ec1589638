"""Quality of the embedded default on held-out subjects: subject fidelity, text fidelity, image quality.

    python -m benchmarks.quality                       # table: truth, AE reconstructions, base model (text only)
    python -m benchmarks.quality --text-fidelity 256   # the issue's done criterion: base-model text fidelity
    python -m benchmarks.quality --method mine=my_pkg.my_mod:make_method   # add a method (see `Method`)

Rows are means ± standard error over `--subjects` test-split subjects × `--prompts` contexts each, all
seeded. The base model is sampled through ComfyUI (the pack's toy-base loader + comfy.sample.sample),
so it is judged exactly as the stock KSampler would run it. Metrics: suti_core/eval/metrics.py.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from suti_core.demo_features import feature_source_of
from suti_core.eval.judge import IDENTITY_HEADS, Judge
from suti_core.eval.metrics import (DEFAULT_JUDGE, TEXT_ATTRIBUTES, copy_rate, default_judge, identity_correct,
                                    image_quality, mean_stderr, render_truth, subject_fidelity, text_fidelity)
from suti_core.eval.skills import SKILLS
from suti_core.toy.checkpoint import read_toy_base
from suti_core.world import (Context, Subject, caption_for, demo_contexts, render, render_demos, render_mask,
                             sample_context, subject_from_id, subject_ids)
from suti_core.world.context import SCALES
from suti_core.world.subjects import PATTERNS

PACK_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = PACK_ROOT / "models/toy/suti_toy_base.safetensors"
TRAINING_EXPORT = Path.home() / ".cache/suti/runs/toy_base/latest.safetensors"


@dataclass(frozen=True)
class Prompt:
    """One benchmark case: a held-out subject in a context; `caption` names only the class word and the context."""

    subject: Subject
    context: Context
    seed: int
    caption: str


# A method turns prompts into images (B, 3, 128, 128) in [-1, 1]. Subject-driven methods may take their
# demonstrations from suti_core.eval.metrics.reference_renders(prompt.subject): the same real renders
# subject fidelity compares against. A method that spends time or storage per subject says so in two attributes
# (see `adaptation_costs`): `adaptation` (subject id -> AdaptationCost, filled by its call) and `adaptation_timed`.
Method = Callable[[Sequence[Prompt]], torch.Tensor]


@dataclass(frozen=True)
class AdaptationCost:
    """What a method spent on one subject before it could draw it (the issue's adaptation time and storage):
    seconds on this process's threads, bytes stored for that subject; `cached`: made, and timed, by an earlier run."""

    seconds: float
    bytes_stored: int = 0
    cached: bool = False


NO_ADAPTATION = "nothing per subject"


def prompts_by_subject(prompts: Sequence[Prompt]) -> list[list[Prompt]]:
    """The prompts grouped by subject, in first-seen order (a subject-driven row adapts once per group)."""
    ids = dict.fromkeys(p.subject.id for p in prompts)
    return [[p for p in prompts if p.subject.id == sid] for sid in ids]


@contextmanager
def timed_calls(module, name: str) -> Iterator[list[float]]:
    """Time every call of `module.name` while inside (SuTI's one-off demo encoding runs inside the sampler, so a
    row can only see its cost from there); yields the list the seconds are appended to."""
    original, seconds = getattr(module, name), []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(module, name, timed)
    try:
        yield seconds
    finally:
        setattr(module, name, original)


BASE_ROW = "base model, text only (floor)"


def held_out_prompts(n_subjects: int, per_subject: int, seed: int, p_edit: float, split: str = "test") -> list[Prompt]:
    """`per_subject` contexts for each of `n_subjects` subjects of `split` (held out from training), from `seed`."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(subject_ids(split), n_subjects, replace=False)
    prompts = []
    for sid in ids:
        subject = subject_from_id(int(sid))
        for _ in range(per_subject):
            context, case_seed = sample_context(rng, p_edit), int(rng.integers(2**31))
            prompts.append(Prompt(subject, context, case_seed, caption_for(subject.shape, context, case_seed)))
    return prompts


def renderer_truth(prompts: Sequence[Prompt]) -> torch.Tensor:
    """The ceiling: the exact render of each (subject, context, seed)."""
    return render_truth([p.subject for p in prompts], [p.context for p in prompts], [p.seed for p in prompts])


class AutoencoderReconstruction:
    """The autoencoder's ceiling: decode(encode(truth)); no generated image can keep more identity."""

    def __init__(self, base: Path):
        self.ae = read_toy_base(base).autoencoder()

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        truth = renderer_truth(prompts)
        return torch.cat([self.ae.decode(self.ae.encode(x)) for x in truth.split(64)]).clamp(-1, 1)


def import_comfy_pack():
    """ComfyUI (CPU mode) and the pack as `comfyui_suti`, set up the way the tests do (tests/comfy_helpers.py)."""
    sys.path.insert(0, str(PACK_ROOT / "tests"))
    import comfy_helpers

    root = comfy_helpers.find_comfyui_root()
    if root is None:
        raise SystemExit(comfy_helpers.NO_COMFYUI_MESSAGE.replace("tests", "the base-model rows"))
    comfy_helpers.setup_comfyui(root)
    comfy_helpers.import_pack()
    return importlib.import_module("comfyui_suti.nodes.toy_base")


class BaseTextOnly:
    """The floor: the base model from the caption alone, sampled with ComfyUI (per-prompt seeded noise)."""

    def __init__(self, base: Path, steps: int = 20, cfg: float = 4.0, sampler: str = "euler",
                 scheduler: str = "normal", model_nodes: Sequence[str] = (), chunk: int = 32):
        model, self.clip, self.vae = import_comfy_pack().load_toy_base(base)
        self.model = through_model_nodes(model, model_nodes)
        self.steps, self.cfg, self.sampler, self.scheduler, self.chunk = steps, cfg, sampler, scheduler, chunk

    def encode(self, captions: Sequence[str]) -> list:
        """Batched CONDITIONING: one (B, T, D) cond, as CLIPTextEncode would give per caption."""
        conds = [self.clip.encode_from_tokens_scheduled(self.clip.tokenize(c))[0] for c in captions]
        pooled = torch.cat([c[1]["pooled_output"] for c in conds])
        return [[torch.cat([c[0] for c in conds]), {"pooled_output": pooled}]]

    def conditioning(self, part: Sequence[Prompt]) -> tuple[list, list]:
        """(positive, negative) CONDITIONING for a chunk of prompts: the captions and the empty prompt."""
        return self.encode([p.caption for p in part]), self.encode([""] * len(part))

    def start(self, part: Sequence[Prompt], noise: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(latent_image, denoise) the sampler starts from: an empty latent, the full schedule."""
        return torch.zeros_like(noise), 1.0

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        import comfy.sample

        out = []
        for i in tqdm(range(0, len(prompts), self.chunk), desc="base model", mininterval=10, leave=False):
            part = prompts[i: i + self.chunk]
            noise = torch.cat([torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(p.seed)) for p in part])
            with torch.inference_mode():
                positive, negative = self.conditioning(part)
                latent_image, denoise = self.start(part, noise)
                latents = comfy.sample.sample(self.model, noise, self.steps, self.cfg, self.sampler, self.scheduler,
                                              positive, negative, latent_image, denoise=denoise, disable_pbar=True,
                                              seed=part[0].seed)
                images = self.vae.decode(latents)  # (B, H, W, 3) in [0, 1]
            out.append(images.permute(0, 3, 1, 2).float() * 2 - 1)
        return torch.cat(out)


def through_model_nodes(model, specs: Sequence[str]):
    """The MODEL through ComfyUI model-patch nodes, each 'package.module:Node,input=value,...' (e.g.
    'comfy_extras.nodes_pag:PerturbedAttentionGuidance,scale=2'): every sampled row gets them, so rows stay paired."""
    for spec in specs:
        target, *items = spec.split(",")
        module, _, name = target.partition(":")
        if not (module and name) or any("=" not in item for item in items):
            raise SystemExit(f"--model-node wants package.module:Node,input=value,..., got {spec!r}")
        node = getattr(importlib.import_module(module), name, None)
        if node is None:
            raise SystemExit(f"--model-node {spec!r}: {module} has no node {name!r}")
        inputs = {key: _number_or_text(value) for key, _, value in (item.partition("=") for item in items)}
        out = node.execute(model, **inputs) if hasattr(node, "execute") else getattr(node(), node.FUNCTION)(model, **inputs)
        model = out.args[0] if hasattr(out, "args") else out[0]  # V3 NodeOutput or a V1 tuple
    return model


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


class BaseFromTruth(BaseTextOnly):
    """Diagnostic (SDEdit): the base from the prompt's exact render noised to `denoise` of the schedule, so the
    last `denoise` of the steps alone: how much identity the base itself keeps where no adapter could do better."""

    def __init__(self, base: Path, denoise: float, **sampling):
        check_denoise(denoise, "--from-truth")
        super().__init__(base, **sampling)
        self.denoise = denoise

    def start(self, part: Sequence[Prompt], noise: torch.Tensor) -> tuple[torch.Tensor, float]:
        return truth_start(self.vae, part, self.denoise)


def check_denoise(denoise: float, flag: str) -> None:
    if not 0.0 < denoise <= 1.0:
        raise SystemExit(f"{flag} {denoise}: a share of the schedule in (0, 1]")


def truth_start(vae, part: Sequence[Prompt], denoise: float) -> tuple[torch.Tensor, float]:
    """(latent_image, denoise) of an SDEdit start: each prompt's exact render, noised to `denoise` by the sampler."""
    truth = (renderer_truth(part) + 1) / 2  # (B, 3, S, S) in [0, 1]
    return vae.encode(truth.permute(0, 2, 3, 1)), denoise


DEMO_SEED = 10_000  # a subject's demos are rendered from DEMO_SEED + its id (other renders than the references)
APPLY_TO = {"cond": "cond only", "both": "cond and uncond"}
ENCODING = {"once": "once", "every": "every step"}
DEMOS_OF = ("subject", "target")


@dataclass(frozen=True)
class SuTISetting:
    """Every SuTI Apply and SuTI Demonstrations input a row can set
    (`--suti adapter=FILE,strength=1.5,apply_to=cond,masks=1`)."""

    adapter: Path | None = None
    strength: float = 1.0
    apply_to: str = "cond"          # cond (cond only) | both (cond and uncond)
    encoding: str = "once"          # once | every (step)
    features: str | None = None     # encoder | encoder+decoder; None: the adapter's own (training-free: encoder)
    masks: bool = False             # subject masks on the demos (SuTI Demonstrations' subject_masks)
    demos: int = 3
    demos_of: str = "subject"       # subject | target (diagnostic: the prompt's own render, caption and mask as every demo)
    from_truth: float | None = None  # diagnostic: start from the prompt's render noised to this share of the schedule
    start_percent: float = 0.0      # SuTI Apply's sampling range: SuTI acts from start_percent to end_percent
    end_percent: float = 1.0
    block_weights: str = ""         # SuTI Apply's per-group weights, e.g. input:1,output:1.5
    demo_size: int = 128            # SuTI Demonstrations' size: the demos are resized to it before encoding
    texture: float | None = None    # SuTI Apply's texture_transfer (None: the node's default)

    @classmethod
    def parse(cls, spec: str) -> SuTISetting:
        raw: dict[str, str] = {}
        key = ""
        for item in filter(None, spec.split(",")):
            if key == "block_weights" and "=" not in item:  # block_weights=input:1,output:1.5 goes on
                raw[key] += "," + item
                continue
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__:
                raise SystemExit(f"--suti: unknown setting {key!r}; known: {', '.join(cls.__dataclass_fields__)}")
            raw[key] = value
        convert = {"adapter": Path, "strength": float, "masks": lambda v: v in ("1", "true", "yes"), "demos": int,
                   "demo_size": int, "from_truth": float, "start_percent": float, "end_percent": float,
                   "texture": float}
        setting = cls(**{key: convert.get(key, str)(value) for key, value in raw.items()})
        if setting.apply_to not in APPLY_TO or setting.encoding not in ENCODING or setting.demos_of not in DEMOS_OF:
            raise SystemExit(f"--suti {spec!r}: apply_to is one of {list(APPLY_TO)}, encoding one of {list(ENCODING)}, "
                             f"demos_of one of {list(DEMOS_OF)}")
        return setting

    def name(self) -> str:
        what = f"adapter {self.adapter.name}" if self.adapter else "training-free"
        parts = [f"strength {self.strength:g}", APPLY_TO[self.apply_to], ENCODING[self.encoding]]
        parts += [self.features] if self.features else []
        parts += ["masks"] if self.masks else []
        parts += ["demos = the target itself"] if self.demos_of == "target" else []
        parts += [f"from the truth noised to {self.from_truth:g}"] if self.from_truth else []
        if (self.start_percent, self.end_percent) != (0.0, 1.0):
            parts += [f"percent {self.start_percent:g}-{self.end_percent:g} of the schedule"]
        parts += [f"block weights {self.block_weights}"] if self.block_weights else []
        parts += [f"demos at {self.demo_size} px"] if self.demo_size != 128 else []
        parts += [f"texture transfer {self.texture:g}"] if self.texture is not None else []
        return f"SuTI {what}, {', '.join(parts)}, {self.demos} demos"


def demo_contexts_of(subject: Subject, count: int = 3) -> list[Context]:
    """The contexts of the demos SuTI rows are shown for `subject` (the copy-rate reference for every row)."""
    return demo_contexts(count, DEMO_SEED + subject.id)


class SuTIWithDemos(BaseTextOnly):
    """SuTI through the pack's own nodes: the subject's demos (other renders than the fidelity references)
    -> SuTI Demonstrations -> SuTI Load Adapter's file -> SuTI Apply with `setting` -> the same sampler."""

    def __init__(self, base: Path, setting: SuTISetting = SuTISetting(), **sampling):
        super().__init__(base, **sampling)
        self.nodes = importlib.import_module("comfyui_suti.nodes")
        self.setting = setting
        self.adapter = None if setting.adapter is None else self.nodes.loaders.adapter_from_file(setting.adapter)
        apply = self.nodes.apply
        source = setting.features or ("encoder" if self.adapter is None else
                                      feature_source_of(self.adapter.model.metadata.block_map))
        self.features_label = apply.LABEL_OF_SOURCE[source]
        if setting.from_truth is not None:
            check_denoise(setting.from_truth, "--suti from_truth=")
        problem = self.nodes.apply.check_settings(setting.strength, setting.start_percent, setting.end_percent,
                                                  setting.block_weights, setting.texture)
        if problem:
            raise SystemExit(f"--suti {setting.name()}: {problem}")

    def start(self, part: Sequence[Prompt], noise: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Pure noise, or with `from_truth` the prompt's render noised part way (as --from-truth, with SuTI)."""
        if self.setting.from_truth is None:
            return super().start(part, noise)
        return truth_start(self.vae, part, self.setting.from_truth)

    def demos_for(self, prompt: Prompt):
        """SuTI Demonstrations of the prompt's subject (other renders than the references), or with
        `demos_of=target` the prompt's own render repeated: an upper bound on what the demos can show."""
        if self.setting.demos_of == "target":
            n, (subject, context, seed) = self.setting.demos, (prompt.subject, prompt.context, prompt.seed)
            images, captions = np.stack([render(subject, context, 128, seed)] * n), [prompt.caption] * n
            masks = np.stack([render_mask(subject, context, 128, seed)] * n)
        else:
            demos = render_demos(prompt.subject, self.setting.demos, DEMO_SEED + prompt.subject.id)
            images, captions, masks = demos.images, demos.captions, demos.masks
        node = self.nodes.demos.SuTIDemonstrations
        subject_masks = torch.from_numpy(masks).float() if self.setting.masks else None
        return node.execute(torch.from_numpy(images).float() / 255, "\n".join(captions), self.vae, self.clip,
                            self.setting.demo_size, subject_masks=subject_masks).args[0]

    @property
    def adaptation_timed(self) -> str:
        """What a SuTI row's seconds per subject are: its demo encoding, nothing trained or stored."""
        unet = "the one-off pass" if self.setting.encoding == "once" else "every step's pass"
        return f"demo encoding: SuTI Demonstrations (VAE + captions) + {unet} of the demos through the UNet (+ adapter)"

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        base_model, out, s = self.model, [], self.setting
        encoding = importlib.import_module(f"{self.nodes.__name__}.demo_encoding")
        groups = [[p] for p in prompts] if s.demos_of == "target" else prompts_by_subject(prompts)
        self.adaptation: dict[int, AdaptationCost] = {}
        for part in groups:
            start = time.perf_counter()
            demos = self.demos_for(part[0])
            seconds = time.perf_counter() - start
            self.model = self.nodes.apply.SuTIApply.execute(
                model=base_model, demos=demos, strength=s.strength, start_percent=s.start_percent,
                end_percent=s.end_percent, demo_encoding=ENCODING[s.encoding], apply_to=APPLY_TO[s.apply_to],
                demo_features=self.features_label, adapter=self.adapter, block_weights=s.block_weights,
                **({} if s.texture is None else {"texture_transfer": s.texture})).args[0]
            with timed_calls(encoding, "encode_run") as encoded:
                out.append(super().__call__(part))
            if s.strength != 0 and not encoded:
                raise RuntimeError("SuTI's demo encoding was not timed (nodes/demo_encoding.py's encode_run was not "
                                   "called): update SuTIWithDemos' timing hook in benchmarks/quality.py")
            sid = part[0].subject.id
            before = self.adaptation.get(sid, AdaptationCost(0.0)).seconds
            self.adaptation[sid] = AdaptationCost(before + seconds + sum(encoded))
        self.model = base_model
        return torch.cat(out)


def score(images: torch.Tensor, prompts: Sequence[Prompt], judge: Judge, demos: int = 3) -> dict[str, torch.Tensor]:
    """Per-sample metrics of one method's images: subject fidelity, identity per head, text fidelity per
    attribute, image quality and the copy rate against the subject's first `demos` demo contexts."""
    subjects, contexts = [p.subject for p in prompts], [p.context for p in prompts]
    scores = {"subject_fidelity": subject_fidelity(images, subjects, judge)}
    scores |= {f"identity/{h}": v for h, v in identity_correct(images, subjects, contexts, judge).items()}
    text = text_fidelity(images, contexts, [s.shape for s in subjects], judge)
    scores |= {f"text/{a}": v for a, v in text.items()}
    scores["image_l1_32"] = image_quality(images, renderer_truth(prompts))
    scores["copy"] = copy_rate(images, contexts, [demo_contexts_of(s, demos) for s in subjects], judge)
    return scores


def grouped_table(per_sample: dict[str, dict[str, torch.Tensor]], prompts: Sequence[Prompt],
                  groups: dict[str, Callable[[Prompt], bool]], cell: Callable[[dict, torch.Tensor], str]) -> str:
    """A line per method, a column per group of prompts: `cell(scores, the group's rows as a bool mask)`."""
    lines = ["| method | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for name, scores in per_sample.items():
        cells = [cell(scores, torch.tensor([test(p) for p in prompts])) for test in groups.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def skill_table(per_sample: dict[str, dict[str, torch.Tensor]], prompts: Sequence[Prompt]) -> str:
    """Subject fidelity (and identity all-right rate) per skill: the prompts that use it."""
    groups = {f"{k} (n={sum(map(f, (p.context for p in prompts)))})": (lambda p, f=f: f(p.context))
              for k, f in SKILLS.items()}

    def cell(scores: dict, rows: torch.Tensor) -> str:
        fidelity, all_right = (mean_stderr(scores[k][rows])[0] for k in ("subject_fidelity", "identity/all"))
        return f"{fidelity:.3f} / {all_right:.2f}"

    return grouped_table(per_sample, prompts, groups, cell)


def visible_accuracy(right: torch.Tensor) -> str:
    """The mean of an identity head's scores where the image shows it (NaN elsewhere), and how many those are."""
    right = right[~torch.isnan(right)]
    return f"{right.mean():.2f} (n={len(right)})" if len(right) else "n/a"


def pattern_table(per_sample: dict[str, dict[str, torch.Tensor]], prompts: Sequence[Prompt]) -> str:
    """Pattern accuracy (where the pattern shows) per true pattern and per subject size: where identity fails."""
    groups = {pattern: (lambda p, want=pattern: p.subject.pattern == want) for pattern in PATTERNS}
    groups |= {f"{scale} view": (lambda p, want=scale: p.context.scale == want) for scale in SCALES}
    return grouped_table(per_sample, prompts, groups,
                         lambda scores, rows: visible_accuracy(scores["identity/pattern"][rows]))


def colour_table(per_sample: dict[str, dict[str, torch.Tensor]], prompts: Sequence[Prompt]) -> str:
    """Primary / secondary colour accuracy on the prompts that ask a recolour (the right colour is the text's, not
    the demos') and on the rest: whether the text or the demos win where they disagree."""
    groups = {"recoloured": lambda p: p.context.recolor != "none",
              "not recoloured": lambda p: p.context.recolor == "none"}

    def cell(scores: dict, rows: torch.Tensor) -> str:
        return " / ".join(visible_accuracy(scores[f"identity/{head}"][rows]) for head in ("primary", "secondary"))

    return grouped_table(per_sample, prompts, groups, cell)


def paired_table(per_sample: dict[str, dict[str, torch.Tensor]], baseline: str, columns: Sequence[str]) -> str:
    """Each method minus `baseline` on the same prompts and noise: mean ± standard error of the paired difference."""
    lines = ["| method − base | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, scores in per_sample.items():
        if name == baseline:
            continue
        cells = []
        for c in columns:
            m, se = mean_stderr(scores[c] - per_sample[baseline][c])
            cells.append("n/a" if math.isnan(m) else f"{m:+.3f} ± {se:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_method(spec: str, base: Path, **options) -> tuple[str, Method]:
    """NAME=package.module:factory -> (NAME, factory(base=..., **the `options` its signature takes)); the factory
    returns a Method. Options: the sampling settings (steps, cfg, sampler, scheduler, model_nodes) and expert_steps, so a
    factory that samples can sample as every other row does."""
    name, _, target = spec.partition("=")
    module, _, attr = target.partition(":")
    if not (name and module and attr):
        raise SystemExit(f"--method wants NAME=package.module:factory, got {spec!r}")
    factory = getattr(importlib.import_module(module), attr)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return name, factory(base=base, **{k: v for k, v in options.items() if takes_any or k in params})


def adaptation_costs(methods: dict[str, Method], prompts: Sequence[Prompt]) -> dict[str, dict]:
    """Per method, per subject of `prompts`: seconds and bytes stored before it could draw the subject (0 for a
    method without an `adaptation` attribute: base, truth), which were from the cache, and what was timed."""
    subjects = [part[0].subject.id for part in prompts_by_subject(prompts)]
    out = {}
    for name, method in methods.items():
        costs = getattr(method, "adaptation", {})
        per = [costs.get(sid, AdaptationCost(0.0)) for sid in subjects]
        out[name] = {"subjects": subjects, "seconds": [c.seconds for c in per], "bytes": [c.bytes_stored for c in per],
                     "cached": [c.cached for c in per], "timed": getattr(method, "adaptation_timed", NO_ADAPTATION)}
    return out


def adaptation_table(costs: dict[str, dict]) -> str:
    """Seconds per subject (mean ± standard error), bytes per subject (mean) and what was timed, per method."""
    lines = ["| method | seconds per subject | bytes per subject | what is timed |", "|---|---|---|---|"]
    for name, c in costs.items():
        seconds = mean_stderr(torch.tensor(c["seconds"], dtype=torch.float64))
        cached = sum(c["cached"])
        note = c["timed"] + (f" ({cached} of {len(c['cached'])} timed by an earlier run, from the cache)" if cached else "")
        lines.append(f"| {name} | {seconds[0]:.2f} ± {seconds[1]:.2f} | {sum(c['bytes']) / len(c['bytes']):,.0f} | {note} |")
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, tuple[float, float]]], columns: Sequence[str]) -> str:
    def cell(ms: tuple[float, float]) -> str:
        return "n/a" if math.isnan(ms[0]) else f"{ms[0]:.3f} ± {ms[1]:.3f}"

    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(row[c]) for c in columns) + " |" for name, row in results.items()]
    return "\n".join(lines)


def run(methods: dict[str, Method], prompts: Sequence[Prompt], judge: Judge,
        save_images: Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per-sample scores of every method (`save_images`: also keep each method's images as a .pt file there)."""
    per_sample = {}
    for name, method in methods.items():
        start = time.time()
        images = method(prompts)
        if save_images:
            save_images.mkdir(parents=True, exist_ok=True)
            torch.save(images.half(), save_images / f"{len(per_sample):02d}.pt")
        setting = getattr(method, "setting", SuTISetting())  # SuTI rows: their demo count; others: the default
        per_sample[name] = score(images, prompts, judge, setting.demos)
        print(f"[{name}: {len(prompts)} images scored in {time.time() - start:.0f}s]", file=sys.stderr)
    return per_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE,
                        help=f"toy base file (during training: {TRAINING_EXPORT})")
    parser.add_argument("--subjects", type=int, default=30, help="held-out subjects (of --split)")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="val: choose settings on validation subjects, scored by a network that is not the judge "
                             "(--judge models/filter/render_filter.safetensors); test: measure, with the judge")
    parser.add_argument("--prompts", type=int, default=4, help="contexts per subject")
    parser.add_argument("--text-fidelity", type=int, default=0, metavar="N",
                        help="instead: base-model text fidelity on N held-out captions (one per subject)")
    parser.add_argument("--p-edit", type=float, default=0.15, help="probability of each edit skill in a context")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--model-node", action="append", default=[], metavar="package.module:Node,input=value",
                        help="pass the base MODEL through this ComfyUI model-patch node for every sampled row "
                        "(repeatable), e.g. comfy_extras.nodes_pag:PerturbedAttentionGuidance,scale=2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-base", action="store_true",
                        help="skip the base-model row (with no --suti/--adapter rows either, no ComfyUI is needed)")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the renderer-truth and autoencoder rows")
    parser.add_argument("--suti", action="append", default=[], metavar="SETTING",
                        help="add a SuTI row: comma-separated adapter=FILE, strength=S, apply_to=cond|both, "
                        "encoding=once|every, features=encoder|encoder+decoder, masks=0|1, demos=N, demo_size=PX, "
                        "demos_of=subject|target (target: a diagnostic upper bound, the prompt's own render as every "
                        "demo), start_percent=S, end_percent=E (SuTI Apply's sampling range), "
                        "block_weights=input:W,output:W (its per-group weights), texture=T (its texture_transfer; "
                        "default: the node's), from_truth=D "
                        "(diagnostic: start from the prompt's render noised to D, as --from-truth) "
                        "(default: training-free, strength 1, cond only, once, the whole schedule)")
    parser.add_argument("--from-truth", type=float, action="append", default=[], metavar="D",
                        help="add a diagnostic row: the base from each prompt's exact render noised to D of the "
                        "schedule (SDEdit; repeatable): the identity the base itself keeps over its last steps")
    parser.add_argument("--adapter", type=Path, action="append", default=[], metavar="FILE",
                        help="shorthand for --suti adapter=FILE (the node's defaults otherwise)")
    parser.add_argument("--method", action="append", default=[], metavar="NAME=module:factory",
                        help="add a row made by a factory (gets base=, the sampling settings and expert_steps if its "
                        "signature takes them); per-subject baselines: benchmarks.expert_rows:lora | full | "
                        "textual_inversion")
    parser.add_argument("--expert-steps", type=int, metavar="N",
                        help="optimiser steps of each per-subject expert (benchmarks.expert_rows; default its own)")
    parser.add_argument("--judge", type=Path, default=DEFAULT_JUDGE, help="judge weights (training.train_judge)")
    parser.add_argument("--json", type=Path, help="also write the results (means and per-sample scores) here")
    parser.add_argument("--save-images", type=Path, help="also write each row's images (fp16 .pt) to this folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.base.is_file():
        raise SystemExit(f"no toy base at {args.base}; pass --base (a training run exports {TRAINING_EXPORT})")
    start = time.time()
    n_subjects, per_subject = (args.text_fidelity, 1) if args.text_fidelity else (args.subjects, args.prompts)
    prompts = held_out_prompts(n_subjects, per_subject, args.seed, args.p_edit, args.split)
    methods: dict[str, Method] = {} if args.no_ceilings else {"renderer truth (ceiling)": renderer_truth}
    if not (args.text_fidelity or args.no_ceilings):
        methods["autoencoder reconstruction"] = AutoencoderReconstruction(args.base)
    sampling = {"steps": args.steps, "cfg": args.cfg, "sampler": args.sampler, "scheduler": args.scheduler,
                "model_nodes": args.model_node}
    if not args.no_base:
        methods[BASE_ROW] = BaseTextOnly(args.base, **sampling)
    settings = [SuTISetting.parse(spec) for spec in args.suti] + [SuTISetting(adapter=a) for a in args.adapter]
    if not args.text_fidelity and (settings or not args.no_base):  # --no-base alone: no ComfyUI row at all
        for setting in settings or [SuTISetting()]:
            if setting.name() in methods:
                raise SystemExit(f"two --suti rows would both be named {setting.name()!r} and one would hide the other: "
                                 "give their adapter files different names")
            methods[setting.name()] = SuTIWithDemos(args.base, setting, **sampling)
    for denoise in args.from_truth:
        methods[f"base from the truth noised to {denoise:g} (SDEdit)"] = BaseFromTruth(args.base, denoise, **sampling)
    options = sampling | ({"expert_steps": args.expert_steps} if args.expert_steps else {})
    methods |= dict(load_method(spec, args.base, **options) for spec in args.method)
    per_sample = run(methods, prompts, default_judge(str(args.judge)), args.save_images)
    costs = adaptation_costs(methods, prompts)
    results = {name: {k: mean_stderr(v) for k, v in scores.items()} for name, scores in per_sample.items()}
    meta = read_toy_base(args.base).metadata
    text_cols = [f"text/{a}" for a in TEXT_ATTRIBUTES]
    identity_cols = ["subject_fidelity", *(f"identity/{h}" for h in IDENTITY_HEADS), "identity/all"]
    print(f"{len(prompts)} held-out prompts ({n_subjects} {args.split}-split subjects × {per_subject}), base {args.base.name} "
          f"judged by {args.judge.name}, "
          f"(trained steps: ae {meta.get('ae_steps', '?')}, base {meta.get('base_steps', '?')}), seed {args.seed}, "
          f"p_edit {args.p_edit}, {args.sampler} {args.scheduler} {args.steps} steps, cfg {args.cfg}"
          + "".join(f", model node {spec}" for spec in args.model_node) + "\n")
    if args.text_fidelity:
        print(markdown_table(results, text_cols))
    else:
        print(markdown_table(results, [*identity_cols, "image_l1_32"]) + "\n")
        print(markdown_table(results, [*text_cols, "copy"]) + "\n")
        if BASE_ROW in per_sample:
            print(paired_table(per_sample, BASE_ROW, [*identity_cols, "text/background", "text/position",
                                                      "text/scale", "copy"]) + "\n")
        print("subject fidelity / all identity right, per skill\n" + skill_table(per_sample, prompts) + "\n")
        print("pattern accuracy per true pattern and subject size\n" + pattern_table(per_sample, prompts) + "\n")
        print("primary / secondary colour accuracy, prompts with and without a recolour\n"
              + colour_table(per_sample, prompts) + "\n")
        print(f"adaptation per subject ({torch.get_num_threads()} thread(s))\n" + adaptation_table(costs))
    if "autoencoder reconstruction" in results:
        ratio = results["autoencoder reconstruction"]["subject_fidelity"][0] / results["renderer truth (ceiling)"]["subject_fidelity"][0]
        print(f"\nsubject fidelity of AE reconstructions / renders: {ratio:.3f}")
    print(f"\nruntime {time.time() - start:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({
            "prompts": len(prompts), "base": str(args.base), "args": {k: str(v) for k, v in vars(args).items()},
            "results": results, "adaptation": costs,
            "per_sample": {name: {k: v.tolist() for k, v in scores.items()} for name, scores in per_sample.items()},
        }, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

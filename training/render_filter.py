"""The render filter of the apprenticeship recipe (issue 11): scores an expert's render of a subject in a new
context and keeps it or drops it, saying why, before the apprentice learns from it.

The filter is a network of the judge's architecture trained apart from it (`python -m training.train_judge
--role filter --seed 1`, its own seed and data draw), so the evaluation judge only measures and never chooses
the training data it later scores. A render is dropped as

- `unreadable`: the filter is unsure what the render shows (mean top probability of the checked heads is low);
- `wrong subject`: an identity head the render's context shows (shape, pattern, colours, detail) does not find
  what the subject's demos show (a soft majority over the demos);
- `wrong context`: a context head the prompt names (background, position, scale, style, accessory, state), or
  the colour head an asked recolour shows on, does not find what the prompt asks.

A head "does not find" a class when it gives it less than `min_prob`; the context is checked before the identity.

    python -m training.render_filter --report    # keep rates: truth / wrong subject / wrong context
"""
from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from suti_core.eval.judge import (CONTEXT_HEADS, EQUAL_AREA_PATTERNS, IDENTITY_HEADS, IGNORE, Judge, labels_for,
                                  load_judge)
from suti_core.eval.metrics import judge_logits, render_truth, to_tensor
from suti_core.eval.skills import SKILLS
from suti_core.world import Context, Subject, caption_for, render_demos, sample_context, subject_from_id, subject_ids
from suti_core.world.captions import parse_caption
from suti_core.world.subjects import COLOR_NAMES

from .examples import SubjectExample

DEFAULT_FILTER = Path(__file__).resolve().parents[1] / "models/filter/render_filter.safetensors"
FILTER_ROLE = "filter"
REASONS = ("keep", "unreadable", "wrong subject", "wrong context")
Expected = dict[str, tuple[tuple[str, ...], int]]  # check name -> (heads that may show it, class index)


@dataclass(frozen=True)
class AskedContext:
    """What a prompt asks for: a context, and which context heads it names (pose-free prompts name neither
    position nor scale; the unnamed fields keep Context's defaults and are not checked)."""

    context: Context
    heads: frozenset[str] = frozenset(CONTEXT_HEADS)


@dataclass(frozen=True)
class FilterDecision:
    """One render's verdict: `reason` is one of REASONS, `detail` names the heads that failed and what each saw;
    `scores` are the lowest probabilities of the expected identity / context classes and the mean confidence."""

    keep: bool
    reason: str
    detail: str
    scores: dict[str, float]


def parse_prompt(prompt: str | Context) -> AskedContext:
    """The context a world caption asks for (`suti_core.world.captions.parse_caption`) and the heads it names."""
    if isinstance(prompt, Context):
        return AskedContext(prompt)
    try:
        context, stated = parse_caption(prompt)
    except ValueError as e:
        raise ValueError(f"{e}; the filter reads such captions (or pass the Context itself)") from None
    return AskedContext(context, frozenset(h for h in CONTEXT_HEADS if h in stated))


class RenderFilter:
    """Keeps or drops renders of a subject, given its demos and the prompt the render was made for."""

    def __init__(self, network: Judge, min_prob: float = 0.1, min_confidence: float = 0.7):
        self.network, self.min_prob, self.min_confidence = network.eval(), min_prob, min_confidence

    @classmethod
    def load(cls, path: str | Path = DEFAULT_FILTER, **thresholds: float) -> RenderFilter:
        """The filter from a file `train_judge --role filter` wrote; any other judge file is refused before its
        weights are read."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"render filter {path} does not exist; train it with `python -m "
                                    f"training.train_judge --role filter --seed 1 --export {path}`")
        with safe_open(str(path), framework="pt") as f:
            role = (f.metadata() or {}).get("role")
        if role != FILTER_ROLE:
            raise ValueError(f"{path} is not a render filter (metadata role {role!r}): the evaluation judge must not "
                             "choose training data; train a filter with `python -m training.train_judge --role filter`")
        return cls(load_judge(path), **thresholds)

    def _probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{head: (N, n_classes)} softmax probabilities of the filter network (never the judge)."""
        return {h: p.softmax(dim=-1) for h, p in judge_logits(images, self.network).items()}

    @torch.no_grad()
    def decide(self, demos: Sequence[torch.Tensor], prompts: Sequence[str | Context],
               renders: torch.Tensor) -> list[FilterDecision]:
        """Per render: demos[i] (n_i, 3, S, S) of its subject, prompts[i] (caption or Context), renders[i] (3, S, S);
        images in [-1, 1]."""
        if not len(demos) == len(prompts) == len(renders):
            raise ValueError(f"{len(demos)} demo sets, {len(prompts)} prompts and {len(renders)} renders differ")
        counts = [len(d) for d in demos]
        demo_probs, render_probs = self._probs(torch.cat(list(demos))), self._probs(renders)
        starts = np.cumsum([0] + counts)
        return [self._decide_one({h: p[a:b].mean(dim=0) for h, p in demo_probs.items() if h in IDENTITY_HEADS},
                                 parse_prompt(prompt), {h: p[i] for h, p in render_probs.items()})
                for i, (a, b, prompt) in enumerate(zip(starts[:-1], starts[1:], prompts))]

    def decide_examples(self, examples: Sequence[SubjectExample]) -> list[FilterDecision]:
        """`decide` on shard examples: their demos, target caption and target image (the render to judge)."""
        return self.decide([to_tensor(list(e.demo_images)) for e in examples], [e.target_caption for e in examples],
                           to_tensor([e.target_image for e in examples]))

    def _decide_one(self, vote: dict[str, torch.Tensor], asked: AskedContext,
                    render: dict[str, torch.Tensor]) -> FilterDecision:
        """Compare one render's probabilities with the labels the demos' vote and the prompt imply. The context
        is checked first (a render in another style shows other identity cues), an asked recolour last (which
        colour head shows it depends on the subject's pattern)."""
        def seen(check: tuple[tuple[str, ...], int]) -> float:  # the best head's probability of the class
            return max(float(render[h][check[1]]) for h in check[0])

        def misses(expected: Expected) -> list[str]:
            return [name for name, check in expected.items() if seen(check) < self.min_prob]

        readings = [self._expected(s, asked, vote) for s in _subject_readings(vote, asked)]
        context, identity, recolour = min(readings, key=lambda e: sum(len(misses(d)) for d in e))
        heads = {h for heads, _ in (context | identity | recolour).values() for h in heads}
        confidence = float(torch.stack([render[h].max() for h in heads]).mean())
        scores = {"context": min(map(seen, (context | recolour).values()), default=1.0),
                  "identity": min(map(seen, identity.values()), default=1.0), "confidence": confidence}
        if confidence < self.min_confidence:
            return FilterDecision(False, "unreadable", f"mean confidence {confidence:.2f}", scores)
        for reason, expected, source in (("wrong context", context, "the prompt asks"),
                                         ("wrong subject", identity, "the demos show"),
                                         ("wrong context", recolour, "the prompt asks")):
            failed = [f"{name}: the render shows {' / '.join(_name(h, render[h]) for h in expected[name][0])}, "
                      f"{source} {_name(expected[name][0][0], expected[name][1])}" for name in misses(expected)]
            if failed:
                return FilterDecision(False, reason, "; ".join(failed), scores)
        return FilterDecision(True, "keep", "", scores)

    def _expected(self, subject: Subject, asked: AskedContext,
                  vote: dict[str, torch.Tensor]) -> tuple[Expected, Expected, Expected]:
        """(what the prompt asks, what the demos imply, the asked recolour) for a render of `subject` in the asked
        context. Identity heads count only where that context shows them and the demos agree on them; for
        stripes/checks (an unordered colour pair) either colour head may show the recolour or the other colour."""
        labels = labels_for(subject, asked.context)
        context = {h: ((h,), labels[h]) for h in CONTEXT_HEADS if h in asked.heads}
        identity = {h: ((h,), labels[h]) for h in IDENTITY_HEADS
                    if labels[h] != IGNORE and float(vote[h].max()) >= self.min_confidence}
        if asked.context.recolor == "none" or labels["primary"] == IGNORE:  # none asked, or a style hiding colour
            return context, identity, {}
        pair = ("primary", "secondary") if subject.pattern in EQUAL_AREA_PATTERNS else ("primary",)
        identity.pop("primary", None)
        if len(pair) == 2 and "secondary" in identity:
            identity["secondary"] = (pair, COLOR_NAMES.index(subject.secondary))
        return context, identity, {"recolour": (pair, COLOR_NAMES.index(asked.context.recolor))}


def _subject_readings(vote: dict[str, torch.Tensor], asked: AskedContext) -> list[Subject]:
    """The subject the demos show; for stripes/checks, whose colour pair is unordered, both orders when a recolour
    makes the order matter."""
    subject = Subject(-1, *(IDENTITY_HEADS[h][int(vote[h].argmax())] for h in IDENTITY_HEADS))
    if subject.pattern in EQUAL_AREA_PATTERNS and asked.context.recolor != "none":
        return [subject, replace(subject, primary=subject.secondary, secondary=subject.primary)]
    return [subject]


def _name(head: str, value: torch.Tensor | int) -> str:
    """A class name, with its probability when given the head's probabilities."""
    classes = (IDENTITY_HEADS | CONTEXT_HEADS)[head]
    if isinstance(value, int):
        return classes[value]
    return f"{classes[int(value.argmax())]} ({float(value.max()):.2f})"


def summarise(decisions: Sequence[FilterDecision], prompts: Sequence[str | Context]) -> dict:
    """Keep rate overall and per skill (suti_core.eval.skills, by the prompt's context) and the drop
    reasons' counts: what issue 11 reports."""
    contexts = [parse_prompt(p).context for p in prompts]
    per_skill = {}
    for skill, uses in SKILLS.items():
        kept = [d.keep for d, c in zip(decisions, contexts) if uses(c)]
        per_skill[skill] = {"n": len(kept), "keep_rate": sum(kept) / len(kept) if kept else float("nan")}
    return {"n": len(decisions), "keep_rate": sum(d.keep for d in decisions) / max(1, len(decisions)),
            "per_skill": per_skill, "drops": dict(Counter(d.reason for d in decisions if not d.keep))}


def other_context(context: Context, rng: np.random.Generator) -> Context:
    """`context` with one context attribute (a judge context head) changed to another value."""
    head = list(CONTEXT_HEADS)[int(rng.integers(len(CONTEXT_HEADS)))]
    values = [v for v in CONTEXT_HEADS[head] if v != getattr(context, head)]
    return replace(context, **{head: values[int(rng.integers(len(values)))]})


def report_cases(n: int, seed: int, p_edit: float = 0.5, demos: int = 3) -> dict:
    """`n` test-split subjects with their demos and a prompt each, and three renders per prompt: renderer truth,
    another subject of the same class in the asked context, the subject in a context one attribute off."""
    rng = np.random.default_rng(seed)
    ids = subject_ids("test")
    subjects = [subject_from_id(int(i)) for i in rng.choice(ids, n, replace=False)]
    contexts = [sample_context(rng, p_edit) for _ in subjects]
    seeds = [int(s) for s in rng.integers(0, 2**31, n)]
    others = [subject_from_id(int(rng.choice([i for i in ids if i != s.id and subject_from_id(i).shape == s.shape])))
              for s in subjects]
    wrong = [other_context(c, rng) for c in contexts]
    return {"demos": [to_tensor(list(render_demos(s, demos, s.id).images)) for s in subjects],
            "prompts": [caption_for(s, c, seed) for s, c, seed in zip(subjects, contexts, seeds)],
            "truth": render_truth(subjects, contexts, seeds), "wrong subject": render_truth(others, contexts, seeds),
            "wrong context": render_truth(subjects, wrong, seeds)}


def colour_styles(prompts: Sequence[str | Context]) -> list[bool]:
    """Which prompts ask a style that shows colour (photo, watercolor): only there can two subjects of one class
    differ in the render (outline and pixel art show the shape alone)."""
    return [parse_prompt(p).context.style in ("photo", "watercolor") for p in prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="print keep rates on held-out subjects")
    parser.add_argument("--filter", type=Path, default=DEFAULT_FILTER)
    parser.add_argument("--subjects", type=int, default=400, help="test-split subjects, one prompt each")
    parser.add_argument("--p-edit", type=float, default=0.5, help="probability of each edit skill in the prompts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.report:
        parser.error("nothing to do: pass --report")
    torch.set_num_threads(1)
    render_filter = RenderFilter.load(args.filter)
    cases = report_cases(args.subjects, args.seed, args.p_edit)
    shown = colour_styles(cases["prompts"])
    for case in ("truth", "wrong subject", "wrong context"):
        decisions = render_filter.decide(cases["demos"], cases["prompts"], cases[case])
        summary = summarise(decisions, cases["prompts"])
        kept_shown = [d.keep for d, s in zip(decisions, shown) if s]
        print(f"{case}: keep rate {summary['keep_rate']:.3f} (colour styles {sum(kept_shown) / len(kept_shown):.3f}, "
              f"n={len(kept_shown)}); drops {summary['drops']}")
        print("  keep rate per skill: " + ", ".join(f"{skill} {v['keep_rate']:.3f} (n={v['n']})"
                                                  for skill, v in summary["per_skill"].items()))


if __name__ == "__main__":
    main()

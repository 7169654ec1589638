"""A pipeline run's keep rates in one file: each stage's summary (in → kept → dropped by reason) read back from its
folder, printed one line a stage and written as one JSON list, so a closing note quotes numbers rather than logs.

    python -m training.data.report OUT/crawl OUT/cluster OUT/recaption ... --json OUT/pipeline_summary.json

A stage's `in` counts what it judges: crawled images (cluster, clip-filter, recaption), clusters (prompts, experts),
expert renders (filter) or training samples (pack); `unit` names it and `keep_rate` is kept / in.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from .common import StageSummary, write_atomic

CRAWL_FILE, SUMMARY_FILE = "synth_crawl.json", "summary.json"
UNITS = {"cluster": "images", "clip-filter": "images", "recaption": "images", "prompts": "clusters",
         "experts": "clusters", "filter": "renders", "pack": "samples"}
SUMMARY_KEYS = ("stage", "in", "kept", "dropped")


def read_summary(folder: Path) -> dict[str, Any]:
    """A stage folder's summary with its unit and keep rate; a synthetic crawl's as pages → samples and its noise."""
    if (folder / CRAWL_FILE).is_file():
        crawl = json.loads((folder / CRAWL_FILE).read_text())
        return {"stage": crawl["stage"], "pages": crawl["pages"], "samples": crawl["samples"], "noise": crawl["noise"]}
    if not (folder / SUMMARY_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {SUMMARY_FILE} (nor {CRAWL_FILE}): run its stage first, or leave "
                                "it out of the report")
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    rate = round(summary["kept"] / summary["in"], 4) if summary["in"] else None
    return {**summary, "unit": UNITS.get(summary["stage"]), "keep_rate": rate}


def summary_line(summary: dict[str, Any]) -> str:
    """The line the stage printed (StageSummary.line), with its unit and keep rate; a crawl as pages → samples."""
    if "noise" in summary:
        noise = ", ".join(f"{kind} {n}" for kind, n in sorted(summary["noise"].items(), key=lambda x: (-x[1], x[0])))
        return f"{summary['stage']}: {summary['pages']} pages → {summary['samples']} samples ({noise})"
    notes = {k: v for k, v in summary.items() if k not in SUMMARY_KEYS and k != "unit"}
    return StageSummary(f"{summary['stage']} ({summary['unit']})", summary["in"], summary["kept"],
                        Counter(summary["dropped"]), notes).line()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="stage output folders, in pipeline order")
    parser.add_argument("--json", type=Path, help="also write the summaries here as one JSON list")
    args = parser.parse_args(argv)
    try:
        summaries = [read_summary(folder) for folder in args.folders]
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    for summary in summaries:
        print(summary_line(summary))
    if args.json:
        write_atomic(args.json, json.dumps(summaries, indent=1) + "\n")


if __name__ == "__main__":
    main()

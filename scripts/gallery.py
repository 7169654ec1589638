"""README gallery: from a run's output folders (output/<workflow>/, as scripts/main.sh writes them), one contact
sheet per shipped workflow, demos first, then each saved row, into docs/gallery/<workflow>.png (under 150 KB).
A workflow that saves no demos row (suti_your_photos) gets the example demos its Load Image nodes read.

    bash scripts/main.sh workflows/api/suti_compare.json    # one workflow at a time, each into output/<workflow>/
    python -m scripts.gallery                               # every workflows/api/*.json that has an output folder

The sheet shows every PNG in the folder: run each workflow into an empty one (remove output/<workflow>/ first).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from PIL import Image

from scripts.contact_sheet import rows_by_prefix, sheet_of_rows
from scripts.make_example_demos import EXAMPLE_DEMOS_DIR

ROOT = Path(__file__).resolve().parent.parent
API_DIR = ROOT / "workflows" / "api"
MAX_BYTES = 150_000  # what the README may embed per image


def png_bytes(image: Image.Image, max_bytes: int = MAX_BYTES) -> bytes:
    """The image as PNG, palette-quantized (then halved in size) until it fits in `max_bytes`."""
    candidates = [image, image.quantize(256), image.quantize(128)]
    for candidate in candidates + [image.reduce(2).quantize(128)]:
        buffer = io.BytesIO()
        candidate.save(buffer, "PNG", optimize=True)
        if buffer.tell() <= max_bytes:
            return buffer.getvalue()
    raise ValueError(f"a {image.width}x{image.height} sheet does not fit in {max_bytes} bytes even at half size")


def gallery_rows(folder: Path, api_graph: Path) -> dict[str, list[Path]]:
    """The folder's rows (contact_sheet's), with a demos row from the graph's Load Image inputs when it has none."""
    rows = rows_by_prefix(folder)
    if not rows:
        raise FileNotFoundError(f"no ComfyUI output PNGs (PREFIX_00001_.png) in {folder}")
    if "demos" not in rows and api_graph.is_file():
        loaded = [node["inputs"]["image"] for node in json.loads(api_graph.read_text()).values()
                  if node["class_type"] == "LoadImage"]
        demos = [EXAMPLE_DEMOS_DIR / name for name in sorted(loaded) if (EXAMPLE_DEMOS_DIR / name).is_file()]
        rows = {"demos": demos, **rows} if demos else rows
    return rows


def write_gallery(outputs: Path, gallery: Path, names: list[str]) -> list[Path]:
    """docs/gallery/<name>.png for each workflow name that has PNGs in outputs/<name>/; returns the files written."""
    gallery.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        folder = outputs / name
        if not folder.is_dir():
            print(f"gallery: skipped {name}: no {folder} (run `bash scripts/main.sh workflows/api/{name}.json`)")
            continue
        path = gallery / f"{name}.png"
        path.write_bytes(png_bytes(sheet_of_rows(gallery_rows(folder, API_DIR / f"{name}.json"))))
        written.append(path)
        print(f"gallery: wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
              f"({path.stat().st_size // 1000} KB)")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflows", nargs="*", help="workflow names (default: every workflows/api/*.json)")
    parser.add_argument("--outputs", type=Path, default=ROOT / "output", help="folder holding <workflow>/ folders")
    parser.add_argument("--gallery", type=Path, default=ROOT / "docs" / "gallery", help="where the sheets go")
    args = parser.parse_args(argv)
    names = args.workflows or [path.stem for path in sorted(API_DIR.glob("*.json"))]
    return 0 if write_gallery(args.outputs, args.gallery, names) else 1


if __name__ == "__main__":
    sys.exit(main())

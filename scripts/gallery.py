"""README gallery: from a run's output folders (output/<workflow>/, as scripts/main.sh writes them), one contact
sheet per shipped workflow, demos first, then each saved row, into docs/gallery/<workflow>.png (under 150 KB).
A workflow that saves no demos row (suti_your_photos) gets the example demos its Load Image nodes read.

    bash scripts/main.sh workflows/api/suti_compare.json    # one workflow at a time, each into output/<workflow>/
    python -m scripts.gallery                               # every workflows/api/*.json that has an output folder
    python -m scripts.gallery --thumbnails                  # docs/gallery/<workflow>.png -> workflows/<workflow>.jpg

The sheet shows every PNG in the folder: run each workflow into an empty one (remove output/<workflow>/ first).
`--thumbnails` writes the template browser's card images instead (ComfyUI's front end asks for
`workflows/<workflow>.jpg` next to each template): the sheet without its labels, fitted into a square
(the card's 256 x 256 box, at twice that for sharp screens), JPEG under 40 KB.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from PIL import Image, ImageChops

from scripts.contact_sheet import SHEET_GREY, rows_by_prefix, sheet_of_rows
from scripts.make_example_demos import EXAMPLE_DEMOS_DIR

ROOT = Path(__file__).resolve().parent.parent
API_DIR = ROOT / "workflows" / "api"
MAX_BYTES = 150_000  # what the README may embed per image
LABEL_WIDTH = 110  # px of row names left of each sheet (cut off in thumbnails)
THUMBNAIL_SIZE, THUMBNAIL_MAX_BYTES = 512, 40_000  # a template card shows 256 x 256 css px, object-contain


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
        path.write_bytes(png_bytes(sheet_of_rows(gallery_rows(folder, API_DIR / f"{name}.json"), LABEL_WIDTH)))
        written.append(path)
        print(f"gallery: wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
              f"({path.stat().st_size // 1000} KB)")
    return written


def thumbnail(sheet: Image.Image, size: int = THUMBNAIL_SIZE) -> Image.Image:
    """The sheet's images (labels and empty grey cut off) fitted into a `size` square on the sheet's grey."""
    images = sheet.convert("RGB").crop((LABEL_WIDTH, 0, sheet.width, sheet.height))
    box = ImageChops.difference(images, Image.new("RGB", images.size, SHEET_GREY)).getbbox()
    images = images.crop(box) if box else images
    scale = size / max(images.size)  # up or down: the card shows it at half this size
    images = images.resize((round(images.width * scale), round(images.height * scale)), Image.Resampling.LANCZOS)
    square = Image.new("RGB", (size, size), SHEET_GREY)
    square.paste(images, ((size - images.width) // 2, (size - images.height) // 2))
    return square


def jpeg_bytes(image: Image.Image, max_bytes: int = THUMBNAIL_MAX_BYTES) -> bytes:
    """The image as JPEG at the highest quality (90 down to 40) that fits in `max_bytes`."""
    for quality in range(90, 35, -5):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality, optimize=True, progressive=True)
        if buffer.tell() <= max_bytes:
            return buffer.getvalue()
    raise ValueError(f"a {image.width}x{image.height} thumbnail does not fit in {max_bytes} bytes at quality 40")


def write_thumbnails(gallery: Path, workflows: Path, names: list[str]) -> list[Path]:
    """workflows/<name>.jpg from docs/gallery/<name>.png for each name that has a sheet; returns the files written."""
    written = []
    for name in names:
        sheet = gallery / f"{name}.png"
        if not sheet.is_file():
            print(f"thumbnails: skipped {name}: no {sheet} (build the gallery first)")
            continue
        path = workflows / f"{name}.jpg"
        path.write_bytes(jpeg_bytes(thumbnail(Image.open(sheet))))
        written.append(path)
        print(f"thumbnails: wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
              f"({path.stat().st_size // 1000} KB)")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflows", nargs="*", help="workflow names (default: every workflows/api/*.json)")
    parser.add_argument("--outputs", type=Path, default=ROOT / "output", help="folder holding <workflow>/ folders")
    parser.add_argument("--gallery", type=Path, default=ROOT / "docs" / "gallery", help="where the sheets go")
    parser.add_argument("--thumbnails", action="store_true",
                        help="write workflows/<workflow>.jpg (template cards) from the sheets in --gallery instead")
    args = parser.parse_args(argv)
    names = args.workflows or [path.stem for path in sorted(API_DIR.glob("*.json"))]
    if args.thumbnails:
        return 0 if write_thumbnails(args.gallery, API_DIR.parent, names) else 1
    return 0 if write_gallery(args.outputs, args.gallery, names) else 1


if __name__ == "__main__":
    sys.exit(main())

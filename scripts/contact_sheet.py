"""Contact sheet of a workflow run: one row per SaveImage prefix (demos first), images side by side."""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

SHEET_GREY = (224, 224, 224)


def rows_by_prefix(folder: Path) -> dict[str, list[Path]]:
    """ComfyUI names files PREFIX_00001_.png: group them by prefix, demos first, then alphabetically."""
    rows: dict[str, list[Path]] = {}
    for png in sorted(folder.glob("*_[0-9][0-9][0-9][0-9][0-9]_.png")):
        rows.setdefault(png.name.rsplit("_", 2)[0], []).append(png)
    return dict(sorted(rows.items(), key=lambda kv: (kv[0] != "demos", kv[0])))


def contact_sheet(folder: Path, label_width: int = 110) -> Image.Image:
    rows = rows_by_prefix(folder)
    if not rows:
        raise FileNotFoundError(f"no ComfyUI output PNGs (PREFIX_00001_.png) in {folder}")
    return sheet_of_rows(rows, label_width)


def sheet_of_rows(rows: dict[str, list[Path]], label_width: int = 110, gap: int = 2) -> Image.Image:
    """One labelled row per entry, the images at the first image's height (a wide grid keeps its aspect), on grey
    with `gap` pixels between them (so white images keep their edges)."""
    height = Image.open(next(iter(rows.values()))[0]).height
    images = {name: [_at_height(Image.open(png).convert("RGB"), height) for png in pngs] for name, pngs in rows.items()}
    width = max(sum(im.width + gap for im in row) for row in images.values())
    sheet = Image.new("RGB", (label_width + width, len(rows) * (height + gap) - gap), SHEET_GREY)
    draw = ImageDraw.Draw(sheet)
    for r, (name, row) in enumerate(images.items()):
        top = r * (height + gap)
        draw.text((4, top + height // 2 - 6), name, fill="black")
        x = label_width
        for image in row:
            sheet.paste(image, (x, top))
            x += image.width + gap
    return sheet


def _at_height(image: Image.Image, height: int) -> Image.Image:
    return image if image.height == height else image.resize((round(image.width * height / image.height), height))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    contact_sheet(args.folder).save(args.out)


if __name__ == "__main__":
    main()

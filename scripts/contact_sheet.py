"""Contact sheet of a basic-workflow run: one row per SaveImage prefix (demos first), images side by side."""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw


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
    tile = Image.open(next(iter(rows.values()))[0]).size
    cols = max(len(v) for v in rows.values())
    sheet = Image.new("RGB", (label_width + cols * tile[0], len(rows) * tile[1]), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, files) in enumerate(rows.items()):
        draw.text((4, r * tile[1] + tile[1] // 2 - 6), name, fill="black")
        for c, png in enumerate(files):
            sheet.paste(Image.open(png).convert("RGB").resize(tile), (label_width + c * tile[0], r * tile[1]))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    contact_sheet(args.folder).save(args.out)


if __name__ == "__main__":
    main()

"""Write the example demo photos that workflows/api/suti_your_photos.json loads, in place of your own photos.

    python -m scripts.make_example_demos      # -> workflows/example_demos/suti_demo_{1,2,3}.png

They are the held-out striped dog of suti_basic (toy subject 4653, seed 0: the same three renders its SuTI
Toy Subject Demos node makes), so the "your photos" graph runs on the toy base without real photos or weights.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from suti_core.world import DemoRenders, render_demos, subject_from_id

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DEMOS_DIR = ROOT / "workflows" / "example_demos"
SUBJECT_ID, SEED, COUNT = 4653, 0, 3  # a test-split subject: never seen in training


def example_demos() -> DemoRenders:
    """The renders the example PNGs hold, with the captions the shipped graph uses for them."""
    return render_demos(subject_from_id(SUBJECT_ID), COUNT, SEED)


def example_demo_paths() -> list[Path]:
    """Where demo i is written; the shipped graph's Load Image nodes name these files."""
    return [EXAMPLE_DEMOS_DIR / f"suti_demo_{i + 1}.png" for i in range(COUNT)]


def main() -> None:
    demos = example_demos()
    EXAMPLE_DEMOS_DIR.mkdir(parents=True, exist_ok=True)
    for path, pixels, caption in zip(example_demo_paths(), demos.images, demos.captions):
        Image.fromarray(pixels).save(path, optimize=True)
        print(f"wrote {path.relative_to(ROOT)}: {caption}")


if __name__ == "__main__":
    main()

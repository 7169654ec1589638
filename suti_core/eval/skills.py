"""The seed's six skills as tests on a prompt's context: one definition for the benchmark's per-skill table and
the render filter's keep rates (so training never imports the benchmark)."""
from __future__ import annotations

from collections.abc import Callable

from suti_core.world import Context

SKILLS: dict[str, Callable[[Context], bool]] = {
    "recontextualisation (no edit)": lambda c: (c.style, c.recolor, c.accessory, c.state) == ("photo", "none", "none", "upright"),
    "stylisation": lambda c: c.style != "photo",
    "recolour": lambda c: c.recolor != "none",
    "accessory": lambda c: c.accessory != "none",
    "state (upside down)": lambda c: c.state != "upright",
    "view (small)": lambda c: c.scale == "small",
}

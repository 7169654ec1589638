"""ComfyUI binding of SuTI (V3 API): loaders, demonstrations, apply."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import SuTIApply
from .demos import SuTIDemonstrations
from .loaders import SuTILoadAdapter, register_suti_folder
from .toy_base import SuTILoadToyBase
from .toy_world import SuTIToySubject


class SuTIExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SuTILoadToyBase, SuTIToySubject, SuTILoadAdapter, SuTIDemonstrations, SuTIApply]


def create_extension() -> SuTIExtension:
    register_suti_folder()
    return SuTIExtension()

"""ComfyUI binding of SuTI (V3 API): loaders, demonstrations, apply, and the toy world's sources."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import SuTIApply
from .demos import SuTIDemonstrations
from .loaders import SuTILoadAdapter, register_pack_adapters, register_suti_folder
from .toy_base import SuTILoadToyBase, register_toy_controlnets
from .toy_world import SuTIToyPoseMap, SuTIToySubject


class SuTIExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SuTILoadToyBase, SuTIToySubject, SuTIToyPoseMap, SuTILoadAdapter, SuTIDemonstrations, SuTIApply]


def create_extension() -> SuTIExtension:
    register_suti_folder()
    register_pack_adapters()
    register_toy_controlnets()
    return SuTIExtension()

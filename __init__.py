"""ComfyUI-SuTI: subject-driven text-to-image from demonstrations (SuTI, Chen et al. 2023).

Only `comfy_entrypoint` is exported (V3 API); the ComfyUI binding is imported when ComfyUI calls
it, so this file imports without ComfyUI (pytest, training).
"""

__all__ = ["comfy_entrypoint"]


async def comfy_entrypoint():
    """V3 entry point: ComfyUI calls this once when it loads the pack."""
    from .nodes import create_extension

    return create_extension()

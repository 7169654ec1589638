"""Plain-torch core of ComfyUI-SuTI; imports nothing from ComfyUI or diffusers."""

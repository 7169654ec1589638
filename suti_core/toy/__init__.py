"""Torch modules of the embedded default base model (host-agnostic)."""

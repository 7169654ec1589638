"""SuTI Apply's demo_features choice: the labels users see <-> suti_core's feature sources."""

from __future__ import annotations

FEATURES = {"encoder (SuTI)": "encoder", "encoder + decoder": "encoder+decoder"}  # label -> suti_core source
LABEL_OF_SOURCE = {source: label for label, source in FEATURES.items()}
DEFAULT_FEATURES = "encoder + decoder"

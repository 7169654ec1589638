"""Metrics for the procedural world (DreamBench analogues): a judge CNN, subject/text fidelity, image quality."""

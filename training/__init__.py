"""Training: the embedded default's base model, SuTI adapters, and the data recipe's stages."""

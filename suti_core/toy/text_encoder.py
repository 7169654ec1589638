"""A word-level text encoder over the toy world's vocabulary (the CLIP analogue of the embedded default)."""
from __future__ import annotations

import re

import torch
from torch import nn

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


class WordTokenizer:
    """Lower-cases, splits on non-letters, maps words to ids; unknown words become <unk>."""

    def __init__(self, vocabulary: tuple[str, ...], max_length: int = 24):
        self.words = SPECIAL_TOKENS + tuple(vocabulary)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.max_length = max_length

    def words_of(self, text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    def encode(self, text: str) -> list[int]:
        """Token ids padded/truncated to max_length: <bos> words <eos> <pad>..."""
        ids = [self.index.get(w, self.index["<unk>"]) for w in self.words_of(text)][: self.max_length - 2]
        ids = [self.index["<bos>"]] + ids + [self.index["<eos>"]]
        return ids + [self.index["<pad>"]] * (self.max_length - len(ids))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)


class ToyTextEncoder(nn.Module):
    """Token ids (B, T) -> per-token conditioning (B, T, dim) for cross-attention."""

    def __init__(self, vocab_size: int, dim: int = 128, layers: int = 2, heads: int = 4, max_length: int = 24):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(dim)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]  # (B, T, dim)
        return self.final_norm(self.transformer(x))

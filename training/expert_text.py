"""Text conditioning for per-subject experts, with the subject identifier's token row learnable.

The identifier ("sks") is an *existing* token whose embedding row the base never learned a meaning for:
in CLIP it is one rare BPE token (DreamBooth's choice, Ruiz et al. 2023 §4.1); the toy word tokenizer has a
closed vocabulary in which every caption word is trained, so the one untrained row is `<unk>`, which
every out-of-vocabulary word (including "sks") maps to. The expert learns a delta on that one row
(zero at init, so the base is unchanged until training moves it). A new token would need a new tokenizer
entry that ComfyUI's stock loaders cannot add; a changed existing row travels in the LoRA file as a
rank-1 patch of the embedding table, which the stock LoraLoader applies through CLIP.

With no identifier (None) the text is the frozen base's own, every row fixed: what the adapter trainer
(training/train_adapter.py) conditions on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from suti_core.toy.checkpoint import ToyBaseCheckpoint


@dataclass
class Conditioning:
    """What the UNet reads from text: per-token context and, for SDXL, the added pooled/size conditioning."""

    context: torch.Tensor                       # (B, T, C)
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (B, P), time_ids (B, 6)

    def __getitem__(self, rows: torch.Tensor | slice) -> Conditioning:
        return Conditioning(self.context[rows], None if self.added is None else {k: v[rows] for k, v in self.added.items()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Batch-concatenate conditionings of one base."""
        added = None if parts[0].added is None else {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
        return Conditioning(torch.cat([p.context for p in parts]), added)


class IdentifierEmbedding(nn.Module):
    """A frozen token table plus a learned delta on one row: table(ids) + [ids == token] * delta."""

    def __init__(self, table: nn.Embedding, token_id: int):
        super().__init__()
        self.table, self.token_id = table.requires_grad_(False), token_id
        self.delta = nn.Parameter(torch.zeros(table.embedding_dim, device=table.weight.device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hit = (ids == self.token_id).unsqueeze(-1).to(self.delta.dtype)  # (B, T, 1)
        return self.table(ids) + hit * self.delta


def one_token(ids: list[int], identifier: str) -> int:
    """The single token id of `identifier`; a multi-token identifier has no one row to learn."""
    if len(ids) != 1:
        raise ValueError(f"identifier {identifier!r} is {len(ids)} tokens for this tokenizer; pick a word that is "
                         "one token (e.g. 'sks')")
    return ids[0]


class ToyText:
    """The toy word-level text encoder (frozen) with the identifier row (`<unk>` for any unknown word), if any."""

    comfy_tables = ("encoder.token_embedding",)  # ComfyUI: the pack's ToyTextModel wraps the encoder as `encoder`

    def __init__(self, ckpt: ToyBaseCheckpoint, identifier: str | None, device: torch.device):
        self.tokenizer, self.encoder, self.device = ckpt.tokenizer(), ckpt.text_encoder().to(device), device
        self.identifiers: list[IdentifierEmbedding] = []
        if identifier is not None:  # None: plain captions (the adapter trainer's frozen base)
            framing = {self.tokenizer.index[w] for w in ("<pad>", "<bos>", "<eos>")}
            token = one_token([i for i in self.tokenizer.encode(identifier) if i not in framing], identifier)
            self.encoder.token_embedding = IdentifierEmbedding(self.encoder.token_embedding, token)
            self.identifiers.append(self.encoder.token_embedding)

    def __call__(self, captions: list[str]) -> Conditioning:
        return Conditioning(self.encoder(self.tokenizer(captions).to(self.device)))


class ClipText:
    """A diffusers checkpoint's CLIP text encoder(s), frozen: SD1.x one, SDXL two (penultimate layers
    concatenated, pooled output and size ids as added conditioning)."""

    def __init__(self, folder: Path, identifier: str | None, sdxl: bool, image_size: int, device: torch.device):
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        names = ("", "_2") if sdxl else ("",)
        self.tokenizers = [AutoTokenizer.from_pretrained(folder / f"tokenizer{n}") for n in names]
        classes = (CLIPTextModel, CLIPTextModelWithProjection)
        self.encoders = [classes[i].from_pretrained(folder / f"text_encoder{n}").eval().requires_grad_(False).to(device)
                         for i, n in enumerate(names)]
        self.identifiers = []
        for tokenizer, encoder in zip(self.tokenizers, self.encoders) if identifier is not None else ():
            token = one_token(tokenizer(identifier, add_special_tokens=False).input_ids, identifier)
            encoder.set_input_embeddings(IdentifierEmbedding(encoder.get_input_embeddings(), token))
            self.identifiers.append(encoder.get_input_embeddings())
        self.sdxl, self.image_size, self.device = sdxl, image_size, device
        prefix = "clip_l.transformer.text_model.embeddings.token_embedding"
        self.comfy_tables = (prefix, prefix.replace("clip_l", "clip_g")) if sdxl else (prefix,)

    def _ids(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def __call__(self, captions: list[str]) -> Conditioning:
        if not self.sdxl:
            return Conditioning(self.encoders[0](self._ids(self.tokenizers[0], captions)).last_hidden_state)
        outs = [enc(self._ids(tok, captions), output_hidden_states=True)
                for tok, enc in zip(self.tokenizers, self.encoders)]
        size = self.image_size
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32, device=self.device)
        time_ids = time_ids.repeat(len(captions), 1)  # (B, 6)
        return Conditioning(torch.cat([o.hidden_states[-2] for o in outs], dim=-1),  # (B, 77, C_l + C_g)
                            {"text_embeds": outs[1].text_embeds, "time_ids": time_ids})

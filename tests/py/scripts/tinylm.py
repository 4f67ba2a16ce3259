"""A tiny causal LM with an HF-like forward, for the safegrad tests (no transformers import:
it costs seconds per process)."""
from types import SimpleNamespace

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.mix = nn.Linear(h, h)
        self.up = nn.Linear(h, 2 * h)
        self.down = nn.Linear(2 * h, h)

    def forward(self, x):
        pos = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).view(1, -1, 1)
        x = x + self.mix(torch.cumsum(x, 1) / pos)  # causal context: the running mean
        return x + self.down(torch.tanh(self.up(x)))


class TinyLM(nn.Module):
    """Enough of a causal LM for a probe: forward(input_ids, attention_mask, labels) -> .loss, .logits."""

    def __init__(self, vocab=64, h=32, n=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList([Block(h) for _ in range(n)])
        self.head = nn.Linear(h, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = self.embed(input_ids)
        for b in self.layers:
            x = b(x)
        logits = self.head(x)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def rows_batch(rows):
    """(input_ids, attention_mask, labels) of pre-tokenized rows, padded on the right."""
    from torch.nn.utils.rnn import pad_sequence
    seqs = [torch.tensor(r["input_ids"]) for r in rows]
    ids = pad_sequence(seqs, batch_first=True, padding_value=0)
    labels = pad_sequence([torch.tensor(r["labels"]) for r in rows], batch_first=True, padding_value=-100)
    mask = pad_sequence([torch.ones_like(t) for t in seqs], batch_first=True, padding_value=0)
    return ids, mask, labels

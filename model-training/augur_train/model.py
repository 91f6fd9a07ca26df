"""The prefetch model: a small LSTM over per-stream delta tokens plus step features, giving for
every delta token the probability that the block that far from the current one is read within
the next `horizon` reads of the stream (independent sigmoids, multi-label)."""
from __future__ import annotations

import torch
from torch import nn


class DeltaLSTM(nn.Module):
    def __init__(self, vocab: int, n_features: int, embed: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed + n_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def logits(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.embed(tokens), features], dim=-1)
        out, _ = self.lstm(x)
        return self.head(out[:, -1, :])

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Per-token probabilities of being read within the horizon, [batch, vocab]."""
        return torch.sigmoid(self.logits(tokens, features))

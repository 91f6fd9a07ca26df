"""The prefetch model: a small LSTM over per-stream delta tokens plus step features, giving for
every delta token the probability that the block that far from the current one is read within
the next `horizon` reads of the stream (independent sigmoids, multi-label).

Training runs the LSTM over windows; serving runs it one step per read with the state kept per
stream (`StepModel`, the graph that is exported), so a read costs one cell evaluation instead of
a whole window."""
from __future__ import annotations

import torch
from torch import nn


class DeltaLSTM(nn.Module):
    def __init__(self, vocab: int, n_features: int, embed: int = 16, hidden: int = 32):
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed + n_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def logits(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Logits after the last step of windows that start from a zero state, [batch, vocab]."""
        x = torch.cat([self.embed(tokens), features], dim=-1)
        out, _ = self.lstm(x)
        return self.head(out[:, -1, :])

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Per-token probabilities of being read within the horizon, [batch, vocab]."""
        return torch.sigmoid(self.logits(tokens, features))


class StepModel(nn.Module):
    """One LSTM step of a trained `DeltaLSTM`, laid out for a fast runtime: token [B],
    x [B, F + H] (the step's features, then the state h), c [B, H] -> probs [B, V], h, c.
    The embedding is folded into a per-token table of gate inputs, and the rest of the gates
    come from one matrix product, so tract runs few, larger operations. Equal to `DeltaLSTM`
    run over the same steps from a zero state."""

    def __init__(self, m: DeltaLSTM):
        super().__init__()
        self.head = m.head
        lstm, e = m.lstm, m.embed.embedding_dim
        w_ih = lstm.weight_ih_l0.detach()  # [4H, E + F]
        table = m.embed.weight.detach() @ w_ih[:, :e].t() + lstm.bias_ih_l0.detach() + lstm.bias_hh_l0.detach()
        self.table = nn.Parameter(table.clone(), requires_grad=False)  # [V, 4H]
        w = torch.cat([w_ih[:, e:], lstm.weight_hh_l0.detach()], dim=1)  # [4H, F + H]
        self.w = nn.Parameter(w.t().contiguous().clone(), requires_grad=False)  # [F + H, 4H]

    def forward(self, token, x, c):
        gates = self.table[token] + x @ self.w
        i, f, g, o = gates.chunk(4, dim=-1)  # PyTorch's gate order
        c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h2 = torch.sigmoid(o) * torch.tanh(c2)
        return torch.sigmoid(self.head(h2)), h2, c2

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
    """One LSTM step of a trained `DeltaLSTM`, laid out for a fast runtime: x [B, V + F + H] (the
    token one-hot, the step's features, then the state h), c [B, H] -> probs [B, V], h, c.

    The step is one ONNX `LSTM` node (tract runs it as one matrix product and one fused cell
    kernel) whose input weights hold everything: the embedding and both biases folded into a
    per-token column block (the one-hot picks one column, so it adds that token's gate inputs),
    the feature weights, and the recurrent weights (h arrives inside x; the node's own
    recurrent weights are zero and its initial h is zero). Equal to `DeltaLSTM` run over the
    same steps from a zero state."""

    def __init__(self, m: DeltaLSTM):
        super().__init__()
        self.head = m.head
        lstm, e = m.lstm, m.embed.embedding_dim
        w_ih = lstm.weight_ih_l0.detach()  # [4H, E + F]
        table = m.embed.weight.detach() @ w_ih[:, :e].t() + lstm.bias_ih_l0.detach() + lstm.bias_hh_l0.detach()
        w = torch.cat([table.t(), w_ih[:, e:], lstm.weight_hh_l0.detach()], dim=1)  # [4H, V + F + H]
        self.cell = nn.LSTM(w.shape[1], m.hidden)
        with torch.no_grad():
            self.cell.weight_ih_l0.copy_(w)
            self.cell.weight_hh_l0.zero_()
            self.cell.bias_ih_l0.zero_()
            self.cell.bias_hh_l0.zero_()
        self.cell.requires_grad_(False)

    def forward(self, x, c):
        h0 = torch.zeros((1, x.shape[0], self.cell.hidden_size), dtype=x.dtype)
        _, (h, c2) = self.cell(x.unsqueeze(0), (h0, c.unsqueeze(0)))
        h, c2 = h.squeeze(0), c2.squeeze(0)
        return torch.sigmoid(self.head(h)), h, c2

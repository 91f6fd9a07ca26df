"""Train, evaluate and export the prefetch model.

    python -m augur_train.train --features DIR --out ../models [--holdout NAME,...] [--epochs N]

Reads the tensors of `augur trace features`, trains on the first 70% of every trace not held
out, reports precision@4 (of the 4 likeliest deltas, the share read within the horizon) and
next-read accuracy on the last 30% of those traces and on the held-out traces (beside the
"+1 block" baseline), and writes to --out:

- `prefetch.onnx`: opset 17, one LSTM step for `LANES` state lanes of a stream (constant sequence
  length 1), a single ONNX `LSTM` node plus the head: inputs `x` float32 [L, V + F + H] (the
  token one-hot, the step's features, then the state h) and `c` float32 [L, H]; outputs `probs`
  float32 [L, V], `h_out`, `c_out`. The runtime keeps the state per stream; training windows
  start from a zero state and are S - S/L + 1..S steps long, and the runtime restarts each lane's
  state every S steps and reads the oldest, so serving sees exactly the history lengths training
  saw;
- `prefetch.json`: vocabulary and feature config (as `augur trace features` wrote it) plus the
  metrics;
- `prefetch.parity.json`: inputs and the probabilities PyTorch and onnxruntime gave for them
  (agreeing within 1e-5), which the Rust runtime (tract) is tested against: the step graph run
  over a window from a zero state equals the window model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data
from .model import DeltaLSTM, StepModel

PARITY_CASES = 8
PARITY_TOLERANCE = 1e-5
# State lanes one run of the exported step graph serves per stream (see the module doc; equal
# to `LANES` in prefetch/src/model.rs).
LANES = 1


def accuracy(model: DeltaLSTM, s: data.TraceSet, config: dict, batch: int = 4096) -> dict:
    """precision@4: share of the 4 most likely actionable deltas (not padding or far) that are
    read within the horizon; next1: the top one is the very next read."""
    if len(s) == 0:
        return {"samples": 0, "precision_at_4": 0.0, "next1": 0.0}
    model.eval()
    hits = picked = next1 = 0
    blocked = torch.tensor([config["token_pad"], config["token_far_behind"], config["token_far_ahead"]])
    with torch.no_grad():
        for i in range(0, len(s), batch):
            t = torch.from_numpy(s.tokens[i : i + batch])
            f = torch.from_numpy(s.features[i : i + batch])
            logits = model.logits(t, f)
            logits[:, blocked] = -1e9
            best = logits.topk(4, dim=-1).indices.numpy()
            fut = s.future[i : i + batch]
            for row in range(best.shape[0]):
                future = set(fut[row].tolist())
                hits += sum(1 for b in best[row] if b in future)
                picked += 4
            next1 += int((best[:, 0] == s.labels[i : i + batch]).sum())
    return {"samples": len(s), "precision_at_4": hits / picked, "next1": next1 / len(s)}


def plus_one_baseline(s: data.TraceSet, config: dict) -> float:
    """Share of labels that are the +1 delta (what next-1 bets on)."""
    if len(s) == 0:
        return 0.0
    plus_one = 3 + config["delta_range"] + 1
    return float((s.labels == plus_one).mean())


def train(
    config: dict,
    train_set: data.TraceSet,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    embed: int,
    hidden: int,
    log=print,
) -> DeltaLSTM:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = DeltaLSTM(config["vocab"], len(config["features"]), embed=embed, hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(train_set))
        total, started = 0.0, time.time()
        s = config["seq_len"]
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            # The history lengths serving sees (S - S/L + 1..S steps since the state started).
            length = int(rng.integers(s - s // LANES + 1, s + 1))
            t = torch.from_numpy(train_set.tokens[idx, -length:])
            f = torch.from_numpy(train_set.features[idx, -length:])
            y = torch.from_numpy(data.multi_hot(train_set.future[idx], config["vocab"], config["token_pad"]))
            opt.zero_grad()
            loss = loss_fn(model.logits(t, f), y)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: loss {total / max(1, len(order)):.4f} ({time.time() - started:.1f} s)")
    return model


def step_input(token: int, feats: np.ndarray, h: np.ndarray, vocab: int) -> np.ndarray:
    """The step graph's `x` for every lane: the token one-hot, the step's features, the lane's h."""
    onehot = np.zeros((h.shape[0], vocab), dtype=np.float32)
    onehot[:, token] = 1.0
    return np.concatenate([onehot, np.repeat(feats[None, :], h.shape[0], axis=0).astype(np.float32), h], axis=1)


def step_run(session, tokens: np.ndarray, feats: np.ndarray, hidden: int, vocab: int) -> np.ndarray:
    """Runs the exported step graph over one window (every lane the same) from a zero state."""
    h = np.zeros((LANES, hidden), dtype=np.float32)
    c = np.zeros((LANES, hidden), dtype=np.float32)
    probs = None
    for j in range(tokens.shape[0]):
        probs, h, c = session.run(["probs", "h_out", "c_out"], {"x": step_input(int(tokens[j]), feats[j], h, vocab), "c": c})
    return probs[0]


def write_step_graph(model: DeltaLSTM, config: dict, onnx_path: Path) -> None:
    """Exports one step of `model` (`StepModel`) as the ONNX graph the runtime serves."""
    model.eval()
    step = StepModel(model).eval()
    f, hidden, vocab = len(config["features"]), model.hidden, config["vocab"]
    args = (
        torch.zeros((LANES, vocab + f + hidden), dtype=torch.float32),
        torch.zeros((LANES, hidden), dtype=torch.float32),
    )
    torch.onnx.export(
        step,
        args,
        str(onnx_path),
        input_names=["x", "c"],
        output_names=["probs", "h_out", "c_out"],
        opset_version=17,
        dynamo=False,
    )
    import onnx

    onnx.checker.check_model(onnx.load(str(onnx_path)))


def export(model: DeltaLSTM, config: dict, sample: data.TraceSet, out: Path, metrics: dict) -> None:
    import onnxruntime as ort

    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "prefetch.onnx"
    write_step_graph(model, config, onnx_path)
    hidden, vocab = model.hidden, config["vocab"]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    picks = rng.choice(len(sample), size=min(PARITY_CASES, len(sample)), replace=False) if len(sample) else []
    cases = []
    for i in picks:
        t = sample.tokens[i : i + 1]
        x = sample.features[i : i + 1]
        with torch.no_grad():
            expected = model(torch.from_numpy(t), torch.from_numpy(x)).numpy()[0]
        got = step_run(session, t[0], x[0], hidden, vocab)
        diff = float(np.abs(expected - got).max())
        if diff > PARITY_TOLERANCE:
            raise RuntimeError(f"onnxruntime (step graph) disagrees with PyTorch (window) by {diff} (> {PARITY_TOLERANCE})")
        cases.append({"tokens": t[0].tolist(), "features": x[0].tolist(), "probs": expected.tolist()})
    (out / "prefetch.parity.json").write_text(json.dumps({"tolerance": 1e-4, "cases": cases}))
    model_config = {k: config[k] for k in ("vocab", "delta_range", "seq_len", "horizon", "features", "block_kib", "token_pad", "token_far_behind", "token_far_ahead")}
    model_config.update({
        "hidden": hidden,
        "lanes": LANES,
        "inputs": ["x", "c"],
        "outputs": ["probs", "h_out", "c_out"],
        "opset": 17,
        "metrics": metrics,
    })
    (out / "prefetch.json").write_text(json.dumps(model_config, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, required=True, help="directory written by `augur trace features`")
    p.add_argument("--out", type=Path, required=True, help="where the model files go (e.g. ../models)")
    p.add_argument("--holdout", default="", help="trace names left out of training, comma-separated")
    p.add_argument("--train-frac", type=float, default=0.7, help="chronological share of each trace to train on")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--embed", type=int, default=16)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch")
    a = p.parse_args(argv)
    if not 0.0 < a.train_frac < 1.0:
        p.error(f"--train-frac {a.train_frac} must be between 0 and 1")
    torch.set_num_threads(a.threads)
    config, sets = data.load(a.features)
    holdout = {h for h in a.holdout.split(",") if h}
    unknown = holdout - {s.name for s in sets}
    if unknown:
        p.error(f"--holdout names traces not in {a.features}: {sorted(unknown)}")
    trains, tests = [], []
    for s in sets:
        if s.name not in holdout:
            tr, te = s.chronological(a.train_frac)
            trains.append(tr)
            tests.append(te)
    if not trains:
        p.error("every trace is held out: nothing to train on")
    train_set = data.concat(trains, "train")
    print(f"training on {len(train_set)} samples from {len(trains)} traces", file=sys.stderr)
    model = train(config, train_set, a.epochs, a.batch, a.lr, a.seed, a.embed, a.hidden,
                  log=lambda m: print(m, file=sys.stderr))
    metrics = {"tail": {}, "held_out": {}}
    for te in tests:
        if len(te) == 0:  # every sample of this trace came from before the cut
            continue
        metrics["tail"][te.name] = {**accuracy(model, te, config), "plus_one": plus_one_baseline(te, config)}
    for s in sets:
        if s.name in holdout:
            metrics["held_out"][s.name] = {**accuracy(model, s, config), "plus_one": plus_one_baseline(s, config)}
    print(json.dumps(metrics, indent=2))
    sample = data.concat(tests) if tests and sum(len(t) for t in tests) else train_set
    export(model, config, sample, a.out, metrics)
    print(f"wrote {a.out / 'prefetch.onnx'}, prefetch.json, prefetch.parity.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

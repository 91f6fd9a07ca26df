"""Loading the tensors `augur trace features` writes, and splitting them.

Splits: chronological per trace, by request: samples whose read comes from the trace's first
`train_frac` of requests train, the rest test. The cut is where `augur trace eval --tail-frac
(1 - train_frac)` starts scoring (request `n - round((1 - train_frac) * n)` of `n`), so no sample
from a scored tail is trained on. (A window's targets, its stream's next `horizon` reads, can
reach past the cut by up to that many reads.) Whole traces can also be held out of training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class TraceSet:
    name: str
    tokens: np.ndarray  # int64 [N, S]
    features: np.ndarray  # float32 [N, S, F]
    labels: np.ndarray  # int64 [N]: the next read's delta token
    future: np.ndarray  # int64 [N, H]: delta tokens of the next H reads from the current block
    request: np.ndarray  # int64 [N]
    requests: int = 0  # requests in the whole trace (reads and writes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: np.ndarray) -> "TraceSet":
        return TraceSet(self.name, self.tokens[idx], self.features[idx], self.labels[idx], self.future[idx],
                        self.request[idx], self.requests)

    def chronological(self, train_frac: float) -> tuple["TraceSet", "TraceSet"]:
        """Samples from the first `train_frac` of the trace's requests, and the rest (see the
        module doc for where the cut falls)."""
        if self.requests <= 0:
            raise ValueError(f"{self.name}: the trace's request count is unknown (features.json 'requests')")
        # Rounded half away from zero, as Rust's `f64::round` in the replay (Python's `round`
        # rounds half to even).
        cut = self.requests - int(np.floor((1.0 - train_frac) * self.requests + 0.5))
        early = self.request < cut
        return self.take(np.flatnonzero(early)), self.take(np.flatnonzero(~early))


def multi_hot(future: np.ndarray, vocab: int, pad: int) -> np.ndarray:
    """[N, H] tokens -> [N, vocab] float32 with 1 for every token read within the horizon."""
    out = np.zeros((future.shape[0], vocab), dtype=np.float32)
    rows = np.repeat(np.arange(future.shape[0]), future.shape[1])
    out[rows, future.reshape(-1)] = 1.0
    out[:, pad] = 0.0
    return out


def load_config(features_dir: Path) -> dict:
    path = Path(features_dir) / "features.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run `augur trace features ... --out {features_dir}` first")
    return json.loads(path.read_text())


def load(features_dir: Path) -> tuple[dict, list[TraceSet]]:
    features_dir = Path(features_dir)
    config = load_config(features_dir)
    sets = []
    for t in config["traces"]:
        name = t["name"]
        arr = {k: np.load(features_dir / f"{name}.{k}.npy") for k in ("tokens", "features", "labels", "future", "request")}
        s, f = config["seq_len"], len(config["features"])
        if arr["tokens"].ndim != 2 or arr["tokens"].shape[1] != s:
            raise ValueError(f"{name}.tokens.npy has shape {arr['tokens'].shape}, expected (N, {s})")
        if arr["features"].shape[1:] != (s, f):
            raise ValueError(f"{name}.features.npy has shape {arr['features'].shape}, expected (N, {s}, {f})")
        if arr["future"].shape != (arr["tokens"].shape[0], config["horizon"]):
            raise ValueError(f"{name}.future.npy has shape {arr['future'].shape}, expected (N, {config['horizon']})")
        requests = t.get("requests")
        if not isinstance(requests, int) or requests < 0:
            raise ValueError(f"{name}: features.json gives no request count ('requests'); rerun `augur trace features`")
        sets.append(TraceSet(name, arr["tokens"], arr["features"].astype(np.float32), arr["labels"], arr["future"],
                             arr["request"], requests))
    return config, sets


def concat(sets: list[TraceSet], name: str = "all") -> TraceSet:
    if not sets:
        raise ValueError("no samples to concatenate")
    return TraceSet(
        name,
        np.concatenate([s.tokens for s in sets]),
        np.concatenate([s.features for s in sets]),
        np.concatenate([s.labels for s in sets]),
        np.concatenate([s.future for s in sets]),
        np.concatenate([s.request for s in sets]),
    )

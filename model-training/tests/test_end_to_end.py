"""A tiny end-to-end run: synthetic features in the layout `augur trace features` writes,
training, evaluation, ONNX export of the step graph and parity with onnxruntime."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from augur_train import data, train

SEQ, FEATS, VOCAB, DELTA, H = 16, 5, 132, 64, 8


def write_trace(d: Path, name: str, n: int, rng) -> None:
    # A learnable stream: the delta cycles through +1, +1, +8, so what comes next follows
    # from the last few steps.
    cycle = np.array([1, 1, 8])
    start = rng.integers(0, 3, size=n)
    pos = (start[:, None] + np.arange(SEQ + H)[None, :]) % 3
    deltas = cycle[pos]
    tokens = 3 + DELTA + deltas[:, :SEQ]
    ahead = np.cumsum(deltas[:, SEQ:], axis=1)  # blocks of the next H reads from the current
    future = np.where(ahead <= DELTA, 3 + DELTA + ahead, 2)
    np.save(d / f"{name}.tokens.npy", tokens.astype(np.int64))
    np.save(d / f"{name}.features.npy", rng.random((n, SEQ, FEATS), dtype=np.float32))
    np.save(d / f"{name}.labels.npy", future[:, 0].astype(np.int64))
    np.save(d / f"{name}.future.npy", future.astype(np.int64))
    # Trace "a" (see the fixture) has 800 requests, its samples come from the first 600 (the
    # rest are writes, say): the split follows requests, not sample counts.
    np.save(d / f"{name}.request.npy", np.arange(n, dtype=np.int64))


@pytest.fixture
def features_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, n in [("a", 600), ("b", 300)]:
        write_trace(tmp_path, name, n, rng)
    config = {
        "vocab": VOCAB, "delta_range": DELTA, "seq_len": SEQ, "horizon": H,
        "features": ["log2_iat_us", "timed", "log2_request_blocks", "is_image", "is_database"],
        "block_kib": 64, "token_pad": 0, "token_far_behind": 1, "token_far_ahead": 2,
        "traces": [{"name": "a", "samples": 600, "requests": 800}, {"name": "b", "samples": 300, "requests": 300}],
    }
    (tmp_path / "features.json").write_text(json.dumps(config))
    return tmp_path


def test_chronological_split_keeps_trace_order(features_dir: Path):
    _, sets = data.load(features_dir)
    a, b = sets
    # 800 requests: `trace eval --tail-frac 0.3` scores from request 560, where training stops.
    tr, te = a.chronological(0.7)
    assert len(tr) == 560 and len(te) == 40 and tr.request.max() == 559 and te.request.min() == 560
    tr, te = a.chronological(0.9)
    assert len(tr) == 600 and len(te) == 0
    tr, te = b.chronological(0.7)
    assert len(tr) == 210 and len(te) == 90
    assert tr.request.max() < te.request.min()


def test_train_evaluate_export_and_parity(features_dir: Path, tmp_path: Path):
    out = tmp_path / "model"
    assert train.main(["--features", str(features_dir), "--out", str(out), "--holdout", "b",
                       "--epochs", "20", "--batch", "32", "--hidden", "32", "--embed", "16"]) == 0
    cfg = json.loads((out / "prefetch.json").read_text())
    assert cfg["vocab"] == VOCAB and cfg["seq_len"] == SEQ and cfg["opset"] == 17
    # The cycle is learnable: the 4 likeliest deltas are all read within the horizon.
    for m in (cfg["metrics"]["tail"]["a"], cfg["metrics"]["held_out"]["b"]):
        assert m["precision_at_4"] > 0.9, m
    parity = json.loads((out / "prefetch.parity.json").read_text())
    assert len(parity["cases"]) == train.PARITY_CASES
    session = ort.InferenceSession(str(out / "prefetch.onnx"), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    lanes, hidden = train.LANES, cfg["hidden"]
    assert shapes == {"x": [lanes, VOCAB + FEATS + hidden], "c": [lanes, hidden]}, \
        "constant shapes: one step per run"
    # One LSTM node carries the whole cell (tract runs it as a matrix product and one fused
    # kernel; a cell spelled out in slices and elementwise ops cost twice as much per step).
    ops = [n.op_type for n in onnx.load(str(out / "prefetch.onnx")).graph.node]
    assert ops.count("LSTM") == 1 and not {"Slice", "Split", "Tanh"} & set(ops), ops
    for case in parity["cases"]:
        # The step graph over the window from a zero state gives the window model's answer.
        got = train.step_run(session, np.array(case["tokens"], dtype=np.int64),
                             np.array(case["features"], dtype=np.float32), hidden, VOCAB)
        assert np.abs(got - np.array(case["probs"])).max() < 1e-5
        assert ((got >= 0) & (got <= 1)).all()


def test_bad_inputs_are_named(features_dir: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="augur trace features"):
        data.load(tmp_path / "missing")
    with pytest.raises(SystemExit):
        train.main(["--features", str(features_dir), "--out", str(tmp_path / "m"), "--holdout", "nope"])
    np.save(features_dir / "a.tokens.npy", np.zeros((600, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="a.tokens.npy has shape"):
        data.load(features_dir)

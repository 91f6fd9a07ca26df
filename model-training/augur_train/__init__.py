"""Training for Augur's prefetch model.

Features come from `augur trace features` (Rust), so training and serving compute the same
inputs; this package only loads them, trains, evaluates and exports ONNX.
"""

"""Inference: generation, evaluation (loss, bits per byte, LAMBADA) and its reports, and the
lm-evaluation-harness adapter."""

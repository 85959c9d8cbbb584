"""Reading and writing: model weights (official .pth, HF and rwkv_jax directories), orbax checkpoints,
the training workdir and its lock, and the log files."""

"""Reference peers for tests: HF transformers' RwkvForCausalLM with every parameter randomised (its own
init is degenerate: zero matrices make every logit equal), and the official `rwkv` pip package.

Kept apart from tests/helpers.py: importing this module imports torch and transformers and sets the `rwkv`
package's environment, which only the modules that compare against a peer should pay for."""

import os

import numpy as np

# The rwkv package reads these at import time: plain PyTorch on CPU, no TorchScript, no CUDA kernel.
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402
from transformers import RwkvConfig, RwkvForCausalLM  # noqa: E402


def random_hf_model(vocab_size=97, d_model=32, n_layer=3, d_ffn=None, seed=0) -> RwkvForCausalLM:
    """An fp32 HF RWKV-4 in eval mode whose every parameter is random but in a realistic range."""
    config = RwkvConfig(vocab_size=vocab_size, context_length=1024, hidden_size=d_model,
                        num_hidden_layers=n_layer, attention_hidden_size=d_model,
                        intermediate_size=d_ffn or 4 * d_model, rescale_every=0)
    model = RwkvForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "time_decay" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 4 - 3)
            elif "time_first" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "time_mix" in name:
                p.copy_(torch.rand(p.shape, generator=g))
            elif p.ndim == 1:  # LayerNorm weight / bias
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                scale = 3.0 if "embeddings" in name else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def hf_logits(model: RwkvForCausalLM, tokens_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens_BT, np.int64))).logits.numpy()


def official_rnn(pth_path, tokens_T):
    """Run the `rwkv` pip package token by token ('cpu fp32'). Returns logits [T, V] and its final state
    (list of 5 tensors per layer: att_x, a, b, p, ffn_x)."""
    from rwkv.model import RWKV
    model = RWKV(model=str(pth_path), strategy="cpu fp32", verbose=False)
    state, logits = None, []
    for token in tokens_T:
        out, state = model.forward([int(token)], state)
        logits.append(out.numpy())
    return np.stack(logits), [s.numpy() for s in state]

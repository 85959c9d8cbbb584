"""Generate text with an RWKV-4 or RWKV-7 checkpoint.

    python generate.py --checkpoint=WORKDIR --prompt="def main(" --max_new_tokens=200
    python generate.py --checkpoint=X.pth --tokenizer=T.json --prompt="The quick" --temperature=0.8 --top_p=0.9

All flags: `python generate.py --help`; the program is rwkv_jax/cli/generate.py (also `rwkv-generate`
and `python -m rwkv_jax.cli.generate`).
"""

from rwkv_jax.cli.generate import entry_point

if __name__ == "__main__":
    entry_point()

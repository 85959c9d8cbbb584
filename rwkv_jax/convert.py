"""`python -m rwkv_jax.convert SRC DST [--to=FORMAT]`: the command of rwkv_jax/commands/convert.py (also
`rwkv-convert`); the conversions themselves are in rwkv_jax.weights."""

if __name__ == "__main__":
    from rwkv_jax.commands import convert
    convert.entry_point()

"""The command-line programs, one module each, all in one style (absl flags, `rwkv_jax.cli.run`):

    train       python train.py       rwkv-train
    eval        python eval.py        rwkv-eval
    generate    python generate.py    rwkv-generate      (also python -m rwkv_jax.generate)
    convert     python -m rwkv_jax.convert                rwkv-convert
    make_binidx python -m rwkv_jax.data.make_binidx       rwkv-make-binidx

Each module defines its flags when imported and `entry_point()` runs it; the scripts at the top of the
repository and the console scripts of pyproject.toml only call that. Flags two commands share are
defined once, in `common`, so that any of these modules can be imported together.
"""

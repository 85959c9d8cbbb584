"""Train RWKV-4.

    python train.py --config=configs/tiny.py --workdir=/tmp/rwkv-tiny
    python train.py --config=configs/430m.py --workdir=DIR --config.train.batch_size=8
    python train.py --config=configs/14b.py --compile_only --topology=v5p:4x4x4 --config.mesh.fsdp=-1

Config fields are overridden as --config.section.field=value. All flags: `python train.py --help`; the
program is rwkv_jax/cli/train.py (also `rwkv-train`).
"""

from rwkv_jax.cli.train import entry_point

if __name__ == "__main__":
    entry_point()

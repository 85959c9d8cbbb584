"""Train RWKV-4.

    python train.py --config=configs/tiny.py --workdir=/tmp/rwkv-tiny
    python train.py --config=configs/430m.py --workdir=DIR --config.train.batch_size=8
    python train.py --config=configs/14b.py --compile_only --topology=v5p:4x4x4 --config.mesh.fsdp=-1

Config fields are overridden as --config.section.field=value; an unknown field or a wrong type is an
error. Running the same command again resumes from the latest checkpoint in the workdir. Multi-host:
see README ("Multi-host training"). The console shows progress and warnings; everything logged goes to
WORKDIR/train.log (absl's --verbosity=0 shows it on the console too). Expected errors (bad config values,
a locked or unwritable workdir, a refused resume, bad data files, a failed checkpoint save) are one line
and exit code 1 (2 for a bad command line); --traceback shows the full trace.
"""

import sys

from absl import flags
from ml_collections import config_flags

from rwkv_jax.cli import runner as cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "Multi-host: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-host: this process's id.")
_AUTO_DISTRIBUTED = flags.DEFINE_bool("auto_distributed", True,
                                      "Detect a multi-host launch (SLURM, Open MPI, Cloud TPU) from the environment.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer("distributed_timeout_s", 300, "How long to wait for the other processes.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile the train and eval steps for --topology ahead of "
                                  "time and report memory, FLOPs and a roofline step time; no workdir, no data. "
                                  "Exit code 1 when the step does not fit. Needs libtpu (pip install -e .[tpu-aot]).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU topology for --compile_only, e.g. v5e:2x2, v5p:4x4x4.")
_ESTIMATE_COSTS = flags.DEFINE_bool("estimate_costs", True, "With --compile_only: count FLOPs and bytes of scanned "
                                    "layers from 1- and 2-layer compiles (XLA counts a loop body once); "
                                    "--noestimate_costs reports memory only, faster.")


def _usage_error(message: str):
    """A bad command line as one line, exit code 2 (cli's style for usage errors, without the help text)."""
    sys.stderr.write(f"{cli.prog_name()}: error: {message}\n")
    sys.exit(2)


def parse_flags(argv):
    """absl parsing, with every flag error (ml_collections' unknown field included) as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a wrong type, a missing required flag, a config file that raised, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _usage_error("flags parsing error: " + (" ".join(lines) if len(lines) < 3 else f"{lines[0]} {lines[-1]}"))
    except (AttributeError, KeyError) as e:
        # ml_collections nests a KeyError repr in the message: strip its quotes and escaped newline.
        message = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\", "").replace("'", "")
        _usage_error(f"flags parsing error: unknown config field in a --config.* override: {message}")
    except Exception as e:  # noqa: BLE001 - the config file itself raised (a syntax error, ...)
        _config_file_error(e)


def _config_file_error(e: BaseException):
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, OSError) and root.strerror:
        cause = root.strerror
    elif isinstance(root, OSError):  # ml_collections: the attempted paths, then the OS error on the last line
        cause = str(root).strip().splitlines()[-1].strip()
    elif isinstance(root, SyntaxError):
        cause = f"{root.msg} at line {root.lineno}"
    else:
        cause = cli.error_line(root).split(" Attempted [")[0]
    path = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "?")
    _usage_error(f"cannot load the config file {path}: {type(root).__name__}: {cause}")


def load_config():
    """The config; a config file that failed to load is one line naming the file and the cause."""
    config = _CONFIG.value
    try:
        config.keys()  # ml_collections defers a load failure until the config is first used
    except Exception as e:  # noqa: BLE001
        _config_file_error(e)
    return config


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    # Checked here rather than with flags.mark_flags_as_required, which would bind every command that is
    # imported into the same process (the tests) to train's flags.
    if _COMPILE_ONLY.value:
        if not _CONFIG.value or not _TOPOLOGY.value:
            raise cli.UsageError("--compile_only needs --config and --topology, e.g. --config=configs/tiny.py "
                                 "--topology=v5e:2x2")
        from rwkv_jax.train import aot  # after flag parsing: jax starts here
        report = aot.compile_only(load_config(), _TOPOLOGY.value, estimate_costs=_ESTIMATE_COSTS.value)
        return 0 if report["fits"] else 1
    planning = [f"--{name}" for name, given in (("topology", _TOPOLOGY.value),
                                                 ("noestimate_costs", not _ESTIMATE_COSTS.value)) if given]
    if planning:
        raise cli.UsageError(f"{' and '.join(planning)} {'is' if len(planning) == 1 else 'are'} for --compile_only "
                             "(planning a TPU run without training): add --compile_only, or drop "
                             f"{'it' if len(planning) == 1 else 'them'} to train")
    missing = [f"--{flag.name}" for flag in (_CONFIG, _WORKDIR) if not flag.value]
    if missing:
        raise cli.UsageError(f"{' and '.join(missing)} must have a value (e.g. --config=configs/tiny.py "
                             "--workdir=/tmp/rwkv-tiny)")
    from rwkv_jax.train import distributed, trainer  # after flag parsing: jax starts here
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           timeout_s=_DISTRIBUTED_TIMEOUT.value, auto=_AUTO_DISTRIBUTED.value)
    result = trainer.train(load_config(), _WORKDIR.value)
    print("final:", {k: v for k, v in result.items() if k in ("step", "loss", "eval_loss", "eval_bits_per_byte")})


def entry_point():
    cli.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    entry_point()

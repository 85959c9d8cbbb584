"""The lm-evaluation-harness command line with rwkv-jax's model registered (`--model rwkv_jax` is the default).

    python -m rwkv_jax.cli.lm_eval --model_args checkpoint=X.pth,tokenizer=T.json --tasks lambada_local \\
        --include_path tasks/ --batch_size 8
    python -m rwkv_jax.cli.lm_eval ls tasks --include_path tasks/

Every other argument is the harness's own (`lm-eval run --help`); the model args are those of
`rwkv_jax.infer.lm_eval_adapter.RWKVLM`. Expected errors (a missing checkpoint, a bad model arg) print one line;
`--traceback` or RWKV_JAX_TRACEBACK=1 shows the full trace.
"""

import sys

_SUBCOMMANDS = ("run", "ls", "validate")


def harness_argv(args: list[str]) -> list[str]:
    """The harness's argv for our arguments: `--model rwkv_jax` added to a run that names no model."""
    args = list(args)
    is_run = not args or args[0] == "run" or args[0] not in _SUBCOMMANDS
    names_model = any(a == "--model" or a.startswith("--model=") for a in args)
    if args and is_run and not names_model:
        args += ["--model", "rwkv_jax"]
    return ["lm-eval", *args]


def main(args: list[str] | None = None) -> None:
    from rwkv_jax.cli import runner as cli
    args = list(sys.argv[1:] if args is None else args)
    traceback = "--traceback" in args
    args = [a for a in args if a != "--traceback"]
    try:
        try:
            from lm_eval.__main__ import cli_evaluate
        except ImportError as e:
            raise ImportError(f"{e}: install the harness with `pip install lm-eval[hf]==0.4.13` (pinned in "
                              "requirements-dev.txt)") from e
        from rwkv_jax.infer import lm_eval_adapter  # noqa: F401  (registers the model `rwkv_jax`)
        saved, sys.argv = sys.argv, harness_argv(args)  # the harness parses sys.argv
        try:
            cli_evaluate()
        finally:
            sys.argv = saved
    except cli.EXPECTED_ERRORS as e:
        if traceback or cli.want_traceback():
            raise
        sys.stderr.write(f"rwkv_jax.cli.lm_eval: error: {cli.error_line(e)}\n"
                         "rwkv_jax.cli.lm_eval: (run with --traceback for the full trace)\n")
        sys.exit(1)


def entry_point():
    main()


if __name__ == "__main__":
    entry_point()

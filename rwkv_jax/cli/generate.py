"""Generate text with an RWKV-4 or RWKV-7 checkpoint: the prompt is prefilled in parallel mode, then tokens are
decoded as an RNN (rwkv_jax.infer.generation).

    python generate.py --checkpoint=WORKDIR --prompt="def main(" --max_new_tokens=200
    python generate.py --checkpoint=RWKV-4-Pile-169M.pth --tokenizer=20B_tokenizer.json \\
        --prompt="The quick" --prompt="Once upon a time" --temperature=0.8 --top_p=0.9 --stop="\\n\\n"
    python generate.py --checkpoint=X --prompt="..." --save_state=s.npz    # then continue:
    python generate.py --checkpoint=X --load_state=s.npz --prompt=" and then"
    python generate.py --checkpoint=BASE --load_state=TUNED/state.npz --prompt="..."   # a tuned initial state
"""

import re
import sys
from pathlib import Path

from absl import flags

from rwkv_jax.cli import common
from rwkv_jax.cli import runner as cli

_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for a batch.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "0: greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string (repeatable), checked on the decoded text.")
_STOP_AT_EOT = flags.DEFINE_bool("stop_at_eot", True, "Stop a row at the end-of-text token.")
_SAVE_STATE = flags.DEFINE_string("save_state", "", "Write the final state and logits to this .npz.")
_LOAD_STATE = flags.DEFINE_string("load_state", "", "Continue from a state .npz written by --save_state, or start "
                                  "every prompt from a state-tuning run's learned state (WORKDIR/state.npz).")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 256, "Tokens per parallel-mode prefill call (>= 1).")


def check_flags() -> None:
    """Usage errors, before anything is loaded."""
    common.require(common.CHECKPOINT)
    common.check_positive(_PREFILL_CHUNK)
    from rwkv_jax.infer.generation import (  # the library's limits, checked before loading
        MAX_NEW_TOKENS_LIMIT,
        SEED_LIMIT,
    )
    common.check_non_negative(_MAX_NEW_TOKENS, _TOP_K, _TEMPERATURE)
    if _MAX_NEW_TOKENS.value >= MAX_NEW_TOKENS_LIMIT:
        raise cli.UsageError(f"--max_new_tokens must be < 2**31 (the decode loop counts in int32), got "
                             f"{_MAX_NEW_TOKENS.value}")
    if not 0 < _TOP_P.value <= 1:
        raise cli.UsageError(f"--top_p must be in (0, 1], got {_TOP_P.value}")
    if not -SEED_LIMIT <= _SEED.value < SEED_LIMIT:
        raise cli.UsageError(f"--seed must be in [-2**63, 2**63) (an int64), got {_SEED.value}")
    if _SAVE_STATE.value:  # found out before the generation, not after it
        path = Path(_SAVE_STATE.value).expanduser()
        if path.is_dir():
            raise cli.UsageError(f"--save_state={_SAVE_STATE.value} is a directory: give a file path (e.g. state.npz)")
        if not path.parent.is_dir():
            raise cli.UsageError(f"--save_state={_SAVE_STATE.value}: the directory {path.parent} does not exist: "
                                 "create it first")


def _unescape(text: str) -> str:
    """Backslash escapes \\n, \\t and \\\\ typed on the command line (other text, non-ASCII included, as is)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    check_flags()
    from rwkv_jax.infer import generation as gen_lib
    from rwkv_jax.model import check_token_ids
    loaded, tokenizer = common.load_checkpoint()
    model = loaded.model
    state = logits = None
    if _LOAD_STATE.value:
        try:
            state, logits = gen_lib.load_state(_LOAD_STATE.value, model)
        except (ValueError, OSError) as e:
            raise type(e)(f"--load_state={e}") from None
    prompts = [_unescape(p) for p in _PROMPT.value] or [""]
    for b, prompt in enumerate(prompts):
        if prompt:
            check_token_ids(tokenizer.encode(prompt), model.config.vocab_size, f"--prompt number {b + 1}")
    stops = [_unescape(s) for s in _STOP.value]
    single = len(prompts) == 1
    if single:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()

    def on_token(row, token, text):
        if text:
            sys.stdout.write(text if single else f"[{row}] {text!r}\n")
            sys.stdout.flush()

    gen = gen_lib.generate(model, tokenizer, prompts, max_new_tokens=_MAX_NEW_TOKENS.value,
                           temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value, seed=_SEED.value,
                           stop=stops, state=state, logits=logits, on_token=on_token, stop_at_eot=_STOP_AT_EOT.value,
                           prefill_chunk=_PREFILL_CHUNK.value)
    if single:
        sys.stdout.write(f"\n[{gen[0].stop_reason}: {len(gen[0].tokens)} tokens]\n")
    else:
        for b, c in enumerate(gen):
            print(f"\n--- [{b}] ({c.stop_reason}, {len(c.tokens)} tokens)\n{c.prompt}{c.text}")
    if _SAVE_STATE.value:
        gen_lib.save_state(_SAVE_STATE.value, gen.state, gen.logits, model_config=model.config)
        print(f"state saved to {_SAVE_STATE.value}")


def entry_point():
    cli.run(main, shared_flags=(common.CHECKPOINT, common.TOKENIZER, common.DTYPE))


if __name__ == "__main__":
    entry_point()

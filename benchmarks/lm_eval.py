"""Benchmark the lm-evaluation-harness model `rwkv_jax` against HF transformers' RwkvForCausalLM through the
harness's own `hf` model class (HFLM), on the same multiple-choice task, same random weights of the 169M
shape (12 x 768, vocab 50277) and the GPT-NeoX tokenizer, in one process: loglikelihood requests per second
and their ratio.

    python benchmarks/lm_eval.py                 # 169M shape, tasks/choice_local's requests x --copies
    python benchmarks/lm_eval.py --small         # 4 x 128: a quick check that it runs

Both models get the same request list, built by the harness from tasks/choice_local (each question's 2 to 4
endings after its context), repeated --copies times with distinct contexts ("Question k. ..."). The adapter
reads contexts from the empty state (context_prefix=none) as HFLM does, so the log-probabilities must agree:
the largest difference is printed.
rwkv_jax is timed after a warm-up run of the same requests (compilation excluded; the first, compiling run
is printed too); HFLM after a warm-up on a few requests. --batch_size is HFLM's requests per forward call
and the adapter's contexts per batch (each with all its endings).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# This file is named like the harness's package: keep its folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "tokenizers" / "gpt-neox-20b.json"),
                   help="the GPT-NeoX-20B tokenizer JSON")
    p.add_argument("--d_model", type=int, default=768)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--copies", type=int, default=None, help="times the task's requests are repeated (default 4; "
                   "1 with --small)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--small", action="store_true", help="4 x 128 model, one copy (a check that it runs)")
    args = p.parse_args(argv)
    if args.small:
        args.d_model, args.n_layer = 128, 4
    if args.copies is None:
        args.copies = 1 if args.small else 4
    return args


def task_requests(copies):
    """The harness's loglikelihood requests of tasks/choice_local, `copies` times."""
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager
    cwd = os.getcwd()
    os.chdir(REPO)  # the task's data path is relative to the repository root
    try:
        manager = TaskManager(include_path=str(REPO / "tasks"), include_defaults=False)
        task = manager.load(["choice_local"])["tasks"]["choice_local"]
        task.build_all_requests(rank=0, world_size=1)
    finally:
        os.chdir(cwd)
    # Each copy's contexts are made distinct, so that no context is shared across copies.
    return [Instance(inst.request_type, inst.doc, (f"Question {k + 1}. {inst.args[0]}", inst.args[1]), inst.idx)
            for k in range(copies) for inst in task.instances]


def random_tensors(d_model, n_layer):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_generate", HERE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.random_official_tensors(50277, d_model, n_layer)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast, RwkvForCausalLM
    from rwkv_jax import weights
    from rwkv_jax.data.tokenizer import HFJsonTokenizer
    from rwkv_jax.lm_eval_adapter import RWKVLM

    if not Path(args.tokenizer).is_file():
        sys.exit(f"lm_eval benchmark: error: tokenizer {args.tokenizer} not found (pass --tokenizer)")
    requests = task_requests(args.copies)
    print(f"{len(requests)} loglikelihood requests (tasks/choice_local x {args.copies}); model {args.n_layer} x "
          f"{args.d_model}, vocab 50277; batch {args.batch_size}; load {os.getloadavg()[0]:.1f}; "
          f"{os.cpu_count()} cpus, torch threads {torch.get_num_threads()}", flush=True)
    tensors = random_tensors(args.d_model, args.n_layer)
    with tempfile.TemporaryDirectory() as tmp:
        weights.write_hf_dir(tensors, Path(tmp) / "hf")
        hf_model = RwkvForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    tok = HFJsonTokenizer(args.tokenizer)
    ours = RWKVLM(checkpoint=weights.model_from_official(tensors), tokenizer=tok, batch_size=args.batch_size,
                  context_prefix="none")
    hflm = HFLM(pretrained=hf_model, tokenizer=PreTrainedTokenizerFast(tokenizer_file=args.tokenizer,
                                                                       eos_token="<|endoftext|>"),
                batch_size=args.batch_size, device="cpu")

    _, cold = timed(lambda: ours.loglikelihood(requests, disable_tqdm=True))
    got, warm = timed(lambda: ours.loglikelihood(requests, disable_tqdm=True))
    hflm.loglikelihood(requests[:4], disable_tqdm=True)  # warm-up
    want, hf_time = timed(lambda: hflm.loglikelihood(requests, disable_tqdm=True))

    n = len(requests)
    diff = max(abs(a[0] - b[0]) for a, b in zip(got, want))
    same_greedy = all(a[1] == b[1] for a, b in zip(got, want))
    print(f"  rwkv_jax (adapter):      {n / warm:8.2f} requests/s  (first run, compiling: {n / cold:.2f}/s)")
    print(f"  HF transformers (HFLM):  {n / hf_time:8.2f} requests/s")
    print(f"  ratio rwkv_jax / HF:     {hf_time / warm:8.2f}x   (first run: {hf_time / cold:.2f}x)")
    print(f"  largest |log p difference|: {diff:.2e}; greedy flags equal: {same_greedy}; "
          f"load after: {os.getloadavg()[0]:.1f}")
    if diff > 1e-3 or not same_greedy:
        sys.exit("lm_eval benchmark: error: the two models disagree (see above)")
    return hf_time / warm


if __name__ == "__main__":
    main()

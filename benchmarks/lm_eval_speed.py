"""Benchmark the lm-evaluation-harness model `rwkv_jax` against HF transformers' RwkvForCausalLM through the
harness's own `hf` model class (HFLM), on the same multiple-choice tasks, same random weights of the 169M
shape (12 x 768, vocab 50277) and the GPT-NeoX tokenizer, in one process: loglikelihood requests per second
and their ratio, per task.

    python benchmarks/lm_eval_speed.py                 # 169M shape: choice_local, story_local, story_local 3-shot
    taskset -c 0 python benchmarks/lm_eval_speed.py --one_thread   # the same on one core (a loaded machine)
    python benchmarks/lm_eval_speed.py --small         # 4 x 128: a quick check that it runs

The tasks: tasks/choice_local (short questions: contexts of 8 to 18 tokens, 2 to 4 endings of 2 to 9 tokens,
as ARC or PIQA without their prompt template) and tasks/story_local (shaped like HellaSwag: contexts of about
50 tokens, 4 endings of 15 to 23). Both models get the same request list, built by the harness from the task
(each question's endings after its context), repeated --copies times with distinct contexts ("Question k.
..."; default 4 copies of choice_local, 2 of story_local, 1 of story_local 3-shot: each question after 3
others with their right endings, as HellaSwag's 10-shot setting of the Open LLM Leaderboard). The adapter
reads contexts from the empty state (context_prefix=none) as HFLM does, so the log-probabilities must agree:
the largest difference is printed.
rwkv_jax is timed after a warm-up run of the same requests (compilation excluded; the first, compiling run
is printed too); HFLM after a warm-up on a few requests. --batch_size is HFLM's requests per forward call
and the adapter's contexts per batch (their continuation rows are scored 4 x batch_size per call).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "tokenizers" / "gpt-neox-20b.json"),
                   help="the GPT-NeoX-20B tokenizer JSON")
    p.add_argument("--d_model", type=int, default=768)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--tasks", default="choice_local,story_local,story_local:3",
                   help="comma-separated tasks of tasks/, NAME:K for K examples before each question")
    p.add_argument("--copies", type=int, default=None, help="times each task's requests are repeated (default 4 "
                   "for choice_local, 2 for story_local; 1 with --small)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="both models' compute dtype: the adapter's dtype model arg, and HF's weights (torch runs "
                        "bf16 matmuls on oneDNN, with AMX where the CPU has it)")
    p.add_argument("--one_thread", action="store_true", help="torch and XLA on one thread each (run it under "
                   "`taskset -c 0`): on a loaded machine torch's spinning threads slow it far more than XLA")
    p.add_argument("--small", action="store_true", help="4 x 128 model, one copy (a check that it runs)")
    args = p.parse_args(argv)
    if args.small:
        args.d_model, args.n_layer = 128, 4
    args.tasks = [(name, int(shots or 0)) for name, _, shots in (t.partition(":") for t in args.tasks.split(","))]
    unknown = [name for name, _ in args.tasks if not (REPO / "tasks" / f"{name}.yaml").is_file()]
    if unknown:
        p.error(f"no task {unknown} in tasks/ (choose from choice_local, story_local)")
    return args


DEFAULT_COPIES = {("choice_local", 0): 4, ("story_local", 0): 2}


def task_requests(copies, name="choice_local", num_fewshot=0):
    """The harness's loglikelihood requests of tasks/NAME, `copies` times, after `num_fewshot` examples."""
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager
    cwd = os.getcwd()
    os.chdir(REPO)  # the task's data path is relative to the repository root
    try:
        manager = TaskManager(include_path=str(REPO / "tasks"), include_defaults=False)
        task = manager.load([name])["tasks"][name]
        if num_fewshot:
            task.set_config(key="num_fewshot", value=num_fewshot)
            task.set_fewshot_seed(1234)
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
    if args.one_thread:  # before jax starts its CPU backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    import torch
    if args.one_thread:
        torch.set_num_threads(1)
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast, RwkvForCausalLM

    from rwkv_jax.data.tokenizer import HFJsonTokenizer
    from rwkv_jax.infer.lm_eval_adapter import RWKVLM
    from rwkv_jax.io import weights

    if not Path(args.tokenizer).is_file():
        sys.exit(f"lm_eval benchmark: error: tokenizer {args.tokenizer} not found (pass --tokenizer)")
    print(f"model {args.n_layer} x {args.d_model}, vocab 50277, {args.dtype}; batch {args.batch_size}; load "
          f"{os.getloadavg()[0]:.1f}; {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}", flush=True)
    tensors = random_tensors(args.d_model, args.n_layer)
    with tempfile.TemporaryDirectory() as tmp:
        weights.write_hf_dir(tensors, Path(tmp) / "hf")
        hf_model = RwkvForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=getattr(torch, args.dtype)).eval()
    tok = HFJsonTokenizer(args.tokenizer)
    ours = RWKVLM(checkpoint=weights.model_from_official(tensors, dtype=args.dtype), tokenizer=tok,
                  batch_size=args.batch_size, context_prefix="none")
    hflm = HFLM(pretrained=hf_model, tokenizer=PreTrainedTokenizerFast(tokenizer_file=args.tokenizer,
                                                                       eos_token="<|endoftext|>"),
                batch_size=args.batch_size, device="cpu")
    ratios = {}
    for name, shots in args.tasks:
        copies = args.copies or (1 if args.small else DEFAULT_COPIES.get((name, shots), 1))
        requests = task_requests(copies, name, shots)
        _, cold = timed(lambda: ours.loglikelihood(requests, disable_tqdm=True))
        got, warm = timed(lambda: ours.loglikelihood(requests, disable_tqdm=True))
        hflm.loglikelihood(requests[:4], disable_tqdm=True)  # warm-up
        want, hf_time = timed(lambda: hflm.loglikelihood(requests, disable_tqdm=True))

        n = len(requests)
        diff = max(abs(a[0] - b[0]) for a, b in zip(got, want))
        same_greedy = all(a[1] == b[1] for a, b in zip(got, want))
        print(f"{name} x {copies}, {shots}-shot: {n} loglikelihood requests")
        print(f"  rwkv_jax (adapter):      {n / warm:8.2f} requests/s  (first run, compiling: {n / cold:.2f}/s)")
        print(f"  HF transformers (HFLM):  {n / hf_time:8.2f} requests/s")
        print(f"  ratio rwkv_jax / HF:     {hf_time / warm:8.2f}x   (first run: {hf_time / cold:.2f}x)")
        print(f"  largest |log p difference|: {diff:.2e}; greedy flags equal: {same_greedy}; "
              f"load after: {os.getloadavg()[0]:.1f}", flush=True)
        # In bf16 the two round differently (up to about 1% of a log-probability here), so only a gross
        # disagreement stops the run; in fp32 they must agree to 1e-3.
        if (diff > 1e-3 or not same_greedy) if args.dtype == "float32" else diff > 1.0:
            sys.exit("lm_eval benchmark: error: the two models disagree (see above)")
        ratios[name, shots] = hf_time / warm
    return ratios

if __name__ == "__main__":
    main()

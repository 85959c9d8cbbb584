"""The command-line programs (rwkv_jax/commands, one CLI style): --help of every entry point, usage errors
(exit 2), expected errors as one line (exit 1), --traceback, bad numbers refused before any work, token ids
checked against the model's vocabulary, readers that never modify a workdir (reports elsewhere when it is
read-only), and eval reading a workdir while a run trains in it."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from rwkv_jax.cli import convert as convert_command
from rwkv_jax.cli import eval as eval_command
from rwkv_jax.cli import generate as generate_command
from rwkv_jax.cli import make_binidx as make_binidx_command
from rwkv_jax.cli import runner as cli
from rwkv_jax.data.binidx import BinIdxWriter
from rwkv_jax.infer import generation as gen_lib
from rwkv_jax.io import weights
from rwkv_jax.model import RWKV, ModelConfig
from tests.helpers import write_byte_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
VOCAB = 260  # the byte tokenizer's 257 tokens fit


def run(args, timeout_s=180, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                          env=kwargs.pop("env", ENV), **kwargs)


def pth_of(tmp_path, vocab_size=VOCAB, name="m.pth", seed=0) -> Path:
    from flax import nnx
    model = RWKV(ModelConfig(vocab_size=vocab_size, d_model=16, n_layer=2), rngs=nnx.Rngs(seed))
    path = tmp_path / name
    weights.write_pth(weights.model_to_official(model), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = write_byte_tokenizer(root / "bytes.json")
    (root / "doc.txt").write_text("hello command line " * 4)
    return {"root": root, "pth": pth_of(root), "tokenizer": tokenizer, "text": root / "doc.txt"}


# --- Every entry point -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, flag", [
    (["train.py"], "--workdir"), (["eval.py"], "--eval_len"), (["generate.py"], "--prefill_chunk"),
    (["-m", "rwkv_jax.cli.generate"], "--prefill_chunk"), (["-m", "rwkv_jax.cli.convert"], "--[no]overwrite"),
    (["-m", "rwkv_jax.cli.make_binidx"], "--output_prefix"),
], ids=["train", "eval", "generate", "generate_module", "convert", "make_binidx"])
def test_help_of_every_entry_point(args, flag):
    result = run([*args, "--help"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert flag in result.stdout and "--[no]traceback" in result.stdout
    assert "    python " in result.stdout.split("flags:")[0]  # the command's docstring with its examples


def test_console_scripts_name_the_commands():
    import tomllib
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == ["rwkv-convert", "rwkv-eval", "rwkv-generate", "rwkv-lm-eval", "rwkv-make-binidx",
                               "rwkv-train"]
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))


@pytest.mark.parametrize("main, args, message", [
    (eval_command.main, [], "--checkpoint is required"),
    (eval_command.main, ["--checkpoint=x", "--eval_len=-5"], "--eval_len must be >= 0, got -5"),
    (eval_command.main, ["--checkpoint=x", "--window=0"], "--window must be >= 1"),
    (eval_command.main, ["--checkpoint=x", "--text_files=a", "--binidx=b"], "at most one of"),
    (eval_command.main, ["--checkpoint=x", "--report=out/"], "--report=out/ names a directory"),
    (eval_command.main, ["--checkpoint=x", "--text_files=a", "--split=test"], "--split is for --tfds"),
    (eval_command.main, ["--checkpoint=x", "--lambada=a", "--max_docs=5"], "--max_docs does not apply to --lambada"),
    (eval_command.main, ["--checkpoint=x", "--window=abc"], "--window"),
    (generate_command.main, ["--checkpoint=x", "--prefill_chunk=-3"], "--prefill_chunk must be >= 1, got -3"),
    (generate_command.main, ["--checkpoint=x", "--prefill_chunk=0"], "--prefill_chunk must be >= 1, got 0"),
    (generate_command.main, ["--checkpoint=x", "--top_p=0"], "--top_p must be in"),
    (generate_command.main, ["--checkpoint=x", "--max_new_tokens=3000000000"], "--max_new_tokens must be < 2**31"),
    (generate_command.main, ["--checkpoint=x", "--seed=99999999999999999999"], "--seed must be in [-2**63, 2**63)"),
    (generate_command.main, ["--checkpoint=x", "--save_state=."], "--save_state=. is a directory"),
    (generate_command.main, ["--checkpoint=x", "--save_state=/no/such/dir/s.npz"], "/no/such/dir does not exist"),
    (convert_command.main, ["only_src"], "expected SRC and DST"),
    (make_binidx_command.main, ["--output_prefix=o", "--tokenizer=t.json"], "--input is required"),
], ids=["eval_checkpoint", "eval_len", "window", "two_sources", "report_dir", "split_without_tfds",
        "lambada_max_docs", "not_an_int", "prefill_negative", "prefill_zero", "top_p", "max_new_tokens_huge",
        "seed_huge", "save_state_dir", "save_state_no_parent", "convert_args", "make_binidx_input"])
def test_usage_errors_exit_2_before_any_work(main, args, message, capsys):
    start = time.time()
    assert cli.call(main, ["prog", *args]) == 2
    assert message in capsys.readouterr().err
    assert time.time() - start < 10  # refused before loading anything (the prefill_chunk=-3 run hung before)


def test_train_refuses_compile_only_flags_without_compile_only(tmp_path):
    """--topology without --compile_only was ignored: a real training run started in the workdir."""
    result = run(["train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", "--topology=v5e:2x2"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--topology is for --compile_only" in result.stderr.strip().splitlines()[0]  # then the --help hint
    assert not (tmp_path / "w").exists()


def test_expected_errors_are_one_line_and_traceback_shows_the_trace(tmp_path):
    missing = tmp_path / "missing.pth"
    plain = run(["eval.py", f"--checkpoint={missing}", "--text_files=x.txt"])
    assert plain.returncode == 1
    lines = plain.stderr.strip().splitlines()
    assert lines[0] == f"eval.py: error: no checkpoint at {missing}" and "Traceback" not in plain.stderr
    assert "--traceback" in lines[-1] and len(lines) == 2
    traced = run(["eval.py", f"--checkpoint={missing}", "--text_files=x.txt", "--traceback"])
    assert traced.returncode == 1 and "Traceback (most recent call last)" in traced.stderr
    assert traced.stderr.strip().splitlines()[-1].startswith("FileNotFoundError: no checkpoint at")


# --- Token ids against the model's vocabulary ------------------------------------------------------------

def test_eval_names_the_binidx_file_with_an_id_outside_the_vocabulary(files, tmp_path, capsys):
    with BinIdxWriter(str(tmp_path / "corpus"), np.uint16) as w:
        w.add([5, 6, 7])
        w.add([8, VOCAB + 40, 9])
    code = cli.call(eval_command.main, ["eval.py", f"--checkpoint={files['pth']}", f"--tokenizer={files['tokenizer']}",
                                        f"--binidx={tmp_path}/corpus", f"--report={tmp_path}/r"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"binidx {tmp_path}/corpus, sequence 1: token id {VOCAB + 40} at token " in err
    assert "is outside the model's vocabulary" in err
    assert not list(tmp_path.glob("r.*"))


def test_generate_refuses_a_state_of_another_vocabulary_in_one_line(files, tmp_path, capsys):
    other = pth_of(tmp_path, vocab_size=300, name="other.pth")
    state, logits = gen_lib.prefill(weights.load_model(other), [[1, 2, 3]])
    gen_lib.save_state(tmp_path / "s.npz", state, logits)
    code = cli.call(generate_command.main, ["generate.py", f"--checkpoint={files['pth']}",
                                            f"--tokenizer={files['tokenizer']}", f"--load_state={tmp_path}/s.npz",
                                            "--prompt=x", "--max_new_tokens=2"])
    err = capsys.readouterr().err
    assert code == 1
    first = err.strip().splitlines()[0]
    assert first.startswith("generate.py: error: --load_state=") and "vocabulary of 300" in first
    assert f"has {VOCAB}" in first


def test_eval_reports_of_two_pth_files_in_one_directory_are_both_kept(files, tmp_path):
    """The default report of a .pth is named after it: a second checkpoint beside it wrote over the first's."""
    for name, seed in (("a.pth", 0), ("b.pth", 1)):
        path = pth_of(tmp_path, name=name, seed=seed)
        assert cli.call(eval_command.main, ["eval.py", f"--checkpoint={path}", f"--tokenizer={files['tokenizer']}",
                                            f"--text_files={files['text']}", "--window=16"]) == 0
    reports = {p.name: json.loads(p.read_text()) for p in (tmp_path / "eval").glob("*.json")}
    assert sorted(reports) == ["a-text.json", "b-text.json"]
    assert reports["a-text.json"]["loss"] != reports["b-text.json"]["loss"]


def test_a_prefill_chunk_below_one_is_refused_by_the_library(files):
    model = weights.load_model(files["pth"])
    for chunk in (0, -3):
        with pytest.raises(ValueError, match="prefill chunk must be >= 1"):
            gen_lib.prefill(model, [[1, 2, 3]], chunk=chunk)


# --- Readers never modify what they read -----------------------------------------------------------------

def as_unprivileged(args: list[str], home: Path) -> list[str]:
    """`args` run as user nobody when this process is root (root writes into read-only directories)."""
    if os.geteuid() != 0:
        return [sys.executable, *args]
    if not shutil.which("setpriv"):
        raise RuntimeError("running as root: the read-only test needs setpriv (util-linux) to drop privileges")
    home.mkdir(exist_ok=True)
    os.chmod(home, 0o777)
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, *args]


def snapshot_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_size) for p in sorted(root.rglob("*"))}


def test_readers_of_a_read_only_place_write_nothing_there(files):
    """eval.py computes the report and writes it under $TMPDIR (said on the console); convert into a
    read-only directory is one line naming the destination."""
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="rwkv-readonly-"))  # outside pytest's root-only tree: user nobody reads it
    os.chmod(base, 0o755)
    ro, tmpdir, home = base / "ro", base / "tmp", base / "home"
    ro.mkdir()
    for src in (files["pth"], files["text"], Path(files["tokenizer"])):
        shutil.copy(src, ro / src.name)
        os.chmod(ro / src.name, 0o444)
    tmpdir.mkdir()
    os.chmod(tmpdir, 0o777)
    os.chmod(ro, 0o555)
    before = snapshot_tree(ro)
    env = dict(ENV, TMPDIR=str(tmpdir), HOME=str(home))
    try:
        result = subprocess.run(as_unprivileged(["eval.py", f"--checkpoint={ro}/m.pth", f"--tokenizer={ro}/bytes.json",
                                                 f"--text_files={ro}/doc.txt", "--window=16"], home),
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        fallback = tmpdir / "rwkv_jax-eval" / "ro"
        assert f"{ro} is read-only: writing the report under {fallback}" in result.stdout
        assert (fallback / "m-text.json").is_file() and (fallback / "m-text.png").is_file()
        converted = subprocess.run(as_unprivileged(["-m", "rwkv_jax.cli.convert", f"{ro}/m.pth", f"{ro}/out"], home),
                                   cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert converted.returncode == 1
        assert converted.stderr.splitlines()[0].startswith(f"convert.py: error: cannot write {ro}/out: ")
        assert "Traceback" not in converted.stderr
        assert snapshot_tree(ro) == before
    finally:
        os.chmod(ro, 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_a_reader_leaves_a_save_in_flight_alone(tmp_path):
    """A trainer's async save in progress: loading the workdir (as eval does) neither deletes its temporary
    directory (before, orbax's cleanup did, and the save failed) nor takes its step."""
    from flax import nnx

    from rwkv_jax.io import workdir
    from rwkv_jax.io.checkpoint import Checkpointer
    from rwkv_jax.train import train_step
    config = ModelConfig(vocab_size=64, d_model=32, n_layer=2)
    run_dir = workdir.Workdir(tmp_path / "run")
    run_dir.path.mkdir()
    run_dir.write_model_config(config)
    params = nnx.state(RWKV(config, rngs=nnx.Rngs(0)))
    big = jax.device_put(np.random.default_rng(0).standard_normal((4096, 8192), np.float32))  # 128 MiB: a slow save
    with Checkpointer(run_dir.checkpoints_dir) as writer:
        writer.save(1, train_step.TrainState(np.int32(1), params, {}), {})
        writer.wait()
        assert writer.save(2, train_step.TrainState(np.int32(2), params, {"big": big}), {})
        in_flight = [p for p in run_dir.checkpoints_dir.iterdir() if p.name.startswith("2.orbax-checkpoint-tmp")]
        assert in_flight, "the save of step 2 finished before the reader could start"
        loaded = workdir.load(run_dir.path)
        assert loaded.step == 1
        assert in_flight[0].exists() or (run_dir.checkpoints_dir / "2").exists()
        writer.wait()
        assert writer.steps == [1, 2]
    assert workdir.load(run_dir.path).step == 2
    # A reader needs neither the optimizer nor the train step (nor their memory: tests/test_checkpoint.py).
    code = ("import sys; from rwkv_jax.io import weights; loaded = weights.load(sys.argv[1]); "
            "print(loaded.format, loaded.step, sorted(m for m in ('rwkv_jax.train.optim', 'rwkv_jax.train.train_step') "
            "if m in sys.modules))")
    result = run(["-c", code, str(run_dir.path)])
    assert result.stdout.split() == ["workdir", "2", "[]"], result.stderr[-2000:]


@pytest.mark.slow
def test_eval_against_a_training_run_leaves_it_running(tmp_path):
    """train.py saving every 2 steps while eval.py reads the workdir three times: the run ends with exit 0."""
    workdir = tmp_path / "run"
    args = ["train.py", "--config=configs/tiny.py", f"--workdir={workdir}", "--config.train.num_steps=300",
            "--config.checkpoint.every_steps=2", "--config.train.batch_size=2", "--config.train.seq_len=32",
            "--config.train.eval_every=0", "--config.train.eval_batches=1", "--config.train.log_every=50",
            f"--config.data.data_dir={tmp_path / 'data'}"]
    with open(tmp_path / "train.out", "w") as out:
        trainer = subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        try:
            reads = 0
            deadline = time.time() + 600
            while reads < 3 and trainer.poll() is None and time.time() < deadline:
                if not (workdir / "checkpoints").is_dir() or not any((workdir / "checkpoints").iterdir()):
                    time.sleep(1)
                    continue
                result = run(["eval.py", f"--checkpoint={workdir}", f"--text_files={REPO}/README.md",
                              "--max_docs=1", "--eval_len=64", "--window=32", f"--report={tmp_path}/r{reads}"])
                assert result.returncode == 0, result.stderr[-3000:]
                reads += 1
            assert reads == 3, "the run ended before eval could read it three times"
            assert trainer.wait(timeout=600) == 0, (tmp_path / "train.out").read_text()[-3000:]
        finally:
            if trainer.poll() is None:
                trainer.kill()
    assert "step 300/300" in (tmp_path / "train.out").read_text()


# --- Console output -------------------------------------------------------------------------------------

def test_console_shows_our_warnings_and_the_log_file_gets_everything(tmp_path):
    import logging

    from absl import logging as absl_logging

    from rwkv_jax.io import logs
    handler = absl_logging.get_absl_handler()
    level, filters = handler.level, list(handler.filters)
    root, absl_logger = logging.getLogger(), logging.getLogger("absl")
    absl_level = absl_logger.level
    absl_logger.setLevel(logging.INFO)  # as absl's default --verbosity=0 sets it in a command
    try:
        logs.quiet_console()

        def record(level, path, message):
            return logging.LogRecord("absl", level, path, 1, message, None, None)

        ours = str(Path(logs.__file__).parent / "checkpoint.py")
        theirs = "/site-packages/tensorflow_datasets/core/dataset_builder.py"
        orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"  # its failures are reported as ours
        shown = [r.getMessage() for r in (record(logging.WARNING, ours, "our warning"),
                                          record(logging.WARNING, theirs, "their warning"),
                                          record(logging.INFO, theirs, "their info"),
                                          record(logging.ERROR, theirs, "their error"),
                                          record(logging.ERROR, orbax, "orbax's error"))
                 if r.levelno >= handler.level and handler.filter(r)]
        assert shown == ["our warning", "their error"]
        logging.getLogger("absl").info("before the file is known")
        logs.log_to_file(tmp_path / "train.log")
        logging.getLogger("absl").info("after")
        text = (tmp_path / "train.log").read_text()
        assert "before the file is known" in text and "after" in text
    finally:
        absl_logger.setLevel(absl_level)
        handler.setLevel(level)
        handler.filters[:] = filters
        if logs._state["file"] is not None:
            root.removeHandler(logs._state["file"])
            logs._state["file"].close()
        logs._state.update(buffer=None, file=None)


def test_absl_verbosity_flag_keeps_everything_on_the_console():
    from absl import flags

    from rwkv_jax.io import logs
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["prog"])
        assert not logs.console_verbosity_requested()
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog", "--verbosity=0"])
        assert logs.console_verbosity_requested()
    finally:
        flags.FLAGS.unparse_flags()

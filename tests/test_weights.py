"""Import/export of RWKV-4 weights (`rwkv_jax.io.weights`, `rwkv_jax.cli.convert`): loading from an official .pth,
an HF transformers directory and our own directory; bit-exact round trips between every pair of formats;
the files we write load in transformers and in the official `rwkv` package; one error listing every
mismatched tensor; no half-written outputs; the CLI; low-precision checkpoints."""

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax  # noqa: E402
import numpy as np
import pytest
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import RwkvForCausalLM  # noqa: E402

from rwkv_jax.cli import convert as convert_command  # noqa: E402
from rwkv_jax.cli import runner as cli
from rwkv_jax.io import weights  # noqa: E402
from tests import peers  # sets RWKV_JIT_ON=0 / RWKV_CUDA_ON=0 before anything imports `rwkv`


def convert_main(args: list[str]) -> int:
    """The convert command in this process: its exit code."""
    return cli.call(convert_command.main, ["convert", *args])
from rwkv_jax.model import ModelConfig  # noqa: E402

FORMATS = ("pth", "hf", "rwkv_jax")
V, D, L = 61, 16, 2
PTH_ATT, PTH_FFN = 24, 40  # the .pth source: d_att != D and d_ffn != 4D
HF_FFN = 48  # the transformers-written source: d_ffn = 3D
TOKENS = np.random.default_rng(123).integers(0, V, size=(2, 5)).astype(np.int32)


# --- Independent statement of the official format -------------------------------------------------

def official_shapes(vocab, d_model, n_layer, d_att, d_ffn) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official RWKV-4 checkpoint (RWKV-LM `model.py` names, torch [out, in])."""
    shapes = {"emb.weight": (vocab, d_model), "blocks.0.ln0.weight": (d_model,),
              "blocks.0.ln0.bias": (d_model,), "ln_out.weight": (d_model,), "ln_out.bias": (d_model,),
              "head.weight": (vocab, d_model)}
    for i in range(n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[f"{b}{ln}.weight"] = shapes[f"{b}{ln}.bias"] = (d_model,)
        shapes[b + "att.time_decay"] = shapes[b + "att.time_first"] = (d_att,)
        for mix in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"):
            shapes[b + mix] = (1, 1, d_model)
        shapes.update({b + "att.key.weight": (d_att, d_model), b + "att.value.weight": (d_att, d_model),
                       b + "att.receptance.weight": (d_att, d_model), b + "att.output.weight": (d_model, d_att),
                       b + "ffn.key.weight": (d_ffn, d_model), b + "ffn.receptance.weight": (d_model, d_model),
                       b + "ffn.value.weight": (d_model, d_ffn)})
    return shapes


_HF_PARTS = {"att": "attention", "ffn": "feed_forward", "ln0": "pre_ln", "time_mix_k": "time_mix_key",
             "time_mix_v": "time_mix_value", "time_mix_r": "time_mix_receptance"}


def hf_name(official: str) -> str:
    """transformers' RwkvForCausalLM name of an official tensor."""
    if official == "head.weight":
        return official
    if official == "emb.weight":
        return "rwkv.embeddings.weight"
    return "rwkv." + ".".join(_HF_PARTS.get(part, part) for part in official.split("."))


def random_official(shapes, seed) -> dict[str, np.ndarray]:
    """fp32 tensors in realistic ranges (decays, mixes in [0, 1), LayerNorms near identity)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if "time_decay" in name:
            a = rng.uniform(-3, 1, shape)
        elif "time_first" in name:
            a = rng.standard_normal(shape)
        elif "time_mix" in name:
            a = rng.uniform(0, 1, shape)
        elif len(shape) == 1:
            a = (1.0 if name.endswith("weight") else 0.0) + 0.2 * rng.standard_normal(shape)
        else:
            a = (3.0 if name == "emb.weight" else 1.0) * rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[name] = a.astype(np.float32)
    return out


# --- Helpers --------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]


def logits(model) -> np.ndarray:
    graphdef, state = nnx.split(model)
    # As numpy, so that device-committed (orbax-restored) and uncommitted arrays share one compilation.
    return np.asarray(_forward(graphdef, jax.tree.map(np.asarray, state), TOKENS))


def dims(config: ModelConfig) -> tuple:
    return config.vocab_size, config.d_model, config.n_layer, config.att_width, config.ffn_width


def assert_bit_identical(a: np.ndarray, b: np.ndarray, what=""):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, a.dtype, b.shape, b.dtype)
    assert np.array_equal(a, b), what
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{what}: differs in bits (e.g. -0.0)"


def assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name in want:
        assert_bit_identical(np.asarray(got[name]), np.asarray(want[name]), name)


def out_path(tmp_path: Path, fmt: str, stem="out") -> Path:
    return tmp_path / (f"{stem}.pth" if fmt == "pth" else stem)


def snapshot(path: Path) -> dict:
    """Relative path -> bytes of every file at/under `path`."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- Fixtures: one source checkpoint per format ---------------------------------------------------

@pytest.fixture(scope="module")
def pth_tensors():
    return random_official(official_shapes(V, D, L, PTH_ATT, PTH_FFN), seed=0)


@pytest.fixture(scope="module")
def hf_model():
    return peers.random_hf_model(vocab_size=V, d_model=D, n_layer=L, d_ffn=HF_FFN, seed=1)


@pytest.fixture(scope="module")
def own_model():
    """A model whose config leaves d_att/d_ffn at their defaults (D and 4D), as a natively built one has."""
    model = weights.model_from_official(random_official(official_shapes(V, D, L, D, 4 * D), seed=2),
                                        d_att=None, d_ffn=None)
    assert (model.config.d_att, model.config.d_ffn) == (None, None)
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory, pth_tensors, hf_model, own_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    torch.save({n: torch.from_numpy(a) for n, a in pth_tensors.items()}, root / "official.pth")
    hf_model.save_pretrained(root / "hf")
    weights.write_model(own_model, root / "own", "rwkv_jax")
    return {"pth": root / "official.pth", "hf": root / "hf", "rwkv_jax": root / "own"}


@pytest.fixture(scope="module")
def loaded(sources) -> dict:
    return {fmt: weights.load_model(path) for fmt, path in sources.items()}


# --- Loading --------------------------------------------------------------------------------------

def test_load_official_pth_infers_dims_and_holds_exact_tensors(sources, pth_tensors, loaded):
    model = loaded["pth"]
    c = model.config
    assert (c.vocab_size, c.d_model, c.n_layer) == (V, D, L)
    assert (c.att_width, c.ffn_width) == (PTH_ATT, PTH_FFN)  # neither D nor 4D: read from the tensors
    assert (c.d_att, c.d_ffn) == (PTH_ATT, PTH_FFN)
    assert weights.detect_format(sources["pth"]) == "pth"
    assert_same_tensors(weights.model_to_official(model), pth_tensors)
    for path, leaf in jax.tree.leaves_with_path(nnx.state(model, nnx.Param)):
        assert leaf.dtype == np.float32, path
    assert logits(model).shape == (*TOKENS.shape, V)


def test_load_hf_dir_written_by_transformers(sources, hf_model, loaded):
    model = loaded["hf"]
    c = model.config
    assert weights.detect_format(sources["hf"]) == "hf"
    assert dims(c) == (V, D, L, D, HF_FFN)
    assert c.layer_norm_eps == hf_model.config.layer_norm_epsilon
    ours = weights.model_to_official(model)
    hf_state = {n: t.numpy() for n, t in hf_model.state_dict().items()}
    assert sorted(hf_name(n) for n in ours) == sorted(hf_state)
    for name, array in ours.items():
        assert_bit_identical(array, hf_state[hf_name(name)], name)
    np.testing.assert_allclose(logits(model), peers.hf_logits(hf_model, TOKENS), rtol=0, atol=1e-5)


def test_load_own_dir(sources, own_model, loaded):
    model = loaded["rwkv_jax"]
    assert weights.detect_format(sources["rwkv_jax"]) == "rwkv_jax"
    assert model.config == own_model.config
    assert dims(model.config) == (V, D, L, D, 4 * D)
    assert_same_tensors(weights.model_to_official(model), weights.model_to_official(own_model))
    assert_bit_identical(logits(model), logits(own_model))


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_model_applies_config_overrides(sources, fmt):
    model = weights.load_model(sources[fmt], dtype="bfloat16", wkv_form="chunked", wkv_chunk_len=4)
    assert (model.config.dtype, model.config.wkv_form, model.config.wkv_chunk_len) == ("bfloat16", "chunked", 4)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# --- Round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dst", FORMATS)
@pytest.mark.parametrize("src", FORMATS)
def test_round_trip_is_bit_exact(src, dst, loaded, tmp_path):
    model = loaded[src]
    path = out_path(tmp_path, dst)
    weights.write_model(model, path, dst)
    assert weights.detect_format(path) == dst
    again = weights.load_model(path)
    assert dims(again.config) == dims(model.config)
    assert_same_tensors(weights.model_to_official(again), weights.model_to_official(model))
    assert_bit_identical(logits(again), logits(model))


@pytest.mark.parametrize("chain", [("pth", "rwkv_jax", "hf", "pth"), ("hf", "pth", "rwkv_jax", "hf"),
                                   ("rwkv_jax", "hf", "pth", "rwkv_jax")], ids="->".join)
def test_conversion_chain_is_bit_exact(chain, sources, loaded, tmp_path):
    start = loaded[chain[0]]
    want_tensors, want_logits = weights.model_to_official(start), logits(start)
    model = weights.load_model(sources[chain[0]])
    for i, fmt in enumerate(chain[1:]):
        path = out_path(tmp_path, fmt, stem=f"step{i}")
        weights.write_model(model, path, fmt)
        model = weights.load_model(path)
        assert_same_tensors(weights.model_to_official(model), want_tensors)
        assert_bit_identical(logits(model), want_logits, f"logits after {fmt}")


def test_read_official_agrees_for_all_formats(sources, loaded, tmp_path):
    want = weights.model_to_official(loaded["pth"])
    for fmt in FORMATS:
        path = out_path(tmp_path, fmt, stem=f"copy_{fmt}")
        weights.write_model(loaded["pth"], path, fmt)
        assert_same_tensors(weights.read_official(path), want)


# --- Peers load what we write ---------------------------------------------------------------------

def test_written_hf_dir_loads_in_transformers(loaded, tmp_path):
    model = loaded["pth"]  # d_att != D exercises attention_hidden_size
    weights.write_model(model, tmp_path / "hf", "hf")
    hf, info = RwkvForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    cfg = hf.config
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == ("rwkv", V, D, L)
    assert (cfg.attention_hidden_size, cfg.intermediate_size) == (PTH_ATT, PTH_FFN)
    assert hf.dtype == torch.float32
    ours = weights.model_to_official(model)
    hf_state = {n: t.numpy() for n, t in hf.state_dict().items()}
    for name, array in ours.items():
        assert_bit_identical(hf_state[hf_name(name)], array, name)
    with torch.no_grad():  # HF's cached state is sized by hidden_size, so it can't run d_att != D with a cache
        theirs = hf(torch.from_numpy(TOKENS.astype(np.int64)), use_cache=False).logits.numpy()
    np.testing.assert_allclose(logits(model), theirs, rtol=0, atol=1e-5)


def test_written_pth_loads_in_official_rwkv_package(loaded, tmp_path):
    model = loaded["hf"]
    weights.write_model(model, tmp_path / "m.pth", "pth")
    raw = torch.load(tmp_path / "m.pth", map_location="cpu", weights_only=True)
    assert sorted(raw) == sorted(official_shapes(V, D, L, D, HF_FFN))
    assert all(tuple(t.shape) == official_shapes(V, D, L, D, HF_FFN)[n] for n, t in raw.items())
    theirs, _ = peers.official_rnn(tmp_path / "m.pth", TOKENS[0])
    np.testing.assert_allclose(logits(model)[0], theirs, rtol=0, atol=1e-5)


# --- Errors ---------------------------------------------------------------------------------------

UNKNOWN = ["blocks.0.att.bogus", "extra.scale"]
MISSING = ["blocks.1.ffn.value.weight", "ln_out.bias"]
MISSHAPED = {"blocks.0.att.time_first": (PTH_ATT - 1,), "blocks.1.att.output.weight": (PTH_ATT, D)}


def _corrupt(tensors, unknown=(), missing=(), misshaped=()):
    out = dict(tensors)
    for name in unknown:
        out[name] = np.zeros((3,), np.float32)
    for name in missing:
        del out[name]
    for name in misshaped:
        out[name] = np.zeros(MISSHAPED[name], np.float32)
    return out


def test_unknown_missing_and_misshaped_tensors_are_listed_in_one_error(pth_tensors, tmp_path):
    bad = _corrupt(pth_tensors, UNKNOWN, MISSING, MISSHAPED)
    with pytest.raises(weights.WeightsMismatchError) as caught:
        weights.model_from_official(bad)
    message = str(caught.value)
    for name in UNKNOWN + MISSING + list(MISSHAPED):
        assert name in message
    assert f"{(PTH_ATT - 1,)}" in message and f"{(PTH_ATT,)}" in message  # got and expected shapes
    assert f"{(PTH_ATT, D)}" in message and f"{(D, PTH_ATT)}" in message
    # the same through a file on disk
    torch.save({n: torch.from_numpy(a) for n, a in bad.items()}, tmp_path / "bad.pth")
    with pytest.raises(weights.WeightsMismatchError) as caught:
        weights.load_model(tmp_path / "bad.pth")
    assert all(name in str(caught.value) for name in UNKNOWN + MISSING + list(MISSHAPED))


@pytest.mark.parametrize("kind", ["unknown", "missing", "misshaped"])
def test_each_kind_of_mismatch_alone_is_reported(kind, pth_tensors):
    chosen = {"unknown": UNKNOWN, "missing": MISSING, "misshaped": list(MISSHAPED)}
    bad = _corrupt(pth_tensors, **{kind: chosen[kind][:1]})
    with pytest.raises(weights.WeightsMismatchError) as caught:
        weights.model_from_official(bad)
    message = str(caught.value)
    assert chosen[kind][0] in message
    for other in UNKNOWN + MISSING + list(MISSHAPED):  # no false reports
        if other != chosen[kind][0]:
            assert other not in message, other


def test_mismatch_in_hf_dir_is_reported(sources, tmp_path):
    from safetensors.numpy import load_file, save_file
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text((sources["hf"] / "config.json").read_text())
    tensors = load_file(sources["hf"] / "model.safetensors")
    tensors["rwkv.blocks.0.attention.bogus"] = np.zeros(3, np.float32)
    del tensors["rwkv.blocks.1.feed_forward.key.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(weights.WeightsMismatchError, match="(?s)bogus.*blocks.1.ffn.key.weight"):
        weights.load_model(tmp_path / "hf")


def test_wrong_rank_embedding_is_a_mismatch_error(pth_tensors):
    bad = dict(pth_tensors, **{"emb.weight": pth_tensors["emb.weight"][None]})
    with pytest.raises(weights.WeightsMismatchError, match="emb.weight"):
        weights.model_from_official(bad)


def test_state_dict_of_another_architecture_is_rejected(tmp_path):
    torch.save({"transformer.wte.weight": torch.zeros(5, 4)}, tmp_path / "gpt.pth")
    with pytest.raises(weights.WeightsMismatchError, match="not an RWKV-4 checkpoint"):
        weights.load_model(tmp_path / "gpt.pth")


def test_non_rwkv_hf_config_is_rejected(tmp_path):
    from safetensors.numpy import save_file
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 4}))
    save_file({"wte.weight": np.zeros((5, 4), np.float32)}, tmp_path / "gpt2" / "model.safetensors")
    with pytest.raises(weights.WeightsMismatchError, match="model_type='gpt2'.*'rwkv'"):
        weights.load_model(tmp_path / "gpt2")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*does_not_exist"):
        weights.load_model(tmp_path / "does_not_exist.pth")


@pytest.mark.parametrize("name", ["model.safetensors", "weights.bin", "notes.txt"])
def test_unrecognised_file_type_is_an_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not an official .pth"):
        weights.load_model(tmp_path / name)


def test_directory_without_a_config_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        weights.load_model(tmp_path / "empty")


def test_config_without_parameters_is_an_error_naming_what_is_missing(sources, tmp_path):
    """rwkv_config.json without params/ (a training workdir whose checkpoints/ was removed, or a partly
    copied directory): orbax said only 'Checkpoint at DIR/params not found.'"""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / weights.CONFIG_FILE).write_text((sources["rwkv_jax"] / weights.CONFIG_FILE).read_text())
    with pytest.raises(FileNotFoundError, match=r"has rwkv_config.json but neither params/ .* nor checkpoints/"):
        weights.load_model(tmp_path / "d")


def test_unknown_output_format_is_an_error_and_writes_nothing(loaded, tmp_path):
    with pytest.raises(ValueError, match="unknown format 'gguf'"):
        weights.write_model(loaded["pth"], tmp_path / "x", "gguf")
    assert list(tmp_path.iterdir()) == []


# --- Nothing half-written -------------------------------------------------------------------------

class SimulatedFailure(OSError):
    pass


def _make_writer_fail_midway(monkeypatch, fmt):
    """Patch the library call that writes the weights to write part of its output, then raise."""
    if fmt == "pth":
        def broken_save(obj, f, *args, **kwargs):
            Path(f).write_bytes(b"partial")
            raise SimulatedFailure("disk full")
        monkeypatch.setattr(torch, "save", broken_save)
    elif fmt == "hf":
        import safetensors.numpy

        def broken_save_file(tensors, filename, *args, **kwargs):
            Path(filename).write_bytes(b"partial")
            raise SimulatedFailure("disk full")
        monkeypatch.setattr(safetensors.numpy, "save_file", broken_save_file)
    else:
        import orbax.checkpoint as ocp

        def broken_save(self, directory, *args, **kwargs):
            Path(directory).mkdir(parents=True)
            (Path(directory) / "partial").write_bytes(b"partial")
            raise SimulatedFailure("disk full")
        monkeypatch.setattr(ocp.StandardCheckpointer, "save", broken_save)


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_write_leaves_nothing_behind(fmt, loaded, tmp_path, monkeypatch):
    _make_writer_fail_midway(monkeypatch, fmt)
    with pytest.raises(SimulatedFailure):
        weights.write_model(loaded["pth"], out_path(tmp_path, fmt), fmt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_overwrite_keeps_the_existing_destination(fmt, loaded, tmp_path, monkeypatch):
    path = out_path(tmp_path, fmt)
    weights.write_model(loaded["pth"], path, fmt)
    before = snapshot(path)
    _make_writer_fail_midway(monkeypatch, fmt)
    with pytest.raises(SimulatedFailure):
        weights.write_model(loaded["hf"], path, fmt, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert snapshot(path) == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_existing_destination_needs_overwrite(fmt, loaded, tmp_path):
    path = out_path(tmp_path, fmt)
    weights.write_model(loaded["pth"], path, fmt)
    if path.is_dir():
        (path / "stale.txt").write_text("from an older write")
    before = snapshot(path)
    with pytest.raises(FileExistsError, match="already exists"):
        weights.write_model(loaded["hf"], path, fmt)
    assert snapshot(path) == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]

    weights.write_model(loaded["hf"], path, fmt, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert not (path / "stale.txt").exists()
    assert_same_tensors(weights.read_official(path), weights.model_to_official(loaded["hf"]))


# --- CLI ------------------------------------------------------------------------------------------

def test_cli_pth_to_rwkv_jax_dir_by_default(sources, pth_tensors, tmp_path, capsys):
    assert convert_main([str(sources["pth"]), str(tmp_path / "out")]) == 0
    assert weights.detect_format(tmp_path / "out") == "rwkv_jax"
    assert_same_tensors(weights.read_official(tmp_path / "out"), pth_tensors)
    out = capsys.readouterr().out
    assert f"d_ffn={PTH_FFN}" in out and "done" in out


def test_cli_dir_to_hf(sources, loaded, tmp_path):
    assert convert_main([str(sources["rwkv_jax"]), str(tmp_path / "hf"), "--to=hf"]) == 0
    assert weights.detect_format(tmp_path / "hf") == "hf"
    assert_same_tensors(weights.read_official(tmp_path / "hf"), weights.model_to_official(loaded["rwkv_jax"]))


def test_cli_hf_to_pth_from_the_suffix(sources, loaded, tmp_path):
    assert convert_main([str(sources["hf"]), str(tmp_path / "x.pth")]) == 0
    raw = torch.load(tmp_path / "x.pth", map_location="cpu", weights_only=True)
    assert_same_tensors({n: t.numpy() for n, t in raw.items()}, weights.model_to_official(loaded["hf"]))


def test_cli_missing_source_fails_cleanly(tmp_path, capsys):
    missing = tmp_path / "nowhere.pth"
    assert convert_main([str(missing), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "convert: error:" in err and str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_corrupt_pth_fails_cleanly(tmp_path, capsys):
    (tmp_path / "corrupt.pth").write_bytes(b"not a torch checkpoint")
    assert convert_main([str(tmp_path / "corrupt.pth"), str(tmp_path / "out")]) == 1
    assert "error:" in capsys.readouterr().err


def test_cli_refuses_to_overwrite_its_source_or_a_directory_holding_it(sources, tmp_path, capsys):
    """`convert WORKDIR WORKDIR --overwrite` replaced the training run (checkpoints, metrics) by an rwkv_jax
    directory; `convert DIR/own PARENT --overwrite` would replace the parent with everything in it."""
    src = tmp_path / "own"
    shutil.copytree(sources["rwkv_jax"], src)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for dst in (src, tmp_path, f"{src}/"):
        assert convert_main([str(src), str(dst), "--overwrite"]) == 2
        assert "would replace SRC" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_cli_existing_destination_needs_overwrite(sources, pth_tensors, tmp_path, capsys):
    (tmp_path / "x.pth").write_bytes(b"old")
    assert convert_main([str(sources["pth"]), str(tmp_path / "x.pth")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "x.pth").read_bytes() == b"old"
    assert convert_main([str(sources["pth"]), str(tmp_path / "x.pth"), "--overwrite"]) == 0
    assert_same_tensors(weights.read_official(tmp_path / "x.pth"), pth_tensors)


def test_cli_module_entry_point_runs(sources, pth_tensors, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "rwkv_jax.cli.convert", str(sources["pth"]), str(tmp_path / "hf"),
                             "--to", "hf"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout
    assert_same_tensors(weights.read_official(tmp_path / "hf"), pth_tensors)


# --- Low-precision checkpoints --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_pth_loads_into_fp32_with_exact_values(dtype, pth_tensors, tmp_path):
    stored = {n: torch.from_numpy(a).to(dtype) for n, a in pth_tensors.items()}
    torch.save(stored, tmp_path / "low.pth")
    model = weights.load_model(tmp_path / "low.pth")
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    want = {n: t.float().numpy() for n, t in stored.items()}
    assert any(not np.array_equal(want[n], pth_tensors[n]) for n in want)  # rounding really happened
    assert_same_tensors(weights.model_to_official(model), want)


def test_legacy_format_pth_loads(pth_tensors, tmp_path):
    torch.save({n: torch.from_numpy(a) for n, a in pth_tensors.items()}, tmp_path / "legacy.pth",
               _use_new_zipfile_serialization=False)
    assert_same_tensors(weights.model_to_official(weights.load_model(tmp_path / "legacy.pth")), pth_tensors)


def test_bf16_hf_dir_loads_into_fp32_with_exact_values(hf_model, tmp_path):
    import copy
    low = copy.deepcopy(hf_model).to(torch.bfloat16)
    low.save_pretrained(tmp_path / "hf_bf16")
    model = weights.load_model(tmp_path / "hf_bf16")
    ours = weights.model_to_official(model)
    for name, t in low.state_dict().items():
        official = next(n for n in ours if hf_name(n) == name)
        assert_bit_identical(ours[official], t.float().numpy(), name)

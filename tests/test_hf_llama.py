"""Hugging Face Llama out and in: `edit-jax export`, `model.init_from`, and (where installed)
transformers' own LlamaForCausalLM and AutoTokenizer on the export."""

import json
import random
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from edit_jax import data as data_lib
from edit_jax.cli import main
from edit_jax.config import load_config
from edit_jax.data import load_tokenizer
from edit_jax.hf_export import EXPORT_FILES
from edit_jax.hf_import import load_params
from edit_jax.hf_tokenizer import byte_tokenizer, write_tokenizer
from edit_jax.model import loss_fn
from edit_jax.program import build_program
from edit_jax.tokenizer import ByteTokenizer, load_tokenizer_file
from runs import EDIT, SMALL, VOCAB, final_state, read_rows, train

# EDiT warms up for 2 steps: checkpoint 2 holds equal replicas (exported as their mean),
# checkpoints 4 and 6 are past the warm-up (exported as phi).
RUN = (*EDIT, "run.steps=6", "run.checkpoint_every=2")
LAYERS = 2
# Our leaf -> (Hugging Face name, transposed), written out here independently of hf_weights.
NAMES = {("embed", "embedding"): ("model.embed_tokens.weight", False),
         ("final_norm", "scale"): ("model.norm.weight", False),
         ("lm_head", "kernel"): ("lm_head.weight", True)}
LAYER_NAMES = {("attn_norm", "scale"): ("input_layernorm.weight", False),
               ("mlp_norm", "scale"): ("post_attention_layernorm.weight", False),
               ("attn", "wq", "kernel"): ("self_attn.q_proj.weight", True),
               ("attn", "wk", "kernel"): ("self_attn.k_proj.weight", True),
               ("attn", "wv", "kernel"): ("self_attn.v_proj.weight", True),
               ("attn", "wo", "kernel"): ("self_attn.o_proj.weight", True),
               ("mlp", "w_gate", "kernel"): ("mlp.gate_proj.weight", True),
               ("mlp", "w_up", "kernel"): ("mlp.up_proj.weight", True),
               ("mlp", "w_down", "kernel"): ("mlp.down_proj.weight", True)}


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _expected_tensors(params) -> dict:
    """The Hugging Face tensors of our (numpy) params: layers split, kernels transposed."""
    tensors = {name: _at(params, path).T if t else _at(params, path)
               for path, (name, t) in NAMES.items()}
    for path, (name, t) in LAYER_NAMES.items():
        for i in range(LAYERS):
            value = _at(params["layers"], path)[i]
            tensors[f"model.layers.{i}.{name}"] = value.T if t else value
    return tensors


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("hf") / "run"
    train(run, *RUN)
    return run


@pytest.fixture(scope="module")
def phi(run_dir):
    """phi of the newest checkpoint (6), restored by the training code."""
    return _numpy(final_state(run_dir, 6, *RUN).outer.phi)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    return out


def _program(init_from, *overrides):
    cfg = load_config(None, [*SMALL, f"model.init_from={init_from}", *overrides])
    return build_program(cfg, cfg.model.vocab_size)


def test_export_writes_the_hugging_face_files(exported, phi):
    assert sorted(p.name for p in exported.iterdir()) == sorted(EXPORT_FILES)
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "vocab_size", "eos_token_id", "tie_word_embeddings")} == {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB,
        "eos_token_id": 256, "tie_word_embeddings": False}
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == 256
    settings = json.loads((exported / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert settings["eos_token"] == "<|endoftext|>"
    tokenizer = load_tokenizer_file(str(exported / "tokenizer.json"))
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (VOCAB, 256)

    tensors, expected = load_file(exported / "model.safetensors"), _expected_tensors(phi)
    assert sorted(tensors) == sorted(expected) and len(tensors) == 3 + 9 * LAYERS
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    assert tensors["lm_head.weight"].shape == (VOCAB, 64)
    for name, value in expected.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)


def test_export_before_the_local_phase_is_the_replicas_mean(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--step", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exported step 2" in printed and "(mean of 2 replicas," in printed
    params = _numpy(final_state(run_dir, 2, *RUN).params)
    expected = _expected_tensors(jax.tree.map(lambda x: x.mean(axis=0), params))
    tensors = load_file(out / "model.safetensors")
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    assert main(["export", str(run_dir), "--out", str(out)]) == 0  # over an earlier export
    printed = capsys.readouterr().out
    assert "exported step 6" in printed and "(phi," in printed


def test_byte_tokenizer_export_encodes_like_ours():
    ours, theirs = ByteTokenizer(), byte_tokenizer()
    assert theirs.get_vocab_size(with_added_tokens=True) == ours.vocab_size
    assert theirs.token_to_id("<|endoftext|>") == ours.eos_id
    rng = random.Random(0)
    planes = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    for _ in range(300):
        text = "".join(chr(rng.randint(*rng.choice(planes))) for _ in range(rng.randint(0, 50)))
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert ids == ours.encode(text).tolist(), text
        assert theirs.decode(ids) == text


def test_a_tokenizer_json_is_exported_as_it_is(tmp_path):
    source = tmp_path / "mine.json"
    _wider_tokenizer().save(str(source))
    (tmp_path / "out").mkdir()
    data = load_config(None, [f"data.tokenizer={source}"]).data
    assert write_tokenizer(data, tmp_path / "out", 64) == 256
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == source.read_bytes()
    settings = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (settings["eos_token"], settings["model_max_length"]) == ("<|endoftext|>", 64)


def test_init_from_takes_the_architecture_from_config_json(exported):
    model = load_config(None, [f"model.init_from={exported}"]).model
    assert (model.d_model, model.n_layers, model.n_heads, model.n_kv_heads, model.d_ff,
            model.vocab_size, model.max_seq_len) == (64, LAYERS, 4, 2, 128, VOCAB, 512)


def test_init_from_round_trip_is_bit_identical(exported, phi):
    program = _program(exported)
    loaded = load_params(str(exported), program)
    assert jax.tree.map(lambda x: x.sharding.spec, loaded) == program.layout.state_specs.outer.phi
    jax.tree.map(np.testing.assert_array_equal, _numpy(loaded), phi)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 32))
    logits = [np.asarray(nnx.merge(program.graphdef, params)(tokens)[0])
              for params in (jax.tree.map(np.asarray, loaded), phi)]
    np.testing.assert_array_equal(*logits)


def _split_checkpoint(exported, out, convert=lambda x: x, tied=False):
    """A copy of the export as two safetensors files and an index, or (convert) in another
    dtype, or (tied) without lm_head under tie_word_embeddings."""
    out.mkdir()
    config = json.loads((exported / "config.json").read_text())
    tensors = {k: convert(v) for k, v in load_file(exported / "model.safetensors").items()}
    if tied:
        config["tie_word_embeddings"] = True
        del tensors["lm_head.weight"]
    (out / "config.json").write_text(json.dumps(config))
    return tensors


@pytest.mark.parametrize("variant", ["sharded", "bf16", "tied"])
def test_init_from_other_checkpoints(exported, phi, tmp_path, variant):
    out = tmp_path / variant
    expected = dict(phi)
    if variant == "sharded":
        tensors = _split_checkpoint(exported, out)
        names = sorted(tensors)
        files = {"model-00001-of-00002.safetensors": names[::2],
                 "model-00002-of-00002.safetensors": names[1::2]}
        for file, part in files.items():
            save_file({n: tensors[n] for n in part}, out / file, metadata={"format": "pt"})
        weight_map = {n: file for file, part in files.items() for n in part}
        (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif variant == "bf16":
        tensors = _split_checkpoint(exported, out, lambda x: x.astype(ml_dtypes.bfloat16))
        save_file(tensors, out / "model.safetensors")
        expected = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), phi)
    else:
        save_file(_split_checkpoint(exported, out, tied=True), out / "model.safetensors")
        expected = {**phi, "lm_head": {"kernel": phi["embed"]["embedding"].T}}
    loaded = _numpy(load_params(str(out), _program(out)))
    assert loaded["embed"]["embedding"].dtype == np.float32
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)


def _assert_one_line_error(capsys, message):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def _variant(exported, out, edit_config=None, tensors=None, tokenizer=None):
    shutil.copytree(exported, out)
    if edit_config:
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(edit_config(config)))
    if tensors:
        save_file(tensors(load_file(out / "model.safetensors")), out / "model.safetensors")
    if tokenizer:
        tokenizer.save(str(out / "tokenizer.json"))
    return out


def _wider_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    return tokenizer


def _bad_q(tensors):
    return {**tensors, "model.layers.1.self_attn.q_proj.weight": np.zeros((64, 32), np.float32)}


@pytest.mark.parametrize("case, overrides, message", [
    ("mismatch", ["model.d_model=128"], "model.d_model=128 but {dir}/config.json has "
                                        "hidden_size=64; drop model.d_model"),
    ("missing", [], "no-such-dir/config.json not found"),
    ("rope_scaling", [], "rope_scaling is set"),
    ("bias", [], "attention_bias is true"),
    ("no_weights", [], "has neither model.safetensors nor model.safetensors.index.json"),
    ("bad_shape", [], "tensor model.layers.1.self_attn.q_proj.weight has shape (64, 32) but "
                      "its config.json implies (64, 64)"),
    ("vocab", ["data.tokenizer=byte"], "data.tokenizer has 257 ids but"),
])
def test_bad_init_from_is_a_one_line_error(exported, tmp_path, capsys, case, overrides, message):
    target = tmp_path / case
    if case == "missing":
        target = tmp_path / "no-such-dir"
    elif case == "rope_scaling":
        _variant(exported, target, lambda c: {**c, "rope_scaling": {"rope_type": "linear",
                                                                     "factor": 2.0}})
    elif case == "bias":
        _variant(exported, target, lambda c: {**c, "attention_bias": True})
    elif case == "no_weights":
        _variant(exported, target)
        (target / "model.safetensors").unlink()
    elif case == "bad_shape":
        _variant(exported, target, tensors=_bad_q)
    elif case == "vocab":
        _variant(exported, target, tokenizer=_wider_tokenizer())
    else:
        target = exported
    code = main(["train", *SMALL, f"run.run_dir={tmp_path / 'run'}", "run.steps=1",
                 f"model.init_from={target}", *overrides])
    assert code == 2
    _assert_one_line_error(capsys, message.format(dir=target))


@pytest.mark.parametrize("case, message", [
    ("no_run", "run directory {tmp}/nope not found"),
    ("no_checkpoint", "has no checkpoint yet"),
    ("unknown_step", "has no checkpoint of step 3; pass --step one of 2, 4, 6"),
    ("not_an_export", "is a non-empty directory that is not an export"),
    ("unwritable", "cannot create --out"),
])
def test_bad_export_is_a_one_line_error(run_dir, tmp_path, capsys, case, message):
    run, out, step = run_dir, tmp_path / "out", []
    if case == "no_run":
        run = tmp_path / "nope"
    elif case == "no_checkpoint":
        run = tmp_path / "fresh"
        run.mkdir()
        shutil.copy(run_dir / "config.json", run)
    elif case == "unknown_step":
        step = ["--step", "3"]
    elif case == "not_an_export":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    assert main(["export", str(run), *step, "--out", str(out)]) == 2
    _assert_one_line_error(capsys, message.format(tmp=tmp_path))
    if case == "not_an_export":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_training_from_an_export_starts_at_its_loss(exported, phi, tmp_path, capsys):
    run = tmp_path / "run"
    losses, rows = train(run, "run.steps=2", f"model.init_from={exported}")
    assert "initialised the parameters from" in capsys.readouterr().out
    assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
    cfg = load_config(None, [*SMALL, f"model.init_from={exported}"])
    batch = data_lib.eval_batches(cfg.data, load_tokenizer(cfg.data), num_batches=1,
                                  process_index=0, process_count=1)[0]
    graphdef = build_program(cfg, VOCAB).graphdef
    exported_loss = float(loss_fn(graphdef, jax.tree.map(np.asarray, phi), batch)[0])
    step0 = next(r["eval_loss"] for r in read_rows(run) if r["step"] == 0 and "eval_loss" in r)
    np.testing.assert_allclose(step0, exported_loss, rtol=1e-5)
    # A resume ignores init_from: the checkpoint wins.
    resumed, _ = train(run, "run.steps=3", f"model.init_from={exported}")
    assert "resumed from step 2" in capsys.readouterr().out and 3 in resumed


def test_transformers_loads_the_export(exported, phi):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 32))
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    program = _program(exported)
    ours = np.asarray(nnx.merge(program.graphdef, phi)(tokens)[0])
    difference = float(np.abs(theirs - ours).max())
    print(f"max abs logit difference vs transformers: {difference:.3g}")
    assert difference < 1e-4

    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    text = "Grüße, 世界! 🙂 tabs\tand\nnewlines  "
    assert tokenizer(text)["input_ids"] == ByteTokenizer().encode(text).tolist()
    assert tokenizer.eos_token_id == 256

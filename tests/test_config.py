"""Config loading: defaults, YAML, overrides, and one-line errors naming the key."""

from pathlib import Path

import pytest

from edit_jax.config import CONFIG_DIR, load_config
from edit_jax.errors import UserError


def test_defaults_are_the_tiny_config():
    assert load_config() == load_config("tiny")


def test_every_bundled_config_loads():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"tiny", "small", "350m", "1b", "3b", "7b"} <= set(names)
    for name in names:
        load_config(name)


def test_bundled_configs_are_the_repositorys_configs_dir():
    """configs/ at the repository root is what `--config NAME` reads, installed (editable or
    wheel, as the package edit_jax.configs) or not."""
    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    if not repo_configs.is_dir():
        pytest.skip("tests copied out of the checkout")
    bundled = {p.name: p.read_text() for p in CONFIG_DIR.glob("*.yaml")}
    assert bundled == {p.name: p.read_text() for p in repo_configs.glob("*.yaml")}


def test_unknown_config_name_lists_the_bundled_ones():
    with pytest.raises(UserError) as e:
        load_config("smal")
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    assert str(e.value) == f"config file not found: smal; pass a YAML file or one of: {known}"
    assert "1b, 350m, 3b, 7b, small, tiny" in known


def test_overrides_are_typed_and_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {steps: 7}\nmodel: {n_layers: 2}\n")
    cfg = load_config(str(path), ["run.steps=9", "data.paths=[a.txt,b.jsonl]", "optimizer.lr=0.5"])
    assert (cfg.run.steps, cfg.model.n_layers, cfg.optimizer.lr) == (9, 2, 0.5)
    assert cfg.data.paths == ("a.txt", "b.jsonl")


@pytest.mark.parametrize("overrides, message", [
    (["model.d_modle=64"], "unknown config key 'model.d_modle'; valid keys here: vocab_size"),
    (["trian.steps=3"], "unknown config key 'trian'"),
    (["run.steps=ten"], "bad value for config key 'run.steps'"),
    (["model.n_kv_heads=3"], "'model.n_kv_heads'"),
    (["data.seq_len=1024"], "data.seq_len': 1024 is longer than model.max_seq_len=512"),
    (["mesh.replica=-1", "mesh.shard=-1"], "at most one of mesh.replica and mesh.shard"),
    (["mesh.shard=0"], "'mesh.shard': must be positive or -1"),
    (["model.remat=some"], "'model.remat'"),
    (["method.name=nope"], "'method.name'"),
    (["data.source=files"], "data.source=files needs data.paths"),
    (["steps"], "bad override 'steps': write section.key=value"),
    (["method.name=a_edit", "method.sync_interval_seconds=0"],
     "'method.sync_interval_seconds': must be positive"),
    (["method.step_weighting=1.5"], "'method.step_weighting': must be in [0, 1]"),
    (["straggler.slowdown=[1,0.5]"], "'straggler.slowdown': factors must be >= 1"),
    (["straggler.delay_seconds=[-1,0]"], "'straggler.delay_seconds': delays must be >= 0"),
    (["run.barrier_timeout_seconds=0"], "'run.barrier_timeout_seconds': must be positive"),
    (["method.name=a_edit", "method.shard_outer_over_replica=true"],
     "needs norm_granularity=layer"),
    (["method.name=local_sgd", "method.fragments=2"], "apply to diloco and edit, not local_sgd"),
    (["method.name=a_edit", "method.fragment_alpha=0.5"], "not a_edit"),
    (["method.fragments=3"], "cannot split model.n_layers=4 evenly"),
    (["method.fragments=4", "method.sync_every=6"], "use a sync_every divisible by 4"),
    (["method.fragment_delay=9"], "'method.fragment_delay': must be in [0, method.sync_every=8]"),
    (["method.fragment_layout=blocks"], "'method.fragment_layout'"),
    (["run.eval_params=mean"], "'run.eval_params': 'mean' is not average or phi"),
    (["method.name=local_sgd", "run.eval_params=phi"], "use average for other methods"),
    (["method.link_gbps=0"], "'method.link_gbps': must be positive"),
    (["method.compression=int2"], "'method.compression': 'int2' is not one of"),
    (["method.name=ddp", "method.compression=int8"], "ddp averages fp32 gradients"),
    (["method.name=diloco", "method.compression=int4", "method.shard_outer_over_replica=true"],
     "set method.shard_outer_over_replica=false"),
    (["method.compression=int8", "method.compression_block=7"], "must be an even number >= 2"),
    (["method.error_feedback=true"], "needs method.compression"),
])
def test_bad_input_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(UserError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {d_model: [\n")
    with pytest.raises(UserError, match="cannot read config"):
        load_config(str(broken))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(str(scalar))


def test_straggler_lists_and_a_edit_load():
    cfg = load_config(None, ["method.name=a_edit", "straggler.slowdown=[1,3]",
                             "straggler.delay_seconds=[0.5,0]"])
    assert cfg.method.name == "a_edit"
    assert cfg.straggler.slowdown == (1.0, 3.0) and cfg.straggler.delay_seconds == (0.5, 0.0)

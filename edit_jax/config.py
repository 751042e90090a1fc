"""Run configuration: frozen dataclasses loaded from YAML plus dotted `key=value` overrides.

OmegaConf merges the YAML file and the overrides onto the dataclass schema, so unknown keys and
values of the wrong type are rejected at load time; `validate` then checks values that must agree
with each other. Every problem becomes a one-line `UserError` that names the key.
The dataclass defaults are the `tiny` config, so `edit-jax train` with no arguments needs no file.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from edit_jax import hf_config, token_shards
from edit_jax.errors import UserError
from edit_jax.fragments import FRAGMENT_LAYOUTS
from edit_jax.methods import METHODS, SyncRule


def _config_dir() -> Path:
    """The bundled configs: the repository's top-level configs/, read in place from a checkout
    (installed editable or not installed at all, e.g. `python -m edit_jax.cli` from its root);
    a wheel carries them as the package edit_jax.configs (pyproject.toml's package-dir)."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    return Path(str(importlib.resources.files("edit_jax.configs")))


CONFIG_DIR = _config_dir()
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTIONS = ("auto", "xla", "cudnn")
DTYPES = ("float32", "bfloat16")
COMPRESSIONS = ("none", "int8", "fp8", "int4", "topk")
TOPK_VALUE_BITS = (2, 4, 8)
NORM_GRANULARITIES = ("global", "layer")
DATA_SOURCES = ("bundled", "files", "tfds", "tokens")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama architecture. vocab_size 0 means: take it from the tokenizer. init_from: a Hugging
    Face Llama directory to start from; its config.json fills the architecture (load_config)."""

    vocab_size: int = 0
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 384
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    remat: str = "full"  # none | full | dots | dots_no_batch
    loss_chunk_tokens: int = 4096  # tokens per chunk of the head + cross-entropy; 0 = one chunk
    attention_chunk_tokens: int = 512  # query positions per chunk of attention; 0 = one chunk
    init_from: str = ""  # Hugging Face Llama checkpoint directory; "" = random initialisation
    attention: str = "auto"  # auto | xla | cudnn: cuDNN flash attention on NVIDIA GPUs in bf16


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """('replica', 'shard') mesh sizes; -1 means "all remaining devices"."""

    replica: int = 2
    shard: int = 4
    num_cpu_devices: int = 8  # fake devices when running on CPU


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from, how it is tokenized, and the batch shape."""

    source: str = "bundled"  # bundled | files | tfds | tokens
    paths: tuple[str, ...] = ()  # files: text files or globs; tokens: a prepared dir or .bin files
    token_dtype: str = "uint16"  # tokens: dtype of raw .bin shards without a header or index
    text_field: str = "text"  # jsonl key / tfds feature holding the text
    tfds_name: str = ""
    tfds_data_dir: str = ""
    train_split: str = "train"
    val_split: str = ""  # '' = hold out val_fraction of the training documents
    val_fraction: float = 0.02
    tokenizer: str = ""  # byte | bpe | path/to/tokenizer.json; "" = the shards', else byte
    bpe_vocab_size: int = 4096
    seq_len: int = 128
    global_batch_size: int = 32  # sequences per step over all replicas
    shuffle_seed: int = 0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Inner AdamW with linear warm-up, cosine decay and global-norm clipping."""

    lr: float = 3e-3
    warmup_steps: int = 30
    decay_steps: int = 0  # 0 = run.steps
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The distributed training method, its sync schedule, outer optimizer and penalty.

    Local methods run `warmup_steps` synchronous (DDP) steps, then sync every `sync_every` local
    steps; a_edit instead syncs when `sync_interval_seconds` of local steps have passed on each
    replica's own clock. The outer optimizer (SGD with Nesterov momentum) and the
    shard-over-replica option apply to diloco, edit and a_edit; the pseudo-gradient penalty
    (anomaly, weighting, clip, step weighting) to edit and a_edit; streaming fragments to diloco
    and edit; the link and the layer profile to dreamddp's schedule; compression (8- or 4-bit
    codes with fp32 scales, optional error feedback) to every method's syncs but ddp's.
    """

    name: str = "edit"  # ddp | local_sgd | post_local_sgd | plsgd | dreamddp | diloco | edit | a_edit
    sync_every: int = 8  # tau: local steps between syncs
    sync_interval_seconds: float = 2.0  # a_edit: local-step time between syncs, per replica
    warmup_steps: int = 30  # synchronous steps before the first local step
    outer_lr: float = 0.7
    outer_momentum: float = 0.5  # short runs (tens of syncs); the papers' 0.9 pays off over thousands
    nesterov: bool = True
    anomaly: bool = True  # drop replicas whose pseudo-gradient norm is an outlier (EWMA z-score)
    weighting: bool = True  # softmax(-norm / temperature) weights instead of a plain mean
    clip_norm: float = 1.0  # pseudo-gradient clipping per synced unit; 0 = off
    temperature: float = 1.0
    anomaly_alpha: float = 0.02
    anomaly_warmup: int = 120  # syncs before outliers are detected
    anomaly_threshold: float = 3.0
    norm_granularity: str = "global"  # global: one norm per replica; layer: per synced unit
    step_weighting: float = 0.0  # rho: weights (1 - rho) * norm weights + rho * step shares
    shard_outer_over_replica: bool = False  # outer state 2P/(R*S) per device instead of 2P/S
    fragments: int = 1  # P: streaming fragments of the layers (diloco, edit); 1 = whole model
    fragment_layout: str = "strided"  # strided: layers p, p+P, ...; sequential: contiguous
    fragment_delay: int = 0  # tau_o: steps between a fragment's sync and its apply
    fragment_alpha: float = 0.0  # the replica continues from a*theta_local + (1-a)*phi_new
    link_gbps: float = 1.0  # dreamddp: the slow link between replicas, for communication times
    link_latency_ms: float = 10.0
    layer_profile: str = ""  # dreamddp: JSON of per-layer times; "" = measure on these devices
    compression: str = "none"  # none | int8 | fp8 | int4: the codes a sync moves over `replica`
    compression_block: int = 256  # values per fp32 scale (topk: values per chunk)
    error_feedback: bool = False  # each replica re-sends what quantization dropped (topk: always)
    topk_fraction: float = 0.015625  # topk: share of each chunk's values sent (1/64)
    topk_value_bits: int = 2  # topk: bits per sent value (2, 4 or 8), one fp32 scale per chunk
    error_feedback_decay: float = 0.95  # topk: e <- decay * e + pseudo-gradient at each sync


@dataclasses.dataclass(frozen=True)
class StragglerConfig:
    """Injected slowness for experiments: per replica, empty = none (one value per replica).

    After each of its steps a replica sleeps (slowdown - 1) x the step's own time plus
    delay_seconds, so slowdown 3 makes it three times slower than it would be.
    """

    slowdown: tuple[float, ...] = ()
    delay_seconds: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length of the run, where it writes, and how often it evaluates and saves."""

    steps: int = 300
    run_dir: str = "runs/tiny"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    progress: bool = True
    tensorboard: bool = False  # also write TensorBoard event files to <run_dir>/tensorboard
    barrier_timeout_seconds: float = 300.0  # multi-process: longest wait for the other processes
    xla_flags: tuple[str, ...] = ()  # added to the GPU defaults (xla_flags.py); $XLA_FLAGS wins
    profile_steps: str = ""  # "A,B": a jax.profiler trace of steps A..B into <run_dir>/profile
    eval_params: str = "average"  # average: the replicas' mean; phi: diloco/edit's phi (no traffic)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    straggler: StragglerConfig = dataclasses.field(default_factory=StragglerConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)


def resolve_config_path(name_or_path: str) -> Path:
    """A config file path, or a bare name such as `small` among the bundled CONFIG_DIR."""
    path = Path(name_or_path)
    if not path.exists() and path.suffix == "" and (CONFIG_DIR / f"{name_or_path}.yaml").exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise UserError(f"config file not found: {name_or_path}; pass a YAML file or one of: {known}")
    return path


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read config {path}: {first_line}; fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of sections (model:, data:, ...)")
    return data


def _parse_overrides(overrides: Sequence[str]):
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or " " in key:
            raise UserError(f"bad override '{item}': write section.key=value, e.g. run.steps=100")
    return OmegaConf.from_dotlist(list(overrides))


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file (optional) <- dotted overrides, then validated."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if path is not None:
        layers.append(OmegaConf.create(_read_yaml(resolve_config_path(path))))
    layers.append(_parse_overrides(overrides))
    try:
        config = OmegaConf.to_object(OmegaConf.merge(*_with_init_from(layers)))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
        if "not in" in msg:
            section = key.rsplit(".", 1)[0] if "." in key else ""
            valid = _field_names(section)
            raise UserError(f"unknown config key '{key}'; valid keys here: {valid}") from None
        raise UserError(f"bad value for config key '{key}': {msg}") from None
    config = resolve_tokenizer(config)
    validate(config)
    return config


def _with_init_from(layers: list) -> list:
    """`layers` (the schema, then the user's) with model.init_from's config.json as a layer
    just above the schema: it fills the model keys the user left unset, and a key the user set
    to another value is an error."""
    merged = OmegaConf.merge(*layers)
    if not merged.model.init_from:
        return layers
    values = hf_config.model_fields(hf_config.read_hf_config(merged.model.init_from))
    for field, value in values.items():
        explicit = any(field in (layer.get("model") or {}) for layer in layers[1:])
        if explicit and merged.model[field] != value:
            source = Path(merged.model.init_from) / hf_config.CONFIG_FILE
            raise UserError(f"model.{field}={merged.model[field]} but {source} has "
                            f"{hf_config.FIELD_KEYS[field]}={value}; drop model.{field} from the "
                            "config and overrides (model.init_from sets it) or init from "
                            "another checkpoint")
    return [layers[0], OmegaConf.create({"model": values}), *layers[1:]]


def resolve_tokenizer(c: Config) -> Config:
    """`data.tokenizer` "" (auto) made explicit: token shards' own (they are tokenized already:
    `token_shards.default_tokenizer`), else the tokenizer.json of `model.init_from`'s directory
    if it has one, else byte."""
    if c.data.tokenizer:
        return c
    own = Path(c.model.init_from).expanduser() / hf_config.TOKENIZER_FILE
    d = c.data
    tokenizer = (str(own) if d.source != "tokens" and c.model.init_from and own.is_file()
                 else token_shards.default_tokenizer(d.source, d.paths, d.token_dtype))
    return dataclasses.replace(c, data=dataclasses.replace(c.data, tokenizer=tokenizer))


def _field_names(section: str) -> str:
    sections = {f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}
    return ", ".join(f.name for f in dataclasses.fields(sections.get(section, Config)))


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise UserError(f"bad value for config key '{key}': {problem}")


def validate(c: Config) -> None:
    """Checks that need more than one value, or a range, at load time."""
    m, d, o, r = c.model, c.data, c.optimizer, c.run
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
        _require(getattr(m, key) > 0, f"model.{key}", "must be positive")
    _require(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 takes the tokenizer's)")
    _require(m.d_model % m.n_heads == 0, "model.d_model",
             f"{m.d_model} is not divisible by model.n_heads={m.n_heads}")
    _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
             f"model.n_heads={m.n_heads} is not a multiple of {m.n_kv_heads}")
    _require((m.d_model // m.n_heads) % 2 == 0, "model.d_model",
             "head dimension d_model/n_heads must be even for RoPE")
    _require(m.dtype in DTYPES, "model.dtype", f"'{m.dtype}' is not one of {DTYPES}")
    _require(m.remat in REMAT_POLICIES, "model.remat", f"'{m.remat}' is not one of {REMAT_POLICIES}")
    _require(m.attention in ATTENTIONS, "model.attention",
             f"'{m.attention}' is not one of {ATTENTIONS}")
    _require(m.loss_chunk_tokens >= 0, "model.loss_chunk_tokens",
             "must be >= 0 (0 computes the logits of all tokens at once)")
    _require(m.attention_chunk_tokens >= 0, "model.attention_chunk_tokens",
             "must be >= 0 (0 attends from all positions at once)")
    for key in ("replica", "shard"):
        size = getattr(c.mesh, key)
        _require(size == -1 or size > 0, f"mesh.{key}", "must be positive or -1 (the rest)")
    _require(not (c.mesh.replica == -1 and c.mesh.shard == -1), "mesh.replica",
             "at most one of mesh.replica and mesh.shard may be -1")
    _require(c.mesh.num_cpu_devices > 0, "mesh.num_cpu_devices", "must be positive")
    _require(d.source in DATA_SOURCES, "data.source", f"'{d.source}' is not one of {DATA_SOURCES}")
    _require(d.source not in ("files", "tokens") or len(d.paths) > 0, "data.paths",
             f"data.source={d.source} needs data.paths=[...] (files: text files; tokens: a "
             "directory made by `edit-jax prepare`, or .bin token files)")
    _require(d.token_dtype in token_shards.DTYPES, "data.token_dtype",
             f"'{d.token_dtype}' is not one of {token_shards.DTYPES}")
    _require(not (d.source == "tokens" and d.tokenizer == "bpe"), "data.tokenizer",
             "bpe trains a tokenizer on documents, but token shards are tokenized already; "
             "leave data.tokenizer unset (a prepared directory's own) or name a tokenizer.json")
    _require(d.source != "tfds" or bool(d.tfds_name), "data.tfds_name",
             "data.source=tfds needs data.tfds_name")
    _require(d.seq_len > 0, "data.seq_len", "must be positive")
    _require(d.seq_len <= m.max_seq_len, "data.seq_len",
             f"{d.seq_len} is longer than model.max_seq_len={m.max_seq_len}; "
             "shorten data.seq_len or raise model.max_seq_len")
    _require(d.global_batch_size > 0, "data.global_batch_size", "must be positive")
    _require(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be between 0 and 1")
    _require(d.bpe_vocab_size >= 300, "data.bpe_vocab_size", "must be at least 300")
    _require(o.lr > 0, "optimizer.lr", "must be positive")
    _require(o.warmup_steps >= 0 and o.decay_steps >= 0, "optimizer.warmup_steps",
             "warm-up and decay steps must be >= 0")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", "must be in [0, 1]")
    _require(o.clip_norm >= 0, "optimizer.clip_norm", "must be >= 0 (0 disables clipping)")
    k = c.method
    _require(k.name in METHODS, "method.name", f"'{k.name}' is not one of {tuple(METHODS)}")
    spec = METHODS[k.name]
    _require(k.sync_every > 0, "method.sync_every", "must be positive")
    _require(k.warmup_steps >= 0, "method.warmup_steps", "must be >= 0")
    _require(k.warmup_steps >= spec.min_warmup, "method.warmup_steps",
             f"{k.name} needs synchronous warm-up steps (>= {spec.min_warmup}); use local_sgd "
             "for none")
    _require(k.outer_lr > 0, "method.outer_lr", "must be positive")
    _require(0.0 <= k.outer_momentum < 1.0, "method.outer_momentum", "must be in [0, 1)")
    _require(k.clip_norm >= 0, "method.clip_norm", "must be >= 0 (0 disables clipping)")
    _require(k.temperature > 0, "method.temperature", "must be positive")
    _require(0.0 < k.anomaly_alpha <= 1.0, "method.anomaly_alpha", "must be in (0, 1]")
    _require(k.anomaly_warmup >= 0, "method.anomaly_warmup", "must be >= 0")
    _require(k.anomaly_threshold > 0, "method.anomaly_threshold", "must be positive")
    _require(k.norm_granularity in NORM_GRANULARITIES, "method.norm_granularity",
             f"'{k.norm_granularity}' is not one of {NORM_GRANULARITIES}")
    _require(k.sync_interval_seconds > 0, "method.sync_interval_seconds", "must be positive")
    _require(0.0 <= k.step_weighting <= 1.0, "method.step_weighting", "must be in [0, 1]")
    _require(not k.shard_outer_over_replica or spec.has_outer_state,
             "method.shard_outer_over_replica",
             f"only {', '.join(n for n, s in METHODS.items() if s.has_outer_state)} have an "
             "outer state")
    _require(not (k.shard_outer_over_replica and spec.penalty
                  and k.norm_granularity == "global"), "method.norm_granularity",
             "method.shard_outer_over_replica needs norm_granularity=layer (global norms would "
             "exchange every parameter a second time); set method.norm_granularity=layer")
    _require(k.fragments >= 1, "method.fragments", "must be >= 1 (1 = the whole model)")
    streaming = k.fragments > 1 or k.fragment_delay > 0 or k.fragment_alpha > 0
    _require(not streaming or spec.streaming, "method.fragments",
             f"streaming fragments (fragments, fragment_delay, fragment_alpha) apply to "
             f"{' and '.join(n for n, s in METHODS.items() if s.streaming)}, not {k.name}")
    _require(m.n_layers % k.fragments == 0, "method.fragments",
             f"{k.fragments} fragments cannot split model.n_layers={m.n_layers} evenly; use a "
             f"divisor of {m.n_layers}")
    _require(k.sync_every % k.fragments == 0, "method.fragments",
             f"{k.fragments} fragments cannot stagger over method.sync_every={k.sync_every} "
             f"steps; use a sync_every divisible by {k.fragments}")
    _require(k.fragment_layout in FRAGMENT_LAYOUTS, "method.fragment_layout",
             f"'{k.fragment_layout}' is not one of {FRAGMENT_LAYOUTS}")
    _require(0 <= k.fragment_delay <= k.sync_every, "method.fragment_delay",
             f"must be in [0, method.sync_every={k.sync_every}] (a fragment's outer step must "
             "land before its next sync)")
    _require(0.0 <= k.fragment_alpha <= 1.0, "method.fragment_alpha", "must be in [0, 1]")
    _require(k.link_gbps > 0, "method.link_gbps", "must be positive")
    _require(k.link_latency_ms >= 0, "method.link_latency_ms", "must be >= 0")
    _require(k.compression in COMPRESSIONS, "method.compression",
             f"'{k.compression}' is not one of {COMPRESSIONS}")
    compressed = k.compression != "none"
    _require(not compressed or spec.rule is not SyncRule.NONE, "method.compression",
             "compresses the syncs of the local methods; ddp averages fp32 gradients every step")
    _require(not (compressed and k.shard_outer_over_replica), "method.compression",
             "needs pseudo-gradients on the wire, but shard_outer_over_replica exchanges "
             "parameters; set method.shard_outer_over_replica=false")
    _require(k.compression_block >= 2 and k.compression_block % 2 == 0,
             "method.compression_block", "must be an even number >= 2")
    _require(not k.error_feedback or compressed, "method.error_feedback",
             "needs method.compression (int8, fp8, int4 or topk)")
    if k.compression == "topk":
        keep = round(k.topk_fraction * k.compression_block)
        _require(k.compression_block <= 2**16, "method.compression_block",
                 f"{k.compression_block} values per top-k chunk; at most 65536 (uint16 indices)")
        _require(0 < k.topk_fraction <= 1 and keep >= 1, "method.topk_fraction",
                 f"{k.topk_fraction} x method.compression_block={k.compression_block} keeps "
                 f"{keep} values per chunk; keep at least 1 (fraction in (0, 1])")
        _require(k.topk_value_bits in TOPK_VALUE_BITS, "method.topk_value_bits",
                 f"{k.topk_value_bits} is not one of {TOPK_VALUE_BITS}")
        _require(keep * k.topk_value_bits % 8 == 0, "method.topk_fraction",
                 f"{keep} values of {k.topk_value_bits} bits per chunk do not fill whole bytes; "
                 f"make topk_fraction x compression_block a multiple of "
                 f"{8 // k.topk_value_bits if k.topk_value_bits in TOPK_VALUE_BITS else 1}")
    _require(0.0 <= k.error_feedback_decay <= 1.0, "method.error_feedback_decay",
             "must be in [0, 1]")
    for key in ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                "keep_checkpoints", "barrier_timeout_seconds"):
        _require(getattr(r, key) > 0, f"run.{key}", "must be positive")
    _require(all(f.startswith("--") and len(f) > 2 for f in r.xla_flags), "run.xla_flags",
             "each flag is written --name=value, e.g. "
             "'run.xla_flags=[--xla_gpu_enable_latency_hiding_scheduler=false]'")
    profile_steps(r)  # raises for a malformed range
    _require(r.eval_params in ("average", "phi"), "run.eval_params",
             f"'{r.eval_params}' is not average or phi")
    _require(r.eval_params == "average" or (spec.has_outer_state and not spec.timed
                                            and not k.shard_outer_over_replica),
             "run.eval_params", "phi is diloco's and edit's global parameters, whole on every "
             "replica; use average for other methods or with method.shard_outer_over_replica")
    _require(all(f >= 1 for f in c.straggler.slowdown), "straggler.slowdown",
             "factors must be >= 1 (1 = full speed)")
    _require(all(d >= 0 for d in c.straggler.delay_seconds), "straggler.delay_seconds",
             "delays must be >= 0")


def profile_steps(run: RunConfig) -> tuple[int, int] | None:
    """`run.profile_steps` "A,B" as (A, B), the first and last step traced (steps count from
    1, as in metrics.jsonl); None when empty."""
    if not run.profile_steps:
        return None
    parts = run.profile_steps.split(",")
    try:
        first, last = (int(p) for p in parts)
    except ValueError:
        first = last = 0
    _require(len(parts) == 2 and 1 <= first <= last, "run.profile_steps",
             f"'{run.profile_steps}' is not A,B with 1 <= A <= B (the steps to trace, e.g. 5,8)")
    return first, last


def to_dict(config: Config) -> dict:
    """A plain JSON-serialisable dict (stored with checkpoints)."""
    return dataclasses.asdict(config)

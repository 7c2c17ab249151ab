"""Typed run configuration: nested dataclasses, YAML files, dotted command-line overrides.

A run is described by one `Config`. Files are YAML mappings with the same nesting as the
dataclasses; the command line overrides any leaf with `--section.key=value`. Unknown keys
and wrong types are errors that name the key and the closest valid one, and every
section checks its values in `__post_init__`, in the words of the config file.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pretrain.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration mistake, worded for the person who wrote the config."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# The strategy names live here so that the config can validate them without importing the
# model; `pretrain.model.sharing.STRATEGIES` holds their definitions and a test keeps the
# two in step.
SHARING_STRATEGIES = ("none", "all", "sequence", "cycle", "cycle_rev")


@dataclass
class SharingConfig:
    """Cross-layer parameter sharing: which logical layers use which parameter set."""

    strategy: str = "none"
    """none | all | sequence | cycle | cycle_rev (exact mappings: the README's sharing table)."""
    num_sets: int | None = None
    """M, the number of shared parameter sets (sequence, cycle, cycle_rev); 1 for all."""
    scope: Literal["block", "attention", "ffn"] = "block"
    """What is shared: the whole block, only attention, or only the feed-forward network."""
    start: int = 0
    """First logical layer of the shared range (inclusive)."""
    end: int | None = None
    """Last logical layer of the shared range (inclusive); default: the last layer."""
    share_qk: bool = False
    """Use one projection for queries and keys inside each layer (W_q = W_k)."""
    ratio: float = 1.0
    """Relaxed sharing: the shared sets hold this fraction of the shared range's parameters;
    below 1, every layer in the range adds a low-rank delta to each shared linear weight,
    its rank chosen to spend the rest. 1.0 is pure sharing."""
    tie_penalty: float = 0.0
    """Weight of an L2 penalty on the per-layer deltas (soft sharing); needs ratio < 1."""

    def __post_init__(self) -> None:
        _check(
            self.strategy in SHARING_STRATEGIES,
            f"sharing.strategy: unknown strategy {self.strategy!r}"
            f"{_did_you_mean(self.strategy, SHARING_STRATEGIES)};"
            f" choose one of {', '.join(SHARING_STRATEGIES)}",
        )
        if self.strategy in ("none", "all"):
            _check(
                self.num_sets is None,
                f"sharing.num_sets ({self.num_sets}) has no meaning for {self.strategy} sharing;"
                " remove it",
            )
        else:
            _check(
                self.num_sets is not None,
                f"sharing.num_sets is required for {self.strategy} sharing",
            )
            _check(self.num_sets >= 1, f"sharing.num_sets ({self.num_sets}) must be at least 1")
        _check(self.start >= 0, f"sharing.start ({self.start}) must be >= 0")
        _check(0.0 < self.ratio <= 1.0, f"sharing.ratio ({self.ratio}) must be in (0, 1]")
        _check(
            self.ratio == 1.0 or self.strategy != "none",
            f"sharing.ratio ({self.ratio}) relaxes sharing, but sharing.strategy is none;"
            " choose a sharing strategy or set ratio to 1.0",
        )
        _check(self.tie_penalty >= 0.0, f"sharing.tie_penalty ({self.tie_penalty}) must be >= 0")
        _check(
            self.tie_penalty == 0.0 or self.ratio < 1.0,
            f"sharing.tie_penalty ({self.tie_penalty}) penalises per-layer deltas, which exist"
            " only with sharing.ratio < 1",
        )
        if self.end is not None:
            _check(
                self.end >= self.start,
                f"sharing.end ({self.end}) must not be before sharing.start ({self.start})",
            )


@dataclass
class UniversalConfig:
    """Universal Transformer mode: one shared block iterated with Adaptive Computation Time."""

    enabled: bool = False
    """Apply the shared block for up to num_layers steps with ACT halting."""
    halting_threshold: float = 0.99
    """A position halts once its accumulated halting probability exceeds this (1 - 0.01)."""
    ponder_weight: float = 0.01
    """Weight of the ponder cost mean(N + R) in the loss."""
    halting_bias_init: float = 1.0
    """Initial bias of the halting unit, so that early steps tend to continue."""

    def __post_init__(self) -> None:
        _check(
            0.0 < self.halting_threshold < 1.0,
            f"universal.halting_threshold ({self.halting_threshold}) must be in (0, 1)",
        )
        _check(
            self.ponder_weight >= 0.0,
            f"universal.ponder_weight ({self.ponder_weight}) must be >= 0",
        )


# Family-dependent defaults, applied when a key is left out.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "albert": {"norm_eps": 1e-12, "type_vocab_size": 2},
    "llama": {"norm_eps": 1e-6, "type_vocab_size": 0},
}
_CAUSAL_FAMILIES = frozenset({"llama"})


@dataclass
class ModelConfig:
    """The shared-layer Transformer: sizes, block family and sharing plan."""

    family: Literal["albert", "llama"] = "albert"
    """albert: post-LN, GELU, biases, learned positions, bidirectional, MLM (+SOP).
    llama: pre-RMSNorm, SwiGLU, RoPE, no biases, causal LM."""
    vocab_size: int = 30000
    embedding_size: int = 128
    """E, the width of the token table; factorized when E < hidden_size."""
    hidden_size: int = 768
    num_layers: int = 12
    """L, the number of logical layers (layer applications)."""
    num_heads: int = 12
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (llama); default: num_heads."""
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int | None = None
    """Token type (segment) embeddings; default 2 for albert, 0 (none) for llama."""
    norm_eps: float | None = None
    """LayerNorm / RMSNorm epsilon; default 1e-12 for albert, 1e-6 for llama."""
    rope_theta: float = 10000.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    pad_token_id: int = 0
    sop_head: bool = True
    """albert only: a sentence-order prediction head on the first token."""
    hidden_act: Literal["gelu_new", "gelu"] = "gelu_new"
    """albert only: GELU of the FFN and MLM head, tanh approximation (ALBERT's gelu_new) or
    exact (BERT's gelu, for imported BERT models)."""
    sharing: SharingConfig = field(default_factory=SharingConfig)
    universal: UniversalConfig = field(default_factory=UniversalConfig)

    def __post_init__(self) -> None:
        for key, value in _FAMILY_DEFAULTS[self.family].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        for key in (
            "vocab_size",
            "embedding_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            _check(getattr(self, key) >= 1, f"model.{key} ({getattr(self, key)}) must be >= 1")
        _check(
            self.hidden_size % self.num_heads == 0,
            f"model.hidden_size ({self.hidden_size}) must be divisible by"
            f" model.num_heads ({self.num_heads})",
        )
        _check(
            self.num_heads % self.num_kv_heads == 0,
            f"model.num_heads ({self.num_heads}) must be divisible by"
            f" model.num_kv_heads ({self.num_kv_heads})",
        )
        _check(
            self.embedding_size <= self.hidden_size,
            f"model.embedding_size ({self.embedding_size}) must not exceed"
            f" model.hidden_size ({self.hidden_size}); factorization makes E <= H",
        )
        _check(
            0 <= self.pad_token_id < self.vocab_size,
            f"model.pad_token_id ({self.pad_token_id}) must be a token id"
            f" below model.vocab_size ({self.vocab_size})",
        )
        for key in ("dropout", "attention_dropout"):
            value = getattr(self, key)
            _check(0.0 <= value < 1.0, f"model.{key} ({value}) must be in [0, 1)")
        if self.family == "llama":
            _check(
                self.hidden_act == "gelu_new",
                "model.hidden_act applies to the albert family; llama uses SwiGLU",
            )
            _check(
                self.type_vocab_size == 0,
                f"model.type_vocab_size ({self.type_vocab_size}) must be 0 for the llama family,"
                " which has no token types",
            )
            _check(
                (self.hidden_size // self.num_heads) % 2 == 0,
                f"model.hidden_size / model.num_heads ({self.hidden_size // self.num_heads})"
                " must be even for rotary position embeddings",
            )
        else:
            _check(
                self.num_kv_heads == self.num_heads,
                f"model.num_kv_heads ({self.num_kv_heads}) must equal model.num_heads"
                f" ({self.num_heads}) for the albert family; grouped-query attention is llama's",
            )
        self._check_sharing()
        if self.universal.enabled:
            _check(
                self.sharing.strategy == "all"
                and self.sharing.scope == "block"
                and self.sharing.start == 0
                and self.sharing.end in (None, self.num_layers - 1)
                and self.sharing.ratio == 1.0,
                "model.universal.enabled needs model.sharing.strategy=all over every layer with"
                " scope=block and ratio 1.0: a Universal Transformer iterates one shared block",
            )

    @property
    def causal(self) -> bool:
        return self.family in _CAUSAL_FAMILIES

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def _check_sharing(self) -> None:
        s, L = self.sharing, self.num_layers
        end = L - 1 if s.end is None else s.end
        _check(
            end < L,
            f"sharing.end ({end}) must be a layer index below model.num_layers ({L})",
        )
        span = end - s.start + 1
        where = f"the shared range {s.start}..{end}" if span != L else "model.num_layers"
        if s.strategy == "sequence":
            _check(
                span % s.num_sets == 0,
                f"{where} ({span}) must be divisible by sharing.num_sets ({s.num_sets})"
                " for sequence sharing",
            )
        if s.strategy in ("sequence", "cycle", "cycle_rev"):
            _check(
                s.num_sets <= span,
                f"sharing.num_sets ({s.num_sets}) must not exceed {where} ({span})",
            )
        if s.strategy == "cycle_rev":
            _check(
                2 * s.num_sets <= span,
                f"cycle_rev sharing needs {where} ({span}) of at least twice"
                f" sharing.num_sets ({s.num_sets}): one cycle, then the reversed one",
            )


@dataclass
class DataConfig:
    """Preprocessed token shards and how samples are cut from them."""

    path: str = ""
    """Folder of preprocessed shards (tools/preprocess.py)."""
    tokenizer: str = ""
    """The run's tokenizer folder; default: the copy inside data.path. The shards must have
    been tokenized with it (checked by checksum)."""
    seq_length: int = 128
    """Tokens per training sample."""
    short_seq_prob: float = 0.1
    """Probability of a shorter target length (ALBERT)."""
    num_workers: int = 1

    def __post_init__(self) -> None:
        _check(self.seq_length >= 8, f"data.seq_length ({self.seq_length}) must be >= 8")
        _check(
            0.0 <= self.short_seq_prob <= 1.0,
            f"data.short_seq_prob ({self.short_seq_prob}) must be in [0, 1]",
        )
        _check(self.num_workers >= 0, f"data.num_workers ({self.num_workers}) must be >= 0")


@dataclass
class ObjectiveConfig:
    """Loss terms and their weights."""

    mlm_weight: float = 1.0
    sop_weight: float = 1.0
    clm_weight: float = 1.0
    mask_prob: float = 0.15
    max_predictions: int = 20
    max_ngram: int = 3
    whole_word: bool = True

    def __post_init__(self) -> None:
        _check(
            0.0 < self.mask_prob < 1.0, f"objective.mask_prob ({self.mask_prob}) must be in (0, 1)"
        )
        _check(
            self.max_predictions >= 1,
            f"objective.max_predictions ({self.max_predictions}) must be >= 1",
        )
        _check(self.max_ngram >= 1, f"objective.max_ngram ({self.max_ngram}) must be >= 1")
        for key in ("mlm_weight", "sop_weight", "clm_weight"):
            value = getattr(self, key)
            _check(value >= 0.0, f"objective.{key} ({value}) must be >= 0")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "lamb"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    warmup_steps: int = 0
    decay: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Gradient-norm clipping; 0 disables it."""

    def __post_init__(self) -> None:
        _check(self.lr > 0.0, f"optim.lr ({self.lr}) must be > 0")
        _check(self.weight_decay >= 0.0, f"optim.weight_decay ({self.weight_decay}) must be >= 0")
        _check(
            all(0.0 <= b < 1.0 for b in self.betas),
            f"optim.betas ({list(self.betas)}) must each be in [0, 1)",
        )
        _check(self.warmup_steps >= 0, f"optim.warmup_steps ({self.warmup_steps}) must be >= 0")
        _check(
            0.0 <= self.min_lr_ratio <= 1.0,
            f"optim.min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]",
        )
        _check(self.grad_clip >= 0.0, f"optim.grad_clip ({self.grad_clip}) must be >= 0")


@dataclass
class EngineConfig:
    """How DeepSpeed runs the model: ZeRO stage, precision, batch, offload."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch_size: int = 8
    """Samples per rank per forward pass."""
    grad_accum_steps: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    """Non-reentrant activation checkpointing of every layer application."""
    zero3_persistence_threshold: int = 100000
    """ZeRO-3 keeps parameters smaller than this many elements unpartitioned (DeepSpeed's
    stage3_param_persistence_threshold); 0 partitions everything."""
    comms_logger: bool = False
    """Record every collective (DeepSpeed comms logger) and print a summary at the end."""

    def __post_init__(self) -> None:
        _check(
            self.micro_batch_size >= 1,
            f"engine.micro_batch_size ({self.micro_batch_size}) must be >= 1",
        )
        _check(
            self.grad_accum_steps >= 1,
            f"engine.grad_accum_steps ({self.grad_accum_steps}) must be >= 1",
        )
        _check(
            not self.offload_params or self.zero_stage == 3,
            f"engine.offload_params needs engine.zero_stage=3 (got {self.zero_stage})",
        )
        _check(
            not self.offload_optimizer or self.zero_stage >= 1,
            "engine.offload_optimizer needs engine.zero_stage of 1 or more",
        )


@dataclass
class TrainConfig:
    """Length of the run, where it writes, and where it starts from."""

    max_steps: int = 1000
    output_dir: str = "runs/default"
    seed: int = 1234
    eval_every: int = 0
    """Evaluate on the held-out split every N steps; 0 disables it."""
    eval_steps: int = 10
    init_from: str = ""
    """A native export (e.g. an imported Hugging Face model) to start from instead of a
    random initialisation; ignored when the run resumes from its own checkpoint."""
    on_nonfinite: Literal["skip", "stop"] = "skip"
    """A NaN/inf loss: skip that micro-batch's update and go on, or stop the run (the last
    checkpoint stays as it was)."""
    max_skipped_steps: int = 10
    """With on_nonfinite=skip: stop with an error when this many optimizer steps in a row had
    every micro-batch skipped (a diverged run). No checkpoint is written while steps are
    being skipped, so `latest` stays the last sound state."""
    replan_schedule: bool = False
    """Allow resuming with LR-schedule settings (optim.lr, warmup_steps, decay, min_lr_ratio,
    or max_steps under a decaying schedule) other than the checkpoint's: the LR is re-planned
    from this config at the step reached. Without it such a resume is refused, since the
    checkpoint carries its own schedule on (it would ignore the new settings)."""
    compile: bool = False
    """torch.compile each shared parameter set's block once (a set used by L layers is one
    compiled module, not L); ZeRO stages 0-2."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, f"train.max_steps ({self.max_steps}) must be >= 1")
        _check(
            self.max_skipped_steps >= 1,
            f"train.max_skipped_steps ({self.max_skipped_steps}) must be >= 1",
        )
        _check(self.eval_every >= 0, f"train.eval_every ({self.eval_every}) must be >= 0")
        _check(self.eval_steps >= 1, f"train.eval_steps ({self.eval_steps}) must be >= 1")


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep_last: int = 3

    def __post_init__(self) -> None:
        _check(self.every >= 0, f"checkpoint.every ({self.every}) must be >= 0")
        _check(self.keep_last >= 1, f"checkpoint.keep_last ({self.keep_last}) must be >= 1")


@dataclass
class LoggingConfig:
    every: int = 10
    """Log metrics every N steps."""
    tensorboard: bool = True
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for MFU; default: the datasheet figure for the device's
    name, or where there is none (CPUs), a matmul peak measured at start."""

    def __post_init__(self) -> None:
        _check(self.every >= 1, f"logging.every ({self.every}) must be >= 1")


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _check(
            self.optim.name != "lamb"
            or (self.engine.zero_stage == 0 and self.engine.precision == "fp32"),
            "optim.name=lamb needs engine.zero_stage=0 and engine.precision=fp32: ZeRO and"
            " DeepSpeed's mixed-precision optimizers give the optimizer flattened slices, which"
            " breaks LAMB's per-tensor trust ratio; use optim.name=adamw",
        )
        _check(
            self.optim.warmup_steps <= self.train.max_steps,
            f"optim.warmup_steps ({self.optim.warmup_steps}) must not exceed"
            f" train.max_steps ({self.train.max_steps})",
        )
        _check(
            not (self.train.compile and self.engine.zero_stage == 3),
            "train.compile=true needs engine.zero_stage 0-2: ZeRO-3 gathers and releases the"
            " parameters inside the forward pass, which the compiled blocks do not see; set"
            " engine.zero_stage=2 or train.compile=false",
        )
        _check(
            self.data.seq_length <= self.model.max_position_embeddings,
            f"data.seq_length ({self.data.seq_length}) must not exceed"
            f" model.max_position_embeddings ({self.model.max_position_embeddings})",
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (YAML/JSON serialisable)."""
        return to_dict(self)


# ---------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the key.


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    if tp is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    return getattr(tp, "__name__", str(tp))


_SCALARS: dict[Any, typing.Callable[[Any], bool]] = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, list ->
    tuple) or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
    elif origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
        hint = _did_you_mean(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}{hint}")
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(
                _convert(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
    elif dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    elif tp in _SCALARS and _SCALARS[tp](value):
        return float(value) if tp is float else value
    elif tp is float and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string; for a float key it means the number.
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are ConfigErrors."""
    where = prefix or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown config key {dotted!r}{_did_you_mean(str(key), names)};"
                f" valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}"
            )
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------
# Files and overrides.


def _parse_scalar(text: str) -> Any:
    """Command-line values are YAML scalars: 24, 1e-4, true, null, [0.9, 0.98], cycle."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: typing.Sequence[str]) -> dict[str, Any]:
    """`--model.num_layers=24` or `--model.num_layers 24` -> {"model.num_layers": 24}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"unexpected argument {arg!r}; overrides look like --model.num_layers=24"
            )
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value; write {arg}=VALUE")
        out[key] = _parse_scalar(text)
        i += 1
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, checking each part against the Config dataclasses so
    that a typo names the closest valid key."""
    parts = key.split(".")
    node, cls = tree, Config
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        prefix = ".".join(parts[:depth])
        if part not in names:
            raise ConfigError(
                f"unknown config key {key!r}{_did_you_mean(part, names)};"
                f" valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}"
            )
        field_type = typing.get_type_hints(cls)[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(field_type):
                raise ConfigError(
                    f"{key!r} is a section; override one of its keys, e.g. --{key}.KEY=VALUE"
                )
            node[part] = value
            return
        if not dataclasses.is_dataclass(field_type):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])!r} is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: expected a mapping of keys")
        cls = field_type


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: typing.Sequence[str] | dict[str, Any] = (),
) -> Config:
    """Load a YAML config and apply dotted overrides (a list of `--a.b=v` or a dict)."""
    tree = load_yaml(path) if path is not None else {}
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    return from_dict(Config, tree)

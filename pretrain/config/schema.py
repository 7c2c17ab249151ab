"""The run configuration's schema: one dataclass per section, with its defaults, docs and checks.

Each leaf's range is field metadata (`bounded`), checked by one loop in `Section`; checks
that relate several keys live in the section's `__post_init__`, and checks across
sections in `Config.__post_init__`. Every message is in the words of the config file.
Reading files and overrides into these classes is `pretrain.config.loading`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pretrain.errors import UserError, did_you_mean
from pretrain.families import FAMILIES, FamilySpec
from pretrain.sharing import STRATEGIES, shared_range


class ConfigError(UserError, ValueError):
    """A configuration mistake, worded for the person who wrote the config."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a number: each end inclusive unless marked open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(["[not self.low_open], ")]"[not self.high_open]
        return f"in {left}{self.low:g}, {self.high:g}{right}"


def bounded(default: Any, *, ge=None, gt=None, le=None, lt=None, **kwargs) -> Any:
    """A dataclass field whose value (each value, for a tuple; None passes) must lie in the
    given range; `Section` checks it."""
    bounds = Bounds(
        low=gt if gt is not None else ge,
        high=lt if lt is not None else le,
        low_open=gt is not None,
        high_open=lt is not None,
    )
    return field(default=default, metadata={"bounds": bounds}, **kwargs)


class Section:
    """Base of the config sections: `__post_init__` checks every bounded field; a section
    with cross-field checks runs them after calling it."""

    section: ClassVar[str]
    """The prefix of the section's keys in messages (`optim` for optim.lr)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            bounds = f.metadata.get("bounds")
            value = getattr(self, f.name)
            if bounds is None or value is None:
                continue
            values = value if isinstance(value, tuple) else (value,)
            each = " each" if isinstance(value, tuple) else ""
            shown = list(value) if isinstance(value, tuple) else value
            _check(
                all(v in bounds for v in values),
                f"{self.section}.{f.name} ({shown}) must{each} be {bounds}",
            )


@dataclass
class SharingConfig(Section):
    """Cross-layer parameter sharing: which logical layers use which parameter set."""

    section: ClassVar[str] = "sharing"

    strategy: str = "none"
    """none | all | sequence | cycle | cycle_rev (exact mappings: the README's sharing table)."""
    num_sets: int | None = bounded(None, ge=1)
    """M, the number of shared parameter sets (sequence, cycle, cycle_rev); 1 for all."""
    scope: Literal["block", "attention", "ffn"] = "block"
    """What is shared: the whole block, only attention, or only the feed-forward network."""
    start: int = bounded(0, ge=0)
    """First logical layer of the shared range (inclusive)."""
    end: int | None = None
    """Last logical layer of the shared range (inclusive); default: the last layer."""
    share_qk: bool = False
    """Use one projection for queries and keys inside each layer (W_q = W_k); needs
    num_kv_heads == num_heads (no grouped-query attention)."""
    ratio: float = bounded(1.0, gt=0.0, le=1.0)
    """Relaxed sharing: the shared sets hold this fraction of the shared range's parameters;
    below 1, every layer in the range adds a low-rank delta to each shared linear weight,
    its rank chosen to spend the rest. 1.0 is pure sharing."""
    tie_penalty: float = bounded(0.0, ge=0.0)
    """Weight of an L2 penalty on the per-layer deltas (soft sharing); needs ratio < 1."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.strategy in STRATEGIES,
            f"sharing.strategy: unknown strategy {self.strategy!r}"
            f"{did_you_mean(self.strategy, STRATEGIES)};"
            f" choose one of {', '.join(STRATEGIES)}",
        )
        if STRATEGIES[self.strategy].takes_sets:
            _check(
                self.num_sets is not None,
                f"sharing.num_sets is required for {self.strategy} sharing",
            )
        else:
            _check(
                self.num_sets is None,
                f"sharing.num_sets ({self.num_sets}) has no meaning for {self.strategy} sharing;"
                " remove it",
            )
        _check(
            self.ratio == 1.0 or self.strategy != "none",
            f"sharing.ratio ({self.ratio}) relaxes sharing, but sharing.strategy is none;"
            " choose a sharing strategy or set ratio to 1.0",
        )
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
class UniversalConfig(Section):
    """Universal Transformer mode: one shared block iterated with Adaptive Computation Time."""

    section: ClassVar[str] = "universal"

    enabled: bool = False
    """Apply the shared block for up to num_layers steps with ACT halting."""
    halting_threshold: float = bounded(0.99, gt=0.0, lt=1.0)
    """A position halts once its accumulated halting probability exceeds this (1 - 0.01)."""
    ponder_weight: float = bounded(0.01, ge=0.0)
    """Weight of the ponder cost mean(N + R) in the loss."""
    halting_bias_init: float = 1.0
    """Initial bias of the halting unit, so that early steps tend to continue."""


@dataclass
class ModelConfig(Section):
    """The shared-layer Transformer: sizes, block family and sharing plan."""

    section: ClassVar[str] = "model"

    family: str = "albert"
    """A family of pretrain/families: albert (post-LN, GELU, biases, learned positions,
    bidirectional, MLM + SOP) or llama (pre-RMSNorm, SwiGLU, RoPE, no biases, causal LM)."""
    vocab_size: int = bounded(30000, ge=1)
    """V, token ids in the table; the tokenizer's vocabulary size."""
    embedding_size: int = bounded(128, ge=1)
    """E, the width of the token table; factorized when E < hidden_size."""
    hidden_size: int = bounded(768, ge=1)
    """H, the width of every layer."""
    num_layers: int = bounded(12, ge=1)
    """L, the number of logical layers (layer applications)."""
    num_heads: int = bounded(12, ge=1)
    """Attention heads; hidden_size must divide by it."""
    num_kv_heads: int | None = bounded(None, ge=1)
    """Key/value heads for grouped-query attention (llama); default: num_heads."""
    intermediate_size: int = bounded(3072, ge=1)
    """Width of the feed-forward layer."""
    max_position_embeddings: int = bounded(512, ge=1)
    """Longest sample the position table (albert) or RoPE tables (llama) cover."""
    type_vocab_size: int | None = None
    """Token type (segment) embeddings; default 2 for albert, 0 (none) for llama."""
    norm_eps: float | None = None
    """LayerNorm / RMSNorm epsilon; default 1e-12 for albert, 1e-6 for llama."""
    rope_theta: float = 10000.0
    """llama only: the RoPE base."""
    dropout: float = bounded(0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings and sublayer outputs while training."""
    attention_dropout: float = bounded(0.0, ge=0.0, lt=1.0)
    """Dropout on attention probabilities while training."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of weights."""
    pad_token_id: int = 0
    """The padding id: its embedding starts at zero."""
    sop_head: bool = True
    """albert only: a sentence-order prediction head on the first token."""
    hidden_act: Literal["gelu_new", "gelu"] = "gelu_new"
    """albert only: GELU of the FFN and MLM head, tanh approximation (ALBERT's gelu_new) or
    exact (BERT's gelu, for imported BERT models)."""
    sharing: SharingConfig = field(default_factory=SharingConfig)
    universal: UniversalConfig = field(default_factory=UniversalConfig)

    def __post_init__(self) -> None:
        _check(
            self.family in FAMILIES,
            f"model.family: {self.family!r} is not one of"
            f" {' | '.join(map(repr, FAMILIES))}{did_you_mean(self.family, FAMILIES)}",
        )
        for key, value in self.spec.defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        super().__post_init__()
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
        for problem in self.spec.problems(self):
            _check(False, problem)
        self._check_sharing()
        if self.universal.enabled:
            _check(
                self.sharing.strategy == "all"
                and self.sharing.scope == "block"
                and len(shared_range(self.sharing, self.num_layers)) == self.num_layers
                and self.sharing.ratio == 1.0,
                "model.universal.enabled needs model.sharing.strategy=all over every layer with"
                " scope=block and ratio 1.0: a Universal Transformer iterates one shared block",
            )

    @property
    def spec(self) -> FamilySpec:
        return FAMILIES[self.family]

    @property
    def causal(self) -> bool:
        return self.spec.causal

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def _check_sharing(self) -> None:
        """The shared range fits the model and holds what the strategy needs."""
        s, L = self.sharing, self.num_layers
        _check(
            not s.share_qk or self.num_kv_heads == self.num_heads,
            f"sharing.share_qk needs model.num_kv_heads == model.num_heads: with grouped-query"
            f" attention ({self.num_kv_heads} key heads for {self.num_heads} query heads) one"
            f" projection cannot give both; set model.num_kv_heads={self.num_heads} or"
            " sharing.share_qk=false",
        )
        layers = shared_range(s, L)
        _check(
            layers.stop <= L,
            f"sharing.end ({s.end}) must be a layer index below model.num_layers ({L})",
        )
        strategy, span, M = STRATEGIES[s.strategy], len(layers), s.num_sets
        if not strategy.takes_sets:
            return
        where = (
            f"the shared range {layers.start}..{layers.stop - 1}"
            if span != L
            else "model.num_layers"
        )
        _check(
            span % M == 0 or not strategy.equal_runs,
            f"{where} ({span}) must be divisible by sharing.num_sets ({M})"
            f" for {s.strategy} sharing",
        )
        _check(span >= M, f"sharing.num_sets ({M}) must not exceed {where} ({span})")
        k = strategy.layers_per_set
        _check(
            k * M <= span,
            f"{s.strategy} sharing needs {where} ({span}) of at least {k} x"
            f" sharing.num_sets ({M}) layers",
        )


@dataclass
class DataConfig(Section):
    """Preprocessed token shards and how samples are cut from them."""

    section: ClassVar[str] = "data"

    path: str = ""
    """Folder of preprocessed shards (tools/preprocess.py)."""
    tokenizer: str = ""
    """The run's tokenizer folder; default: the copy inside data.path. The shards must have
    been tokenized with it (checked by checksum)."""
    seq_length: int = bounded(128, ge=8)
    """Tokens per training sample."""
    short_seq_prob: float = bounded(0.1, ge=0.0, le=1.0)
    """Probability of a shorter target length (ALBERT)."""
    num_workers: int | None = bounded(None, ge=0)
    """Loader worker processes per rank; 0 loads in the training process. Default: 1 on
    GPUs; 0 on CPUs, where a worker would build batches on the cores the ranks compute on."""


@dataclass
class ObjectiveConfig(Section):
    """Loss terms and their weights."""

    section: ClassVar[str] = "objective"

    mlm_weight: float = bounded(1.0, ge=0.0)
    """Weight of the masked-LM loss (albert)."""
    sop_weight: float = bounded(1.0, ge=0.0)
    """Weight of the sentence-order loss (albert with sop_head)."""
    clm_weight: float = bounded(1.0, ge=0.0)
    """Weight of the next-token loss (llama)."""
    mask_prob: float = bounded(0.15, gt=0.0, lt=1.0)
    """Share of the positions masked for MLM."""
    max_predictions: int = bounded(20, ge=1)
    """At most this many masked positions per sample."""
    max_ngram: int = bounded(3, ge=1)
    """Longest n-gram masked as one span (ALBERT's n-gram masking); 1: single tokens."""
    whole_word: bool = True
    """Mask whole words (all pieces of a word together) instead of single pieces."""


@dataclass
class OptimConfig(Section):
    """Optimizer and learning-rate schedule."""

    section: ClassVar[str] = "optim"

    name: Literal["adamw", "lamb"] = "adamw"
    """adamw (fused where the device has it) or lamb (per-tensor trust ratio)."""
    lr: float = bounded(1e-3, gt=0.0)
    """Peak learning rate, reached at the end of the warmup."""
    weight_decay: float = bounded(0.01, ge=0.0)
    """Decoupled weight decay; biases and norms are exempt."""
    betas: tuple[float, float] = bounded((0.9, 0.999), ge=0.0, lt=1.0)
    """Adam's (beta1, beta2)."""
    eps: float = 1e-6
    """Adam's epsilon."""
    warmup_steps: int = bounded(0, ge=0)
    """Linear warmup from 0 to lr over this many steps."""
    decay: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after the warmup, down to min_lr_ratio * lr at max_steps."""
    min_lr_ratio: float = bounded(0.0, ge=0.0, le=1.0)
    """The decayed learning rate's floor, as a fraction of lr."""
    grad_clip: float = bounded(1.0, ge=0.0)
    """Gradient-norm clipping; 0 disables it."""


@dataclass
class EngineConfig(Section):
    """How DeepSpeed runs the model: ZeRO stage, precision, batch, offload."""

    section: ClassVar[str] = "engine"

    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision; bf16 and fp16 keep fp32 master weights. auto: bf16 on GPUs that
    have it, else fp16; on CPUs bf16 only where its matmuls are native (AMX, AVX-512-BF16,
    Arm BF16) and measured faster than fp32's, else fp32. The log says which ran and why;
    checkpoints record it."""
    micro_batch_size: int = bounded(8, ge=1)
    """Samples per rank per forward pass."""
    grad_accum_steps: int = bounded(1, ge=1)
    """Micro-batches per optimizer step."""
    offload_optimizer: bool = False
    """Keep optimizer states and their step on the CPU (ZeRO-Offload)."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses (ZeRO-3 only)."""
    activation_checkpointing: bool = False
    """Non-reentrant activation checkpointing of every layer application."""
    zero3_persistence_threshold: int = 100000
    """ZeRO-3 keeps parameters smaller than this many elements unpartitioned (DeepSpeed's
    stage3_param_persistence_threshold); 0 partitions everything."""
    comms_logger: bool = False
    """Record every collective (DeepSpeed comms logger) and print a summary at the end."""
    pipeline_stages: int = bounded(1, ge=1)
    """Pipeline stages (DeepSpeed's pipeline engine); the ranks split into this many stages
    times world_size / stages data-parallel replicas. 1: no pipeline."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.pipeline_stages == 1
            or (self.zero_stage <= 1 and not self.activation_checkpointing),
            f"engine.pipeline_stages={self.pipeline_stages} needs engine.zero_stage 0 or 1"
            f" (got {self.zero_stage}) and engine.activation_checkpointing=false",
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
class TrainConfig(Section):
    """Length of the run, where it writes, and where it starts from."""

    section: ClassVar[str] = "train"

    max_steps: int = bounded(1000, ge=1)
    """Optimizer steps of the run."""
    output_dir: str = "runs/default"
    """Where checkpoints, metrics.jsonl and TensorBoard logs go; a run there resumes."""
    seed: int = 1234
    """Seeds the initialisation, masking and data order."""
    eval_every: int = bounded(0, ge=0)
    """Evaluate on the held-out split every N steps; 0 disables it."""
    eval_steps: int = bounded(10, ge=1)
    """Held-out micro-batches per rank in each evaluation."""
    init_from: str = ""
    """A native export (e.g. an imported Hugging Face model) to start from instead of a
    random initialisation; ignored when the run resumes from its own checkpoint."""
    on_nonfinite: Literal["skip", "stop"] = "skip"
    """A NaN/inf loss: skip that micro-batch's update and go on, or stop the run (the last
    checkpoint stays as it was)."""
    max_skipped_steps: int = bounded(10, ge=1)
    """With on_nonfinite=skip: stop with an error when this many optimizer steps in a row had
    every micro-batch skipped (a diverged run). No checkpoint is written while steps are
    being skipped, so `latest` stays the last sound state."""
    replan_schedule: bool = False
    """Allow resuming with LR-schedule settings (optim.lr, warmup_steps, decay, min_lr_ratio,
    or max_steps under a decaying schedule) other than the checkpoint's: the LR is re-planned
    from this config at the step reached. Without it such a resume is refused, since the
    checkpoint carries its own schedule on (it would ignore the new settings)."""
    allow_loss_change: bool = False
    """Allow resuming with settings of the loss (objective.*: terms, weights, masking;
    distill.*: teacher, alpha, temperature, hidden matching) other than the checkpoint's.
    Without it such a resume is refused: a run's steps would be taken under two losses
    while its metrics and checkpoints read as one run."""
    compile: bool = False
    """torch.compile each shared parameter set's block once (a set used by L layers is one
    compiled module, not L); ZeRO stages 0-2."""


@dataclass
class CheckpointConfig(Section):
    section: ClassVar[str] = "checkpoint"

    every: int = bounded(0, ge=0)
    """Save every N steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep_last: int = bounded(3, ge=1)
    """Checkpoints kept; older ones are deleted after each save."""


@dataclass
class LoggingConfig(Section):
    section: ClassVar[str] = "logging"

    every: int = bounded(10, ge=1)
    """Log metrics every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files beside metrics.jsonl."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install wandb) from rank 0, with the resolved config
    and the unique/effective parameter counts; a resumed run continues the same W&B run."""
    wandb_project: str = "pretrain"
    """The W&B project."""
    wandb_run_name: str = ""
    """The W&B run's name; default: the name of train.output_dir."""
    wandb_mode: Literal["", "online", "offline"] = ""
    """offline: write the run under train.output_dir/wandb for `wandb sync` later; empty:
    the WANDB_MODE environment variable, else online."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for MFU; default: the datasheet figure for the device's
    name, or where there is none (CPUs), a matmul peak measured at start."""


@dataclass
class DistillConfig(Section):
    """Knowledge distillation: a fixed teacher's token distributions added to the loss."""

    section: ClassVar[str] = "distill"

    teacher: str = ""
    """The teacher: a Hugging Face model folder, a native export, or one of our run
    directories/checkpoint folders (its newest valid checkpoint); empty: no distillation.
    Its vocabulary and tokenizer must be the student's (`python -m pretrain check`)."""
    alpha: float = bounded(1.0, ge=0.0)
    """Weight of the distillation term: loss = task loss + alpha * T^2 * KL(teacher||student)."""
    temperature: float = bounded(1.0, gt=0.0)
    """T: both distributions are softened by dividing the logits by T."""
    hidden_weight: float = bounded(0.0, ge=0.0)
    """Weight of hidden-state matching: the mean squared error between the output of each
    matched student layer application (through a learned linear projection when the widths
    differ) and its teacher layer's, at real tokens; 0 turns it off."""
    layer_map: tuple[int, ...] = ()
    """The teacher layer each student layer application is matched to (0-based, -1 for
    none), one entry per application: a shared set used at several depths is matched at
    each. Empty: application i of L matches the teacher layer j at the same relative depth,
    (i + 1) / L = (j + 1) / L_teacher, where there is one (the last layers always)."""


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
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
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
        self._check_hidden_distillation()
        self._check_pipeline()

    def _check_pipeline(self) -> None:
        m, stages = self.model, self.engine.pipeline_stages
        # What a pipelined run cannot carry, and the setting that removes it.
        fixes = {
            "model.universal.enabled=false": m.universal.enabled,
            "model.sharing.ratio=1.0": m.sharing.ratio < 1.0,
            "model.sop_head=false": m.spec.sop_head and m.sop_head,
            "distill.teacher=''": bool(self.distill.teacher),
        }
        needed = [fix for fix, applies in fixes.items() if applies]
        _check(
            stages == 1 or not needed,
            f"engine.pipeline_stages={stages} runs the MLM or causal LM objective of a purely"
            f" shared stack (no ACT, deltas, SOP head or teacher); set {', '.join(needed)}",
        )
        _check(
            stages <= m.num_layers,
            f"engine.pipeline_stages ({stages}) must not exceed model.num_layers ({m.num_layers})",
        )

    def _check_hidden_distillation(self) -> None:
        d, L = self.distill, self.model.num_layers
        if d.hidden_weight == 0.0:
            _check(
                not d.layer_map,
                "distill.layer_map is set but distill.hidden_weight is 0; set a weight or"
                " remove the map",
            )
            return
        _check(
            bool(d.teacher),
            "distill.hidden_weight needs a distill.teacher whose hidden states to match",
        )
        _check(
            not self.model.universal.enabled,
            "distill.hidden_weight cannot match a Universal Transformer's layers (positions"
            " halt at different steps); set distill.hidden_weight=0",
        )
        _check(
            not d.layer_map or len(d.layer_map) == L,
            f"distill.layer_map has {len(d.layer_map)} entries; it needs one per layer"
            f" application (model.num_layers = {L})",
        )
        _check(
            all(t >= -1 for t in d.layer_map) and any(t >= 0 for t in d.layer_map or [0]),
            f"distill.layer_map ({list(d.layer_map)}) takes teacher layers >= 0, -1 for an"
            " unmatched application, and at least one match",
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (YAML/JSON serialisable)."""
        return to_dict(self)


def to_dict(obj: Any) -> Any:
    """A config (or any section) as plain data: dataclasses to dicts, tuples to lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj

"""Pipeline parallelism: a SharedTransformer as DeepSpeed's PipelineModule.

The model becomes a list of layers: the embeddings, then each of the L layer applications
as its attention and its feed-forward sublayer, then the head. Every sublayer entry is a
TiedLayerSpec keyed by its parameter set, so a stage holds one copy of each set it runs,
however many of its layers use it, and a set used on several stages is all-reduced across
exactly those stages once per step. The token table (with the factorized projection for a
head that reads it) is tied between the embeddings and the head the same way. The entries
wrap the model's own modules: nothing is built twice.

Between stages only tensors travel: (hidden states, attention mask, labels). The labels
ride along so that the last stage evaluates the MLM head at the masked positions only.
Stages are cut between layer applications, balanced by training FLOPs: every application
costs the same, the embeddings and the head what `model.accounting` counts for them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.utils import partition_balanced
from torch import nn

from pretrain.config import Config, ModelConfig
from pretrain.engine.consolidate import stage_fp32_state_dict
from pretrain.engine.weights import safe_load
from pretrain.model import ModelOutput, SharedTransformer
from pretrain.model.accounting import count, predicted_fraction
from pretrain.model.blocks import LayerContext
from pretrain.objectives import compute_loss
from pretrain.objectives.mlm import predict_mask
from pretrain.sharing import SharingPlan

Activations = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(h_BTH, attention_mask_BT, labels_BT): what one stage hands the next."""

EMBEDDINGS = "embeddings"
"""The tie key of the token table, shared by the first and the last stage."""


class _Contexts:
    """The attention context of the micro-batch a stage is running, built once per stage
    and micro-batch: every sublayer of the stage receives the same mask tensor."""

    def __init__(self, model: SharedTransformer) -> None:
        self.model = model
        self.key: tuple[torch.Tensor, torch.dtype] | None = None
        self.ctx: LayerContext | None = None

    def __call__(self, h_BTH: torch.Tensor, mask_BT: torch.Tensor) -> LayerContext:
        if self.key is None or self.key[0] is not mask_BT or self.key[1] != h_BTH.dtype:
            # Masks keep one shape from micro-batch to micro-batch (the engine sizes its
            # receive buffers once), so a batch without padding carries an all-ones one;
            # seen here (one host sync per stage and micro-batch), attention runs unmasked
            # as it would without the pipeline (the flash kernel on GPUs). The context
            # reads only the shape and device of the ids.
            mask = None if bool(mask_BT.all()) else mask_BT
            self.ctx = self.model.attention_context(h_BTH, mask, h_BTH.dtype)
            self.key = (mask_BT, h_BTH.dtype)
        return self.ctx


class EmbedPipe(nn.Module):
    """First stage: (ids, mask, token types, labels) -> (h, mask, labels)."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> Activations:
        ids_BT, mask_BT, types_BT, labels_BT = inputs
        return self.embeddings(ids_BT, types_BT), mask_BT, labels_BT


def _hold(module: EmbedPipe, inputs: Activations) -> Activations:
    """The last stage's entry for the tied token table: it only places the copy there (the
    head reads it); the activations pass unchanged."""
    return inputs


class SublayerPipe(nn.Module):
    """One parameter set's attention or feed-forward sublayer, as a pipeline layer."""

    def __init__(self, sublayer: nn.Module, contexts: _Contexts) -> None:
        super().__init__()
        self.sublayer = sublayer
        self.contexts = contexts

    def forward(self, inputs: Activations) -> Activations:
        h_BTH, mask_BT, labels_BT = inputs
        return self.sublayer(h_BTH, self.contexts(h_BTH, mask_BT)), mask_BT, labels_BT


class HeadPipe(nn.Module):
    """Last stage: final norm and token head -> logits, (N, V) at the masked positions for
    MLM, (B, T, V) for causal LM."""

    def __init__(self, model: SharedTransformer) -> None:
        super().__init__()
        self.final_norm = model.final_norm
        self.head = model.head
        self.masked = not model.cfg.causal
        # The token table is the tied copy registered under the EMBEDDINGS key on this
        # stage; a tuple keeps it out of this layer's parameters and checkpoint file.
        self.tied = (model.embeddings,)

    def forward(self, inputs: Activations) -> torch.Tensor:
        h_BTH, _, labels_BT = inputs
        if self.final_norm is not None:
            h_BTH = self.final_norm(h_BTH)
        h_sel = h_BTH[predict_mask(labels_BT)] if self.masked else h_BTH
        return self.head(h_sel, self.tied[0])


def label_key(model: SharedTransformer) -> str:
    """The batch field the model's token objective reads."""
    return "labels" if model.cfg.causal else "mlm_labels"


def head_reads(model: SharedTransformer) -> list[str]:
    """The embedding parameters the token head uses (the tied ones), found by a backward
    pass through the head rather than by family."""
    names, params = zip(*model.embeddings.named_parameters(), strict=True)
    h_1H = torch.zeros(1, model.cfg.hidden_size, device=params[0].device, dtype=params[0].dtype)
    logits = model.head(h_1H, model.embeddings)
    grads = torch.autograd.grad(logits.sum(), params, allow_unused=True)
    return [n for n, g in zip(names, grads, strict=True) if g is not None]


def unit_flops(model: SharedTransformer, cfg: Config) -> list[float]:
    """Training FLOPs per token of the embeddings, each layer application, and the head
    (at the positions the objective predicts)."""
    accounting = count(model, cfg.data.seq_length, predicted_fraction(cfg))
    parts = {c.name: c.flops_per_token for c in accounting.components}
    L = model.plan.num_layers
    layer = (parts["blocks.attention"] + parts["blocks.ffn"]) / L
    head = parts["heads.token"] + parts.get("blocks.final_norm", 0.0)
    return [parts["embeddings"], *[layer] * L, head]


def unit_bounds(model: SharedTransformer, cfg: Config) -> list[int]:
    """Stage boundaries over the units (embeddings, the L layer applications, head):
    contiguous runs whose FLOPs are as even as DeepSpeed's balanced partition makes them
    (it minimises the largest stage minus the smallest). A stage may hold the head alone
    when the head outweighs a layer application several times (a large causal vocabulary)."""
    return partition_balanced(unit_flops(model, cfg), cfg.engine.pipeline_stages)


def layer_stages(bounds: list[int]) -> list[int]:
    """The stage of each layer application, from `unit_bounds`."""
    unit_stage = [s for s in range(len(bounds) - 1) for _ in range(bounds[s], bounds[s + 1])]
    return unit_stage[1:-1]


def _spec_bounds(bounds: list[int]) -> list[int]:
    """`unit_bounds` over the layer list: entry 0 is the embeddings, entries 2u - 1 and 2u
    layer application u - 1's sublayers, then the head's two entries (tied table, head)."""
    return [0 if b == 0 else 2 * b - 1 for b in bounds]


def _tied(
    key: str,
    module: nn.Module,
    wrap: Callable,
    *args,
    attrs: list[str] | None = None,
    forward_fn: Callable | None = None,
) -> TiedLayerSpec:
    """A tied entry wrapping `module`; all its parameters are all-reduced unless `attrs`
    names the ones (wrapper attribute paths) the stages share."""
    if attrs is None:
        attrs = [f"sublayer.{n}" for n, _ in module.named_parameters()]
    return TiedLayerSpec(key, wrap, module, *args, forward_fn=forward_fn, tied_weight_attr=attrs)


def layer_list(model: SharedTransformer) -> list:
    """The pipeline's layers: embeddings, 2L sublayers in order, tied table, head."""
    contexts = _Contexts(model)
    table = [f"embeddings.{n}" for n in head_reads(model)]
    enc, plan = model.encoder, model.plan
    layers: list = [_tied(EMBEDDINGS, model.embeddings, EmbedPipe, attrs=table)]
    for i in range(plan.num_layers):
        for component in ("attention", "ffn"):
            s = plan.table(component)[i]
            sublayer = getattr(enc, component)[s]
            layers.append(_tied(f"{component}_{s}", sublayer, SublayerPipe, contexts))
    layers.append(_tied(EMBEDDINGS, model.embeddings, EmbedPipe, attrs=table, forward_fn=_hold))
    layers.append(HeadPipe(model))
    return layers


class SharedPipeline(PipelineModule):
    """PipelineModule with stages cut by `unit_bounds`, and tied all-reduces only for the
    sets that more than one stage holds (a set on one stage needs none). The last stage
    keeps each micro-batch's metrics (`take_metrics`)."""

    def __init__(self, model: SharedTransformer, cfg: Config) -> None:
        bounds = unit_bounds(model, cfg)
        self.layer_stage = layer_stages(bounds)
        self.spec_bounds = _spec_bounds(bounds)
        self.cfg, self.label_key = cfg, label_key(model)
        self.metrics: list[dict[str, torch.Tensor]] = []
        super().__init__(
            layers=layer_list(model),
            num_stages=cfg.engine.pipeline_stages,
            loss_fn=self.micro_loss,
        )
        self.tied_comms = {k: c for k, c in self.tied_comms.items() if len(c["ranks"]) > 1}

    def micro_loss(self, logits: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """The engine's loss_fn: the objective's loss of one micro-batch."""
        output = ModelOutput(logits=logits)
        loss, metrics = compute_loss(output, {self.label_key: labels_BT}, self.cfg)
        self.metrics.append(metrics)
        return loss

    def take_metrics(self) -> list[dict[str, torch.Tensor]]:
        """The metrics of the micro-batches run since the last call (none but on the last
        stage)."""
        metrics, self.metrics = self.metrics, []
        return metrics

    def _partition_layers(self, method: str = "flops") -> None:
        self.parts = list(self.spec_bounds)
        self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])


def from_last_stage(engine, values: dict[str, float]) -> dict[str, float]:
    """The last stage's `values` on every stage of its pipeline: only it computes the
    objective's metrics. Averaging the result over all ranks then averages the replicas."""
    grid = engine.grid
    last = grid.stage_to_global(stage_id=engine.num_stages - 1, data=grid.data_parallel_id)
    holder = [values]
    dist.broadcast_object_list(holder, src=last, group=grid.get_pipe_parallel_group())
    return holder[0]


def pipeline_batch(batch: dict[str, torch.Tensor], key: str) -> tuple[tuple, torch.Tensor]:
    """A loader batch as the pipeline engine takes it: (first stage's inputs, labels). Only
    tensors of fixed shapes travel, so a batch without an attention mask (the loader drops
    an all-ones one) carries an all-ones mask, and one without token types the zeros the
    model would assume."""
    ids_BT = batch["input_ids"]
    mask_BT = batch.get("attention_mask")
    types_BT = batch.get("token_type_ids")
    mask_BT = torch.ones_like(ids_BT) if mask_BT is None else mask_BT
    types_BT = torch.zeros_like(ids_BT) if types_BT is None else types_BT
    return (ids_BT, mask_BT, types_BT, batch[key]), batch[key]


def _model_name(name: str) -> str:
    """A pipeline module's parameter name as the model's: `tied_modules.attention_3.sublayer.X`
    is `encoder.attention.3.X`, `tied_modules.embeddings.embeddings.X` is `embeddings.X`,
    and the head's `<entry>.X` is `X`."""
    first, _, rest = name.partition(".")
    if first != "tied_modules":
        return rest
    key, _, rest = rest.partition(".")
    if key == EMBEDDINGS:
        return rest
    component, index = key.rsplit("_", 1)
    return f"encoder.{component}.{index}.{rest.removeprefix('sublayer.')}"


def _masters(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The model's fp32 master weights from every stage's optimizer files. A set held by
    several stages is the same on each; the embeddings are taken from the first stage,
    the only one that trains all of them (the last reads only the tied table)."""
    stages = len(list(tag_dir.glob("mp_rank_*_model_states.pt")))
    state: dict[str, torch.Tensor] = {}
    for stage in range(stages):
        for name, tensor in stage_fp32_state_dict(tag_dir, stage).items():
            state.setdefault(_model_name(name), tensor)
    return state


def _layer_names(cfg: ModelConfig) -> dict[int, tuple[str, str]]:
    """Layer-list index -> (prefix in its checkpoint file, prefix in the model's state
    dict) for every entry that saves one: a set's file appears once per layer using it,
    the tied table's second entry and the head's copy of it not at all."""
    plan, L = SharingPlan.from_config(cfg), cfg.num_layers
    names = {0: ("", ""), 2 * L + 2: ("", "")}  # EmbedPipe and HeadPipe keep the model's names
    for i in range(L):
        for entry, component in enumerate(("attention", "ffn"), start=2 * i + 1):
            set_ = plan.table(component)[i]
            names[entry] = ("sublayer.", f"encoder.{component}.{set_}.")
    return names


def layer_state_dict(tag_dir: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's state dict as the stages held it, from a pipelined checkpoint's
    layer_XX-model_states.pt files (in the run's precision, returned in fp32)."""
    state: dict[str, torch.Tensor] = {}
    for index, (theirs, ours) in _layer_names(cfg).items():
        for key, tensor in safe_load(Path(tag_dir) / f"layer_{index:02d}-model_states.pt").items():
            state[ours + key.removeprefix(theirs)] = tensor.float()
    return state


def pipeline_state_dict(tag_dir: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The model's fp32 state dict from a pipelined checkpoint (None for another kind): the
    optimizer's fp32 master weights under ZeRO-1 or bf16/fp16, else (ZeRO-0 in fp32, whose
    weights are the masters) the layer files."""
    tag_dir = Path(tag_dir)
    if not any(tag_dir.glob("layer_*-model_states.pt")):
        return None
    if any(tag_dir.glob("*_optim_states.pt")):
        return _masters(tag_dir)
    return layer_state_dict(tag_dir, cfg)

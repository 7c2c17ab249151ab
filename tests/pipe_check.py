"""Pipelined training against data-parallel training of the same model; run by
tests/test_pipeline.py (`torchrun --nproc_per_node=N tests/pipe_check.py
FAMILY:PLAN:ZERO:STAGES ...`).

Each step has one global batch of N * B samples, cut into chunks of B. The reference is
DeepSpeed's data-parallel engine on N ranks, rank r taking chunk r. The pipelined run has
S stages, N / S replicas and S micro-batches per step: replica d takes chunks dS to dS + S - 1.
Both average the loss over the same chunks, so their per-step losses agree to float
rounding if the pipeline splits, ties and all-reduces the model as it should.

The tied all-reduce is measured with the comms logger around the pipeline's ReduceTiedGrads
instruction. Rank 0 prints one JSON line per layout and rank.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import schedule
from helpers import tiny_config

from pretrain.config import Config, DataConfig, EngineConfig, OptimConfig
from pretrain.data.masking import IGNORE_INDEX
from pretrain.engine import runtime
from pretrain.engine.pipeline import SharedPipeline, label_key, pipeline_batch
from pretrain.model import SharedTransformer
from pretrain.objectives import compute_loss, model_inputs

STEPS = 3
B, T = 2, 12
PLANS = {"none": {}, "all": {"strategy": "all"}, "cycle": {"strategy": "cycle", "num_sets": 2}}
OPTIM = OptimConfig(lr=0.01, decay="constant")
# The embedding tensors each family's head reads: albert's MLM head decodes with the token
# table, llama's also projects back through the factorized projection.
HEAD_READS = {"albert": {"tokens.weight"}, "llama": {"tokens.weight", "project.weight"}}


def global_batch(family: str, step: int, size: int) -> list[dict[str, torch.Tensor]]:
    """`size` chunks of B samples, the same on every rank. ALBERT's pad the last row of each
    chunk; llama's causal windows have no padding and no attention mask."""
    g = torch.Generator().manual_seed(1000 + step)
    ids_NT = torch.randint(5, 97, (size * B, T), generator=g)
    mask_NT = torch.ones_like(ids_NT)
    mask_NT[B - 1 :: B, T - 3 :] = 0
    if family == "llama":  # packed windows: no padding, so no mask (attention unmasked)
        labels_NT = torch.cat([ids_NT[:, 1:], torch.full_like(ids_NT[:, :1], IGNORE_INDEX)], 1)
        return [
            {"input_ids": ids, "labels": labels}
            for ids, labels in zip(ids_NT.split(B), labels_NT.split(B), strict=True)
        ]
    picked_NT = (torch.rand(ids_NT.shape, generator=g) < 0.3) & (mask_NT == 1)
    picked_NT[:, 0] = True  # every row predicts at least one token
    labels_NT = torch.where(picked_NT, ids_NT, IGNORE_INDEX)
    ids_NT = torch.where(picked_NT, 4, ids_NT)
    whole = {"input_ids": ids_NT, "attention_mask": mask_NT, "mlm_labels": labels_NT}
    return [{k: v[c * B : (c + 1) * B] for k, v in whole.items()} for c in range(size)]


def config(family: str, plan: str, zero: int, stages: int, accum: int) -> Config:
    engine = EngineConfig(
        zero_stage=zero,
        micro_batch_size=B,
        grad_accum_steps=accum,
        pipeline_stages=stages,
        comms_logger=True,
        precision="fp32",
    )
    model = tiny_config(family, sharing=PLANS[plan], sop_head=False)
    return Config(model=model, data=DataConfig(seq_length=T), optim=OPTIM, engine=engine)


def reference(cfg: Config, world) -> list[float]:
    torch.manual_seed(0)
    engine = runtime.initialize(SharedTransformer(cfg.model).train(), cfg, world)
    losses = []
    for step in range(STEPS):
        batch = global_batch(cfg.model.family, step, world.size)[world.rank]
        loss, _ = compute_loss(engine(**model_inputs(batch)), batch, cfg)
        engine.backward(loss)
        engine.step()
        losses.append(runtime.mean_across_ranks({"loss": loss.item()}, world.device)["loss"])
    engine.destroy()
    return losses


def count_tied_bytes(engine, record: list[int]) -> None:
    """Record the all-reduced bytes of each ReduceTiedGrads instruction (the engine looks
    its instructions up on the instance first)."""
    run = type(engine)._INSTRUCTION_MAP[schedule.ReduceTiedGrads]

    def counted(self) -> None:
        before = runtime.comm_bytes().get("all_reduce", 0)
        run(self)
        record.append(runtime.comm_bytes().get("all_reduce", 0) - before)

    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, schedule.ReduceTiedGrads: counted}


def tied_bytes_expected(model: SharedTransformer, pipe: SharedPipeline) -> int:
    """fp32 bytes of the sets whose layers this rank's stage shares with another stage,
    plus, on the first and last stage, the embedding tensors the head reads."""
    stage_of, plan, enc = pipe.layer_stage, model.plan, model.encoder
    read = HEAD_READS[model.cfg.family] if pipe.stage_id in (0, pipe.num_stages - 1) else ()
    total = sum(p.numel() for name, p in model.embeddings.named_parameters() if name in read)
    for component in ("attention", "ffn"):
        table = plan.table(component)
        for s, module in enumerate(getattr(enc, component)):
            stages = {stage_of[i] for i in range(plan.num_layers) if table[i] == s}
            if len(stages) > 1 and pipe.stage_id in stages:
                total += sum(p.numel() for p in module.parameters())
    return 4 * total


def pipelined(cfg: Config, world) -> dict:
    torch.manual_seed(0)
    model = SharedTransformer(cfg.model).train()
    pipe = SharedPipeline(model, cfg)
    engine = runtime.initialize(pipe, cfg, world)
    replica, accum = engine.grid.data_parallel_id, cfg.engine.grad_accum_steps
    tied: list[int] = []
    count_tied_bytes(engine, tied)
    losses = []
    for step in range(STEPS):
        chunks = global_batch(cfg.model.family, step, world.size)
        mine = chunks[accum * replica : accum * (replica + 1)]
        key = label_key(model)
        loss = engine.train_batch(iter([pipeline_batch(c, key) for c in mine]))
        losses.append(loss.item())
    engine.destroy()
    expected = tied_bytes_expected(model, pipe)
    return {
        "losses": losses,
        "tied_bytes": tied,
        "tied_expected": expected,
        "layer_stage": pipe.layer_stage,
    }


def main(layouts: list[str]) -> None:
    world = runtime.init_distributed()
    parsed = [(f, p, int(z), int(s)) for f, p, z, s in (x.split(":") for x in layouts)]
    # The references first: a pipeline engine leaves its grid as DeepSpeed's global model
    # parallel unit, which a later data-parallel engine in the same process would take up.
    refs = [reference(config(f, p, z, 1, 1), world) for f, p, z, _ in parsed]
    for layout, (f, p, z, stages), ref in zip(layouts, parsed, refs, strict=True):
        got = pipelined(config(f, p, z, stages, stages), world)
        row = {"layout": layout, "rank": world.rank, "reference": ref, **got}
        # Rank 0 prints every rank's row: lines printed by several ranks interleave.
        rows: list[dict | None] = [None] * world.size
        dist.all_gather_object(rows, row)
        if world.rank == 0:
            print("\n".join(json.dumps(r) for r in rows), flush=True)
    runtime.teardown(None)


if __name__ == "__main__":
    main(sys.argv[1:])

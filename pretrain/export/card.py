"""The model card (README.md) every Hugging Face export carries, in the Hub's format: a YAML
header (library, pipeline, tags, license, datasets when known), then what the model is
(sharing plan, unique and effective parameters, FLOPs per token), how it was trained
(tokens, final losses), its tokenizer, and how to load and fine-tune it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import Config, ModelConfig, from_dict
from pretrain.data.tokenizer import Tokenizer
from pretrain.model.accounting import account
from pretrain.sharing import SharingPlan

CARD = "README.md"
LICENSE = "apache-2.0"


@dataclass
class RunFacts:
    """What a training checkpoint says about how the model was trained."""

    config: Config
    step: int
    tokens: int
    world_size: int
    final: dict[str, float] = field(default_factory=dict)
    """The last logged training metrics (loss, mlm_loss, clm_loss, accuracies)."""
    held_out: dict[str, float] = field(default_factory=dict)
    """The last held-out evaluation (eval_*), if the run evaluated."""
    datasets: list[str] = field(default_factory=list)

    @classmethod
    def from_run(cls, state: dict, where: str | Path) -> RunFacts:
        """`state`: the run state of the checkpoint at `where` (run/checkpoints/stepNNN)."""
        tag = Path(where)
        cfg = from_dict(Config, state["config"])
        facts = cls(
            config=cfg,
            step=state["step"],
            tokens=state["consumed_samples"] * cfg.data.seq_length,
            world_size=state["world_size"],
            datasets=_datasets(Path(cfg.data.path)),
        )
        facts._read_metrics(tag.parent.parent / "metrics.jsonl")
        return facts

    def _read_metrics(self, path: Path) -> None:
        """The last training and held-out rows logged up to the checkpoint's step."""
        if not path.is_file():
            return
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("step", 0) > self.step:
                continue
            if "loss" in row:
                self.final = _metrics(row, ("loss", "mlm_loss", "mlm_acc", "clm_loss", "clm_acc"))
            if "eval_loss" in row:
                self.held_out = {
                    k: v for k, v in row.items() if k.startswith("eval_") and k.endswith(_SCORES)
                }


_SCORES = ("_loss", "_acc")


def _metrics(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: row[k] for k in keys if row.get(k) is not None}


def _datasets(shards: Path) -> list[str]:
    """The Hub datasets the shards were made from, where their metadata names them."""
    meta = shards / "metadata.json"
    if not meta.is_file():
        return []
    names = json.loads(meta.read_text()).get("datasets", [])
    return [n for n in names if isinstance(n, str)]


def _figures(cfg: ModelConfig, facts: RunFacts | None) -> tuple[Any, int]:
    """Accounting of the model at its training sequence length (else its longest)."""
    if facts is not None:
        run = facts.config
    else:
        run = from_dict(Config, {"data": {"seq_length": cfg.max_position_embeddings}})
    run.model = cfg
    return account(run), run.data.seq_length


def _header(cfg: ModelConfig, facts: RunFacts | None, license: str) -> str:
    plan = SharingPlan.from_config(cfg)
    tags = ["pretrain", cfg.family, "shared-layers"]
    if plan.reuses:
        tags.append("cross-layer-parameter-sharing")
    if cfg.universal.enabled:
        tags.append("universal-transformer")
    header: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": cfg.spec.pipeline_tag,
        "license": license,
        "tags": tags,
    }
    if facts is not None and facts.datasets:
        header["datasets"] = facts.datasets
    return f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n"


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _training(facts: RunFacts | None) -> list[str]:
    if facts is None:
        return ["Not recorded: this export was written from a model without its training run."]
    c = facts.config
    rows = [
        ("steps", f"{facts.step:,}"),
        ("training tokens", f"{facts.tokens:,} ({c.data.seq_length}-token samples)"),
        (
            "ranks, precision, ZeRO stage",
            f"{facts.world_size}, {c.engine.precision}, {c.engine.zero_stage}",
        ),
        (
            "optimizer",
            f"{c.optim.name}, peak lr {c.optim.lr:g}, {c.optim.warmup_steps} warmup"
            f" steps, {c.optim.decay} decay",
        ),
    ]
    rows += [(f"final training {k}", f"{v:.4f}") for k, v in facts.final.items()]
    rows += [(f"held-out {k.removeprefix('eval_')}", f"{v:.4f}") for k, v in facts.held_out.items()]
    if c.distill.teacher:
        rows.append(("distilled from", f"`{c.distill.teacher}`"))
    return _table(rows)


def _usage(cfg: ModelConfig, name: str) -> list[str]:
    # The usage example follows the objective: masked LMs fill masks, causal LMs generate.
    auto = "AutoModelForCausalLM" if cfg.causal else "AutoModelForMaskedLM"
    lines = [
        "```python",
        f"from transformers import AutoTokenizer, {auto}, pipeline",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        f'model = {auto}.from_pretrained("{name}")',
    ]
    if not cfg.causal:
        lines += [
            'fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)',
            'fill("The capital of France is [MASK].")',
            "```",
            "",
            "Fine-tune it for classification with `AutoModelForSequenceClassification`"
            " (the encoder loads, a new head is initialised), or with this project's"
            f" `python tools/finetune.py --model {name} --train train.csv --eval eval.csv"
            " --output out/`.",
        ]
    else:
        lines += [
            'inputs = tokenizer("Once upon a time", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
            "```",
            "",
            f"Fine-tune it as any {cfg.spec.display_name} causal LM (the Trainer, PEFT/LoRA).",
        ]
    return lines


def model_card(
    cfg: ModelConfig,
    tokenizer_dir: str | Path,
    facts: RunFacts | None = None,
    name: str = "PATH",
    license: str = LICENSE,
    hf_class: str = "",
) -> str:
    """The README.md of an HF export of `cfg`; `name` is what from_pretrained is given and
    `hf_class` the transformers class the weights were written as."""
    acc, T = _figures(cfg, facts)
    plan = SharingPlan.from_config(cfg)
    info = Tokenizer(Path(tokenizer_dir)).info
    family = cfg.spec.display_name
    model_rows = [
        (
            "architecture",
            f"{family} ({cfg.spec.architecture})"
            + (f", written as `{hf_class}`" if hf_class else ""),
        ),
        ("layers (applications)", str(cfg.num_layers)),
        (
            "hidden / embedding / FFN size",
            f"{cfg.hidden_size} / {cfg.embedding_size} / {cfg.intermediate_size}",
        ),
        ("attention heads", str(cfg.num_heads)),
        ("sharing plan", plan.description),
        ("unique parameters", f"{acc.unique_params:,}"),
        (
            "effective parameters",
            f"{acc.effective_params:,} (every application of a shared layer counted)",
        ),
        (
            "training FLOPs per token",
            f"{acc.flops_per_token:,.0f} (forward + backward at {T} tokens)",
        ),
    ]
    if cfg.universal.enabled:
        model_rows.append(
            (
                "universal transformer",
                "one block iterated with ACT halting (counted at its maximum depth)",
            )
        )
    tokenizer_rows = [
        ("kind", f"SentencePiece {info.model_type}{', lowercased' if info.lowercase else ''}"),
        ("vocabulary", f"{info.vocab_size:,} pieces"),
        ("checksum", f"`{info.checksum}`"),
    ]
    body = [
        f"# {family} with cross-layer parameter sharing",
        "",
        f"This {family} model was pretrained with `pretrain`, a stack for shared-layer"
        " Transformers: its layers reuse parameter sets as the sharing plan below says, so it"
        " holds fewer parameters than it applies.",
        "",
        "## Model",
        "",
        *_table(model_rows),
        "",
        "## Training",
        "",
        *_training(facts),
        "",
        "## Tokenizer",
        "",
        *_table(tokenizer_rows),
        "",
        "## How to use",
        "",
        *_usage(cfg, name),
    ]
    return _header(cfg, facts, license) + "\n" + "\n".join(body) + "\n"


def write_card(output: str | Path, card: str) -> None:
    (Path(output) / CARD).write_text(card)

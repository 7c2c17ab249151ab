"""Hugging Face model folders from our weights: ALBERT (groups kept where ALBERT can express
the plan) and Llama (unrolled), each with a tokenizer that `AutoTokenizer` loads offline
and that encodes exactly as our SentencePiece model does."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from pretrain.config import ModelConfig
from pretrain.data.tokenizer import INFO_FILE, MODEL_FILE, SPECIAL_PIECES
from pretrain.errors import UserError
from pretrain.export import hf_albert, hf_llama
from pretrain.model import ModelOutput
from pretrain.sharing import SharingPlan


def _albert_tokenizer(tokenizer_dir: Path, max_length: int):
    """HF's own SentencePiece converter, fed the ALBERT settings that keep our ids."""
    import transformers

    info = json.loads((tokenizer_dir / INFO_FILE).read_text())
    if info["model_type"] != "unigram":
        raise UserError(
            f"the tokenizer in {tokenizer_dir} is {info['model_type']}; Hugging Face exports"
            " need a unigram SentencePiece model (tokenizer/train.py --model-type unigram)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(tokenizer_dir / MODEL_FILE, Path(tmp) / MODEL_FILE)
        config = {
            "tokenizer_class": "AlbertTokenizer",
            "do_lower_case": False,  # our normaliser already case-folds when trained so
            "keep_accents": True,
            "unk_token": SPECIAL_PIECES["unk"],
            "pad_token": SPECIAL_PIECES["pad"],
            "cls_token": SPECIAL_PIECES["cls"],
            "sep_token": SPECIAL_PIECES["sep"],
            "mask_token": SPECIAL_PIECES["mask"],
            "bos_token": SPECIAL_PIECES["cls"],
            "eos_token": SPECIAL_PIECES["sep"],
            "model_max_length": max_length,
        }
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        return transformers.AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def _causal_tokenizer(tokenizer_dir: Path, max_length: int):
    """The same SentencePiece normalisation and pieces, no [CLS]/[SEP] template: text in,
    pieces out, as the causal model was trained (documents separated by </s>)."""
    import transformers

    backend = _albert_tokenizer(tokenizer_dir, max_length).backend_tokenizer
    backend.post_processor = None
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=SPECIAL_PIECES["unk"],
        pad_token=SPECIAL_PIECES["pad"],
        bos_token=SPECIAL_PIECES["bos"],
        eos_token=SPECIAL_PIECES["eos"],
        model_max_length=max_length,
    )


def _albert_model(state: dict[str, torch.Tensor], cfg: ModelConfig):
    import transformers

    config = transformers.AlbertConfig(**hf_albert.config_to_hf(cfg))
    cls = transformers.AlbertForPreTraining if cfg.sop_head else transformers.AlbertForMaskedLM
    config.architectures = [cls.__name__]
    model = cls(config)
    model.load_state_dict(hf_albert.to_hf(state, cfg), strict=True)
    return model


def _llama_model(state: dict[str, torch.Tensor], cfg: ModelConfig):
    import transformers

    config = transformers.LlamaConfig(**hf_llama.config_to_hf(cfg))
    config.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(hf_llama.to_hf(state, cfg), strict=True)
    return model


def export_notes(cfg: ModelConfig) -> list[str]:
    """What the export changes about the model's layout, said to the user."""
    if cfg.family == "llama":
        return [f"llama: {cfg.num_layers} layers unrolled, factorized embedding folded to V x H"]
    groups = SharingPlan.from_config(cfg).group_count()
    if groups is None:
        return [
            f"ALBERT cannot express this sharing plan ({cfg.sharing.strategy}, scope"
            f" {cfg.sharing.scope}, range, ratio or shared Q/K): unrolled into"
            f" {cfg.num_layers} groups"
        ]
    return [f"ALBERT num_hidden_groups={groups}: shared parameters stay shared"]


def hf_model(state: dict[str, torch.Tensor], cfg: ModelConfig):
    """The Hugging Face model of `cfg`'s family holding `state` (ours, converted)."""
    return _albert_model(state, cfg) if cfg.family == "albert" else _llama_model(state, cfg)


class HFReference(torch.nn.Module):
    """An HF model behind our model's call signature, so that one loss function scores
    both (A/B benchmarks). HF computes token logits at every position; `predict_mask`
    then selects the ones our model computes."""

    def __init__(self, hf: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(
        self, input_ids, attention_mask=None, token_type_ids=None, predict_mask=None
    ) -> ModelOutput:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits
        return ModelOutput(
            logits=logits if predict_mask is None else logits[predict_mask],
            sop_logits=getattr(out, "sop_logits", None),
        )


def save_hf(
    state: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer_dir: str | Path, output: str | Path
):
    """Write an HF model folder (weights, config, tokenizer); returns the HF model."""
    tokenizer_dir, output = Path(tokenizer_dir), Path(output)
    model = hf_model(state, cfg)
    if cfg.family == "albert":
        tokenizer = _albert_tokenizer(tokenizer_dir, cfg.max_position_embeddings)
    else:
        tokenizer = _causal_tokenizer(tokenizer_dir, cfg.max_position_embeddings)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return model.eval()

"""Hugging Face model folders, both ways, through one table of formats.

Each row of FORMATS is one HF `model_type`: the adapter module that converts configs and
state dicts (`config_from_hf`, `from_hf`; an exportable format also has `config_to_hf`,
`to_hf` and `export_notes`), the transformers classes that hold it, and the tokenizer an
export writes. A new architecture is one adapter module and one row.

Exports: ALBERT (groups kept where ALBERT can express the plan) and Llama (unrolled), each
with a tokenizer that `AutoTokenizer` loads offline and that encodes exactly as our
SentencePiece model does. Imports: ALBERT, BERT and Llama.

`transformers` is imported where a model or tokenizer is built, never with this module.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from pretrain.config import ModelConfig
from pretrain.data.tokenizer import MODEL_FILE, SPECIAL_PIECES, info_file
from pretrain.errors import UserError
from pretrain.export import hf_albert, hf_bert, hf_llama
from pretrain.export.card import LICENSE, RunFacts, model_card, write_card
from pretrain.export.common import State
from pretrain.export.verify import max_logit_diff
from pretrain.families import FAMILIES
from pretrain.model import ModelOutput, SharedTransformer
from pretrain.pickles import load_tensors

CONFIG_FILE = "config.json"
IMPORT_FUNCTIONS = ("config_from_hf", "from_hf")
"""What every adapter module has: `config_from_hf(hf_config[, sop_head]) -> ModelConfig`
and `from_hf(hf_state, cfg) -> State`."""
EXPORT_FUNCTIONS = ("config_to_hf", "to_hf", "export_notes")
"""What an exportable format's adapter adds: `config_to_hf(cfg) -> dict` (the HF config's
keyword arguments), `to_hf(state, cfg) -> State` and `export_notes(cfg) -> list[str]`
(what the export changes about the model's layout, said to the user)."""


def albert_tokenizer(tokenizer_dir: Path, max_length: int):
    """HF's own SentencePiece converter, fed the ALBERT settings that keep our ids."""
    import transformers

    info = json.loads(info_file(tokenizer_dir).read_text())
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


def causal_tokenizer(tokenizer_dir: Path, max_length: int):
    """The same SentencePiece normalisation and pieces, no [CLS]/[SEP] template: text in,
    pieces out, as the causal model was trained (documents separated by </s>)."""
    import transformers

    backend = albert_tokenizer(tokenizer_dir, max_length).backend_tokenizer
    backend.post_processor = None
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=SPECIAL_PIECES["unk"],
        pad_token=SPECIAL_PIECES["pad"],
        bos_token=SPECIAL_PIECES["bos"],
        eos_token=SPECIAL_PIECES["eos"],
        model_max_length=max_length,
    )


def one_layer_per_set(hf: Mapping[str, Any], index: int) -> tuple[int, ...]:
    """Set i runs layer i: an architecture without cross-layer sharing."""
    return (index,)


@dataclass(frozen=True)
class HFFormat:
    """One Hugging Face architecture: how it maps onto our model, and the transformers
    classes (named, so that transformers loads only when one is built) that hold it."""

    model_type: str
    """`model_type` of the HF config.json."""
    family: str
    """Our model family it converts to and from."""
    adapter: ModuleType
    """The module converting configs and state dicts: IMPORT_FUNCTIONS, and
    EXPORT_FUNCTIONS when `exportable`."""
    config_class: str
    """The transformers config class."""
    model_class: str
    """The transformers model class without the pair classifier: an export without our
    `sop_head` is written as it."""
    auto_class: str
    """The transformers Auto class that loads an export for `verify`."""
    exportable: bool = False
    """Whether our models export to this format (at most one format per family does)."""
    tokenizer: Callable[[Path, int], Any] | None = None
    """(our tokenizer folder, max length) -> the HF tokenizer an export writes."""
    pretraining_class: str | None = None
    """The model class with the pair classifier (ALBERT's SOP, BERT's NSP head), which
    takes our `sop_head`; None where the architecture has none."""
    pair_head: str | None = None
    """The HF state-dict key present when the pair classifier is there; an import then
    passes `sop_head` to `config_from_hf`. None where the architecture has none."""
    embeddings: str = ""
    """Regex matching the embedding parameters of a model of this type (as
    `named_parameters` names them, under any task head): fine-tuning's depth of each
    parameter. Empty where fine-tuning does not know the layout."""
    layers: str = ""
    """Regex matching the parameters of a layer set: group 1 its index, group 2 its name
    inside the set."""
    set_uses: Callable[[Mapping[str, Any], int], tuple[int, ...]] = one_layer_per_set
    """(HF config as a dict, layer set index) -> the layer applications running that set."""

    def needs(self) -> tuple[str, ...]:
        """The adapter functions this row uses."""
        return IMPORT_FUNCTIONS + (EXPORT_FUNCTIONS if self.exportable else ())

    def model_class_for(self, cfg: ModelConfig) -> str:
        """The transformers class an export of `cfg` is written as."""
        if cfg.sop_head and self.pretraining_class is not None:
            return self.pretraining_class
        return self.model_class


FORMATS: dict[str, HFFormat] = {
    fmt.model_type: fmt
    for fmt in (
        HFFormat(
            model_type="albert",
            family="albert",
            adapter=hf_albert,
            config_class="AlbertConfig",
            model_class="AlbertForMaskedLM",
            auto_class="AutoModelForMaskedLM",
            exportable=True,
            tokenizer=albert_tokenizer,
            pretraining_class="AlbertForPreTraining",
            pair_head="sop_classifier.classifier.weight",
            embeddings=r"albert\.(embeddings|encoder\.embedding_hidden_mapping_in)\.",
            layers=r"albert\.encoder\.albert_layer_groups\.(\d+)\.(.+)",
            set_uses=hf_albert.set_uses,
        ),
        HFFormat(
            model_type="bert",
            family="albert",
            adapter=hf_bert,
            config_class="BertConfig",
            model_class="BertForMaskedLM",
            auto_class="AutoModelForMaskedLM",
            pretraining_class="BertForPreTraining",
            pair_head="cls.seq_relationship.weight",  # NSP head -> our pair classifier
            embeddings=r"bert\.embeddings\.",
            layers=r"bert\.encoder\.layer\.(\d+)\.(.+)",
        ),
        HFFormat(
            model_type="llama",
            family="llama",
            adapter=hf_llama,
            config_class="LlamaConfig",
            model_class="LlamaForCausalLM",
            auto_class="AutoModelForCausalLM",
            exportable=True,
            tokenizer=causal_tokenizer,
            embeddings=r"model\.embed_tokens\.",
            layers=r"model\.layers\.(\d+)\.(.+)",
        ),
    )
}
"""Every HF format, by `model_type`."""


def format_for_model_type(model_type: str | None) -> HFFormat:
    """The format an HF config.json's `model_type` names; any other is one error naming
    the supported ones."""
    if model_type not in FORMATS:
        raise UserError(f"cannot import model_type {model_type!r}; supported: {', '.join(FORMATS)}")
    return FORMATS[model_type]


def format_for_family(family: str) -> HFFormat:
    """The format our `family` exports to (its spec's `hf_model_type`)."""
    fmt = FORMATS.get(FAMILIES[family].hf_model_type)
    if fmt is not None and fmt.exportable:
        return fmt
    exportable = sorted({fmt.family for fmt in FORMATS.values() if fmt.exportable})
    raise UserError(
        f"the {family} family has no Hugging Face export; exportable: {', '.join(exportable)}"
    )


def export_notes(cfg: ModelConfig) -> list[str]:
    """What the export of `cfg` changes about the model's layout, said to the user."""
    return format_for_family(cfg.family).adapter.export_notes(cfg)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """safetensors (single or sharded) or pytorch_model.bin, never unpickling objects: a
    .bin holding anything but tensors is one line naming it."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        return {k: v for f in bins for k, v in load_tensors(f, map_location="cpu").items()}
    raise UserError(f"{directory} holds no model.safetensors or pytorch_model.bin")


def load_hf(directory: str | Path) -> tuple[State, ModelConfig, HFFormat]:
    """An HF model folder as our state dict and model config, with its format."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{directory} is not a Hugging Face model folder ({CONFIG_FILE} missing)")
    hf_config = json.loads(config_path.read_text())
    fmt = format_for_model_type(hf_config.get("model_type"))
    hf_state = read_weights(directory)
    pair = {} if fmt.pair_head is None else {"sop_head": fmt.pair_head in hf_state}
    cfg = fmt.adapter.config_from_hf(hf_config, **pair)
    return fmt.adapter.from_hf(hf_state, cfg), cfg, fmt


def hf_model(state: dict[str, torch.Tensor], cfg: ModelConfig):
    """The Hugging Face model of `cfg`'s family holding `state` (ours, converted)."""
    import transformers

    fmt = format_for_family(cfg.family)
    config = getattr(transformers, fmt.config_class)(**fmt.adapter.config_to_hf(cfg))
    cls = getattr(transformers, fmt.model_class_for(cfg))
    config.architectures = [cls.__name__]
    model = cls(config)
    model.load_state_dict(fmt.adapter.to_hf(state, cfg), strict=True)
    return model


def save_hf(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_dir: str | Path,
    output: str | Path,
    facts: RunFacts | None = None,
    license: str = LICENSE,
):
    """Write an HF model folder (weights, config, tokenizer, and a model card with what
    `facts` says of the training run); returns the HF model."""
    model = hf_model(state, cfg)
    fmt = format_for_family(cfg.family)
    tokenizer = fmt.tokenizer(Path(tokenizer_dir), cfg.max_position_embeddings)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    card = model_card(cfg, tokenizer_dir, facts, str(output), license, type(model).__name__)
    write_card(output, card)
    return model.eval()


def verify(ours: SharedTransformer, directory: str | Path) -> float:
    """Largest |logit difference| between `ours` and the HF folder written from it, at real
    tokens (`verify.max_logit_diff`)."""
    import transformers

    transformers.logging.set_verbosity_error()  # the MLM class ignores the SOP head
    auto = getattr(transformers, format_for_family(ours.cfg.family).auto_class)
    return max_logit_diff(ours, auto.from_pretrained(directory, local_files_only=True).eval())


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

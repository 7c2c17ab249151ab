"""The teacher of a distillation run (`distill.teacher`), read from any of the three things
the stack reads: a Hugging Face model folder, a native export, or one of our runs (its
newest valid checkpoint, consolidated to fp32).

`describe_teacher` reads only configs and the tokenizer checksum (what `python -m pretrain
check` needs before any rank starts); `load_teacher` also reads the weights, into our own
`SharedTransformer`, so that it computes logits at exactly the student's positions.

The tokenizer check: where the teacher has a SentencePiece model (a native export's
tokenizer/ folder, the checksum a checkpoint recorded, an HF folder's spiece.model), it must
be the student's byte for byte (SHA-256). An HF folder with only a fast tokenizer (what our
own HF exports write) is checked by its tokenizer.json: the vocabulary, piece by piece in id
order, must be the student's SentencePiece vocabulary (normalisation rules are not
compared). A teacher with neither is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain.config import Config, ConfigError, ModelConfig, from_dict
from pretrain.data.tokenizer import MODEL_FILE, Tokenizer, file_checksum
from pretrain.engine.manifest import read_run_state
from pretrain.errors import UserError
from pretrain.export import native
from pretrain.export.checkpoint import checkpoint_folder, model_weights, newest_valid_tag
from pretrain.export.hf import CONFIG_FILE, format_for_model_type, load_hf
from pretrain.model import SharedTransformer

HF_TOKENIZER = "tokenizer.json"
"""A Hugging Face fast tokenizer's file (our own tokenizer folders use the same name for
their metadata, but a teacher's HF folder holds HF's)."""


class TeacherError(ConfigError):
    """A teacher the run cannot use (every rank reads the same one)."""

    collective = True


@dataclass
class TeacherSource:
    """What `distill.teacher` points at, without its weights."""

    kind: str  # "native", "hf" or "checkpoint"
    path: Path
    cfg: ModelConfig
    tokenizer_checksum: str | None
    where: str
    pieces: list[str] | None = None  # an HF tokenizer.json's vocabulary, in id order
    tag: str | None = None  # the checkpoint's, for kind "checkpoint"


def describe_teacher(path: str | Path) -> TeacherSource:
    path = Path(path)
    if not path.exists():
        raise TeacherError(
            f"distill.teacher {path} does not exist; give a Hugging Face model folder, a native"
            " export or a run directory"
        )
    config = path / CONFIG_FILE
    meta = json.loads(config.read_text()) if config.is_file() else None
    if isinstance(meta, dict) and meta.get("format") == native.FORMAT:
        tokenizer = path / native.TOKENIZER
        found = (tokenizer / MODEL_FILE).is_file()
        checksum = Tokenizer(tokenizer).info.checksum if found else None
        return TeacherSource("native", path, native.load_config(path), checksum, str(path))
    if isinstance(meta, dict) and "model_type" in meta:
        fmt = format_for_model_type(meta["model_type"])
        pair = {} if fmt.pair_head is None else {"sop_head": False}  # the teacher's is unused
        cfg = fmt.adapter.config_from_hf(meta, **pair)
        spiece = path / MODEL_FILE
        checksum = file_checksum(spiece) if spiece.is_file() else None
        return TeacherSource("hf", path, cfg, checksum, str(path), _hf_pieces(path))
    try:
        folder = checkpoint_folder(path)
        tag = newest_valid_tag(folder)
    except UserError as err:
        raise TeacherError(
            f"distill.teacher: {err} (a teacher is a Hugging Face model folder, a native export"
            " or a run directory)"
        ) from None
    state = read_run_state(folder, tag)
    cfg = from_dict(ModelConfig, state["config"]["model"], "model")
    where = str(folder / tag)
    return TeacherSource("checkpoint", folder, cfg, state["tokenizer_checksum"], where, tag=tag)


def _hf_pieces(path: Path) -> list[str] | None:
    """The vocabulary of an HF fast tokenizer (tokenizer.json) in id order, if there is one."""
    file = path / HF_TOKENIZER
    if not file.is_file():
        return None
    model = json.loads(file.read_text()).get("model", {})
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # Unigram: [piece, score] rows in id order
        return [row[0] for row in vocab]
    if isinstance(vocab, dict):  # WordPiece, BPE: piece -> id
        return [piece for piece, _ in sorted(vocab.items(), key=lambda item: item[1])]
    return None


def _same_tokenizer(source: TeacherSource, student: Tokenizer) -> bool:
    if source.tokenizer_checksum is not None:
        return source.tokenizer_checksum == student.info.checksum
    ours = [student.sp.id_to_piece(i) for i in range(student.sp.get_piece_size())]
    return source.pieces == ours


def check_teacher(source: TeacherSource, cfg: Config, student: Tokenizer) -> None:
    """The teacher predicts the student's tokens, from the same inputs."""
    t, s, where = source.cfg, cfg.model, f"distill.teacher {source.where}"
    if source.tokenizer_checksum is None and source.pieces is None:
        raise TeacherError(
            f"{where} has no tokenizer to check against this run's (no {MODEL_FILE} or"
            f" {HF_TOKENIZER}); put the SentencePiece model it was trained with in it as"
            f" {MODEL_FILE}"
        )
    if not _same_tokenizer(source, student):
        what = "spiece.model checksum" if source.tokenizer_checksum else "vocabulary"
        raise TeacherError(
            f"{where} was trained with another tokenizer than this run's ({what} differs);"
            " distillation needs a teacher on the student's tokenizer"
        )
    if t.vocab_size != s.vocab_size:
        raise TeacherError(
            f"{where} has vocab_size {t.vocab_size}, this run's model.vocab_size is"
            f" {s.vocab_size}; they must be equal"
        )
    if t.causal != s.causal:
        kinds = {True: "causal", False: "masked"}
        raise TeacherError(
            f"{where} is a {kinds[t.causal]} language model and this run's is"
            f" {kinds[s.causal]}; choose a teacher of the same objective"
        )
    beyond = [i for i in cfg.distill.layer_map if i >= t.num_layers]
    if beyond:
        raise TeacherError(
            f"distill.layer_map names teacher layer {beyond[0]}, but {where} has"
            f" {t.num_layers} layers (0..{t.num_layers - 1})"
        )
    if cfg.data.seq_length > t.max_position_embeddings:
        raise TeacherError(
            f"{where} takes at most {t.max_position_embeddings} positions, fewer than"
            f" data.seq_length ({cfg.data.seq_length}); lower data.seq_length"
        )


def load_teacher(
    cfg: Config,
    student: Tokenizer,
    device: torch.device,
    dtype: torch.dtype,
    source: TeacherSource | None = None,
) -> SharedTransformer:
    """The checked teacher in eval mode, in `dtype` on `device`, with no parameter that
    takes gradients. Building it leaves the RNG as it was, so that a run's student and
    dropout draw the same numbers with and without distillation. `source`: the teacher's
    `describe_teacher`, when the caller has it already."""
    source = source or describe_teacher(cfg.distill.teacher)
    check_teacher(source, cfg, student)
    if source.kind == "native":
        state = load_file(str(source.path / native.WEIGHTS))
    elif source.kind == "hf":
        state = load_hf(source.path)[0]
        state = {k: v for k, v in state.items() if not k.startswith("sop_head.")}
    else:
        from pretrain.engine.consolidate import fp32_state_dict

        state = model_weights(fp32_state_dict(source.path, source.tag))
    with torch.random.fork_rng(devices=[]):
        model = SharedTransformer(source.cfg)
    native.check_state(state, model, source.where)
    model.load_state_dict(state)
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()

"""The teacher of a distillation run (`distill.teacher`), read by pretrain.export.open: a
Hugging Face model folder, a native export, one of our runs (its newest valid checkpoint,
consolidated to fp32) or one checkpoint's folder.

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

from pretrain.config import Config, ConfigError, ModelConfig
from pretrain.data.tokenizer import MODEL_FILE, Tokenizer, file_checksum
from pretrain.errors import UserError
from pretrain.export import native
from pretrain.export.open import Found, read, refuse, what_is
from pretrain.model import SharedTransformer

HF_TOKENIZER = "tokenizer.json"
"""A Hugging Face fast tokenizer's file (our own tokenizer folders use the same name for
their metadata, but a teacher's HF folder holds HF's)."""


class TeacherError(ConfigError):
    """A teacher the run cannot use (every rank reads the same one)."""

    collective = True


TEACHERS = ("run", "checkpoint", "native", "hf")
"""What distill.teacher may be (pretrain.export.open.KINDS)."""


@dataclass
class TeacherSource:
    """What `distill.teacher` points at, without its weights."""

    found: Found
    tokenizer_checksum: str | None
    pieces: list[str] | None = None  # an HF tokenizer.json's vocabulary, in id order

    @property
    def kind(self) -> str:
        return self.found.kind

    @property
    def cfg(self) -> ModelConfig:
        return self.found.cfg

    @property
    def where(self) -> str:
        return self.found.where


def describe_teacher(path: str | Path) -> TeacherSource:
    path = Path(path)
    if not path.exists():
        raise TeacherError(
            f"distill.teacher {path} does not exist; give a Hugging Face model folder, a native"
            " export or a run directory"
        )
    try:
        found = what_is(path)
        refuse(found, TEACHERS, "distill.teacher")
    except UserError as err:
        raise TeacherError(f"distill.teacher: {err}") from None
    if found.kind == "native":
        tokenizer = path / native.TOKENIZER
        found_sp = (tokenizer / MODEL_FILE).is_file()
        return TeacherSource(found, Tokenizer(tokenizer).info.checksum if found_sp else None)
    if found.kind == "hf":
        spiece = path / MODEL_FILE
        checksum = file_checksum(spiece) if spiece.is_file() else None
        return TeacherSource(found, checksum, _hf_pieces(path))
    return TeacherSource(found, found.run_state["tokenizer_checksum"])


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
    with torch.random.fork_rng(devices=[]):  # reading a checkpoint builds a model to check it
        state = read(source.found, need_tokenizer=False).state  # its checksum is checked above
        if source.kind == "hf":  # its config here has no pair head: a teacher's is unused
            state = {k: v for k, v in state.items() if not k.startswith("sop_head.")}
        model = native.build_model(state, source.cfg, source.where)
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()

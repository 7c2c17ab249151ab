"""One reader of what is on disk (pretrain.export.open): every kind of model folder is
recognised and opened to the model that was written, and every command that takes one
refuses the others in one line naming what it takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import random_ids, tiny_model

from pretrain.compress import read_source
from pretrain.errors import UserError
from pretrain.export import compressed
from pretrain.export.hf import save_hf
from pretrain.export.native import save_native
from pretrain.export.open import kind_of, open_model, what_is
from pretrain.export.teacher import TeacherError, describe_teacher
from pretrain.finetune import load_model

VOCAB = 150  # the session tokenizer's pieces


@pytest.fixture(scope="module")
def folders(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """One tiny albert model written as each kind of export, with the model itself."""
    root = tmp_path_factory.mktemp("kinds")
    model = tiny_model(vocab_size=VOCAB, sharing={"strategy": "all"}, sop_head=True)
    save_native(model.state_dict(), model.cfg, tokenizer_dir, root / "native")
    save_hf(model.state_dict(), model.cfg, tokenizer_dir, root / "hf")
    int8 = tiny_model(vocab_size=VOCAB, sharing={"strategy": "all"})
    compressed.quantize_int8(int8)
    compressed.save_int8(int8, int8.cfg, tokenizer_dir, root / "int8", "test")
    return {"native": root / "native", "hf": root / "hf", "int8": root / "int8", "model": model}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(random_ids(VOCAB)).logits


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["native", "hf"])
def test_an_export_opens_to_the_model_that_was_written(folders, kind):
    opened = open_model(folders[kind])
    assert opened.kind == kind_of(folders[kind]) == kind
    assert opened.cfg.sop_head  # both keep the pretraining pair head the model had
    written = folders["model"].state_dict()
    assert opened.state.keys() == written.keys()
    assert all(torch.equal(opened.state[k], v) for k, v in written.items())
    built = opened.build()
    assert not built.training
    torch.testing.assert_close(logits(built), logits(folders["model"]), rtol=0, atol=0)


@pytest.mark.unit
def test_an_int8_export_opens_to_its_quantized_model(folders):
    opened = open_model(folders["int8"])
    assert opened.kind == "int8" and opened.state is None
    assert opened.tokenizer_dir == folders["int8"] / "tokenizer"
    expected = compressed.load_int8(folders["int8"])
    torch.testing.assert_close(logits(opened.build()), logits(expected), rtol=0, atol=0)


@pytest.mark.unit
def test_an_hf_folder_is_described_without_its_pair_head(folders):
    # Only the weights say whether it has one; describing reads configs alone.
    assert what_is(folders["hf"]).cfg.sop_head is False


@pytest.mark.unit
def test_run_and_checkpoint_folders_are_told_apart_by_their_files(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step00000004"
    step.mkdir(parents=True)
    (step / "run_state.json").write_text("{}")
    assert kind_of(tmp_path / "run") == "run"
    assert kind_of(tmp_path / "run" / "checkpoints") == "run"
    assert kind_of(step) == "checkpoint"


@pytest.mark.unit
def test_what_is_not_a_model_is_one_line_naming_what_is(tmp_path, folders):
    with pytest.raises(UserError, match="does not exist; expected a run directory"):
        kind_of(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        kind_of(tmp_path / "file")
    with pytest.raises(UserError, match="holds no model; expected a run directory"):
        kind_of(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config\.json is not JSON"):
        kind_of(tmp_path)
    with pytest.raises(UserError, match="only a run directory takes a tag"):
        what_is(folders["native"], tag="step00000004")


@pytest.mark.unit
def test_an_hf_folder_of_another_model_type_is_hf_but_not_ours(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert kind_of(tmp_path) == "hf"  # fine-tuning takes it
    with pytest.raises(UserError, match="cannot import model_type 'gpt2'"):
        what_is(tmp_path)


@pytest.mark.unit
def test_each_command_refuses_what_it_does_not_take_naming_the_fix(folders):
    with pytest.raises(UserError, match="is a Hugging Face model folder; import it first"):
        read_source(folders["hf"], "int8")
    with pytest.raises(UserError, match="already an int8 export"):
        read_source(folders["int8"], "prune")
    with pytest.raises(TeacherError, match=r"distill\.teacher: .* is an int8 export"):
        describe_teacher(folders["int8"])
    with pytest.raises(UserError, match=r"is a native export .*; export it first"):
        load_model(folders["native"], {"a": 0, "b": 1}, seed=0)
    with pytest.raises(UserError, match="--from-hf takes a Hugging Face model folder"):
        open_model(folders["native"], accepts=("hf",), command="--from-hf")

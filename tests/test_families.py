"""Model families: each spec is complete and consistent, and one row adds a family."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_ids, tiny_config

from pretrain.config import ConfigError, ModelConfig
from pretrain.errors import UserError
from pretrain.export.hf import FORMATS, format_for_family
from pretrain.families import FAMILIES, albert
from pretrain.model import SharedTransformer
from pretrain.model.blocks import BlockFamily
from pretrain.model.heads import CausalLMHead, MLMHead

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_spec_names_what_it_builds(name):
    spec = FAMILIES[name]
    assert spec.name == name
    assert isinstance(spec.block_family(), BlockFamily)
    assert issubclass(spec.token_head_class(), torch.nn.Module)
    fmt = format_for_family(name)
    assert fmt.model_type == spec.hf_model_type and fmt.family == name and fmt.exportable
    defaults_none = {f.name for f in dataclasses.fields(ModelConfig) if f.default is None}
    assert set(spec.defaults) <= defaults_none, "a default for a key the dataclass sets itself"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_model_of_each_family_is_built_from_its_spec(name):
    model = SharedTransformer(tiny_config(name))
    spec = FAMILIES[name]
    assert type(model.head) is spec.token_head_class()
    assert (model.sop_head is not None) == spec.sop_head
    assert model.cfg.causal == spec.causal
    for key, value in spec.defaults.items():
        assert getattr(model.cfg, key) == value


def test_the_objective_follows_causal():
    assert FAMILIES["albert"].objective == "mlm" and FAMILIES["llama"].objective == "clm"
    assert FAMILIES["albert"].token_head_class() is MLMHead
    assert FAMILIES["llama"].token_head_class() is CausalLMHead


def test_family_checks_come_from_the_spec():
    with pytest.raises(ConfigError, match="grouped-query attention is llama's"):
        tiny_config("albert", num_kv_heads=2)
    with pytest.raises(ConfigError, match="must be 0 for the llama family"):
        tiny_config("llama", type_vocab_size=2)
    with pytest.raises(ConfigError, match=r"'bert' is not one of 'albert' \| 'llama'"):
        tiny_config("bert")


def test_one_registry_row_adds_a_family(monkeypatch):
    """A family registered with no code elsewhere: the config takes its name, defaults and
    checks; the model builds its blocks and head; the card and export find its format."""
    seen = []

    def problems(cfg):
        seen.append(cfg.hidden_size)
        return [] if cfg.num_layers <= 4 else ["model.num_layers: at most 4 for this family"]

    spec = dataclasses.replace(
        albert.SPEC,
        name="albert-wide-eps",
        display_name="ALBERT (wide eps)",
        defaults={"norm_eps": 1e-5, "type_vocab_size": 1},
        problems=problems,
        sop_head=False,
    )
    monkeypatch.setitem(FAMILIES, spec.name, spec)
    cfg = tiny_config(spec.name)
    assert (cfg.norm_eps, cfg.type_vocab_size) == (1e-5, 1) and seen == [32]
    with pytest.raises(ConfigError, match="at most 4 for this family"):
        tiny_config(spec.name, num_layers=6)
    model = SharedTransformer(cfg).eval()
    assert model.sop_head is None and isinstance(model.head, MLMHead)
    assert model(random_ids()).logits.shape == (2, 12, 97)
    assert format_for_family(spec.name) is FORMATS["albert"]


def test_a_family_without_an_hf_format_says_which_export(monkeypatch):
    spec = dataclasses.replace(albert.SPEC, name="unexported", hf_model_type="")
    monkeypatch.setitem(FAMILIES, spec.name, spec)
    with pytest.raises(UserError, match="has no Hugging Face export; exportable: albert, llama"):
        format_for_family(spec.name)

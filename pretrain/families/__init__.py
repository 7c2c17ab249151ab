"""Model families: one spec per family, one registry.

A family is everything that differs between, say, ALBERT and Llama: the block and token
head the model builds, config defaults and checks, whether it is causal, the Hugging Face
format its exports are written as and what a model card says about it. Each family is one
module of this package holding its `SPEC`; `FAMILIES` lists them. This package is
torch-free (the config imports it): the block and head are named as "module:attribute"
and imported only when a model is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pretrain.config import ModelConfig


@dataclass(frozen=True)
class FamilySpec:
    """One model family, as every part of the stack sees it."""

    name: str
    """The value of `model.family`."""
    display_name: str
    """The family as a model card names it ("ALBERT")."""
    architecture: str
    """Its layer in a few words, for model cards ("post-LN, GELU")."""
    causal: bool
    """Causal LM (next-token targets) instead of masked LM."""
    defaults: Mapping[str, Any]
    """Config values taken when a `model.*` key is left out (None in the dataclass)."""
    problems: Callable[[ModelConfig], list[str]]
    """The family's own config checks: a message per setting it cannot take."""
    blocks: str
    """"module:attribute" of its `BlockFamily` (norms, sublayers, MLP, positions)."""
    token_head: str
    """"module:attribute" of its token head class."""
    sop_head: bool
    """Whether it carries ALBERT's sentence-order head when `model.sop_head` is set."""
    hf_model_type: str
    """The Hugging Face `model_type` its exports are written as (pretrain.export.hf.FORMATS)."""
    pipeline_tag: str
    """The Hub's task tag of its exports."""

    @property
    def objective(self) -> str:
        """The token objective: "clm" or "mlm" (the prefix of its loss and accuracy keys)."""
        return "clm" if self.causal else "mlm"

    def block_family(self) -> Any:
        return resolve(self.blocks)

    def token_head_class(self) -> Any:
        return resolve(self.token_head)


def resolve(reference: str) -> Any:
    """The object a "module:attribute" reference names."""
    module, _, attribute = reference.partition(":")
    return getattr(import_module(module), attribute)


def _registry() -> dict[str, FamilySpec]:
    from pretrain.families import albert, llama

    return {spec.name: spec for spec in (albert.SPEC, llama.SPEC)}


FAMILIES: dict[str, FamilySpec] = _registry()
"""Every family, by `model.family`. Adding one is a module with its SPEC and a row here."""

"""Model behaviour: tied gradients, causality, masking, ACT (import rules: test_boundaries)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, tiny_config, tiny_model

from pretrain.model import SharedTransformer


def unrolled_copy(model: SharedTransformer) -> SharedTransformer:
    """The same function with no sharing: layer i gets its own copy of its set's weights."""
    cfg = tiny_config(model.cfg.family, num_layers=model.cfg.num_layers)
    unrolled = SharedTransformer(cfg).eval()
    state, plan = model.state_dict(), model.plan
    new_state = {}
    for key in unrolled.state_dict():
        parts = key.split(".")
        if parts[0] == "encoder" and parts[1] in ("attention", "ffn"):
            layer = int(parts[2])
            parts[2] = str((plan.attention if parts[1] == "attention" else plan.ffn)[layer])
        new_state[key] = state[".".join(parts)].clone()
    unrolled.load_state_dict(new_state)
    return unrolled


def loss_of(model: SharedTransformer, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


@pytest.mark.unit
@pytest.mark.parametrize("family", ["albert", "llama"])
@pytest.mark.parametrize(
    "sharing", [{"strategy": "all"}, {"strategy": "cycle", "num_sets": 2}], ids=["all", "cycle"]
)
def test_shared_gradient_is_sum_of_per_use_gradients(family, sharing):
    torch.manual_seed(0)
    shared = SharedTransformer(tiny_config(family, sharing=sharing)).eval()
    unrolled = unrolled_copy(shared)
    ids = random_ids()
    loss_shared, loss_unrolled = loss_of(shared, ids), loss_of(unrolled, ids)
    torch.testing.assert_close(loss_shared, loss_unrolled, rtol=0, atol=1e-6)
    loss_shared.backward()
    loss_unrolled.backward()
    plan = shared.plan
    for component, table in (("attention", plan.attention), ("ffn", plan.ffn)):
        for name, param in getattr(shared.encoder, component).named_parameters():
            index, rest = name.split(".", 1)
            uses = [i for i, s in enumerate(table) if s == int(index)]
            per_use = [
                unrolled.encoder.get_submodule(f"{component}.{i}").get_parameter(rest).grad
                for i in uses
            ]
            assert len(uses) > 1 or sharing["strategy"] == "none"
            torch.testing.assert_close(
                param.grad, torch.stack(per_use).sum(0), rtol=1e-5, atol=1e-7
            )


@pytest.mark.unit
def test_llama_is_causal():
    model = tiny_model("llama")
    ids = random_ids(length=16)
    base = model(ids).logits
    for t in (0, 5, 14):
        changed = ids.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 96 + 1
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(logits[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.unit
def test_llama_is_causal_with_padding_mask():
    model = tiny_model("llama")
    ids = random_ids(length=16)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    base = model(ids, attention_mask=mask).logits
    changed = ids.clone()
    changed[:, 9:] = 5
    logits = model(changed, attention_mask=mask).logits
    torch.testing.assert_close(logits[:, :9], base[:, :9], rtol=0, atol=0)
    # The mask changes nothing at real positions of a right-padded causal sequence.
    torch.testing.assert_close(base[1, :12], model(ids).logits[1, :12], rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_albert_is_bidirectional():
    model = tiny_model("albert")
    ids = random_ids(length=16)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 96 + 1
    assert not torch.allclose(model(ids).logits[:, 0], model(changed).logits[:, 0])


@pytest.mark.unit
def test_albert_padding_is_invisible():
    model = tiny_model("albert")
    ids = random_ids(length=16)
    mask = torch.ones_like(ids)
    mask[:, 10:] = 0
    other = ids.clone()
    other[:, 10:] = 3
    a = model(ids, attention_mask=mask).logits[:, :10]
    b = model(other, attention_mask=mask).logits[:, :10]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_predict_mask_selects_positions():
    model = tiny_model("albert")
    ids = random_ids(length=16)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 3] = mask[1, 7] = mask[1, 8] = True
    full = model(ids).logits
    selected = model(ids, predict_mask=mask).logits
    assert selected.shape == (3, 97)
    torch.testing.assert_close(selected, full[mask], rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_heads_and_shapes():
    albert = tiny_model("albert")
    out = albert(random_ids(), token_type_ids=torch.zeros(2, 12, dtype=torch.long))
    assert out.logits.shape == (2, 12, 97) and out.sop_logits.shape == (2, 2)
    assert out.ponder_cost is None
    assert tiny_model("albert", sop_head=False)(random_ids()).sop_logits is None
    llama = tiny_model("llama")
    out = llama(random_ids())
    assert out.logits.shape == (2, 12, 97) and out.sop_logits is None
    # Tied heads own no copy of the table: the decoder is the embedding Parameter.
    names = [n for n, _ in llama.named_parameters()]
    assert not any(n.startswith("head.") for n in names)
    assert "head.bias" in dict(albert.named_parameters())


@pytest.mark.unit
def test_projection_dropped_when_e_equals_h():
    model = tiny_model("albert", embedding_size=32)
    assert model.embeddings.project is None
    assert tiny_model("albert").embeddings.project is not None


@pytest.mark.unit
def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = SharedTransformer(tiny_config("albert", sharing={"strategy": "all"}, dropout=0.0))
    ids = random_ids()
    loss_of(model, ids).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("encoder.") for n in expected)
    model.zero_grad(set_to_none=True)
    model.encoder.checkpoint_layers = True
    loss_of(model, ids).backward()
    for n, p in model.named_parameters():
        if n in expected:
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-6, atol=1e-8)
        else:
            assert p.grad is None, n


@pytest.mark.unit
class TestUniversalTransformer:
    def model(self, bias: float) -> SharedTransformer:
        model = tiny_model(sharing={"strategy": "all"}, universal={"enabled": True})
        with torch.no_grad():
            model.encoder.act.halt.weight.zero_()
            model.encoder.act.halt.bias.fill_(bias)
        return model

    def test_halting_bias_starts_at_one(self):
        model = tiny_model(sharing={"strategy": "all"}, universal={"enabled": True})
        assert torch.equal(model.encoder.act.halt.bias, torch.ones(1))

    def test_certain_halt_takes_one_step(self):
        model = self.model(bias=30.0)  # p = 1: every position halts at step 1
        ids = random_ids()
        out = model(ids)
        # N = 1 step and remainder R = 1 - 0 = 1.
        assert out.ponder_cost.item() == pytest.approx(2.0)
        h = model.embeddings(ids)
        ctx = model.attention_context(ids, None, h.dtype)
        one_step = model.encoder.layer(0, h + model.encoder.act.signal[0], ctx)
        expected = model.head(one_step, model.embeddings)
        torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)

    def test_never_halting_runs_every_step(self):
        model = self.model(bias=-30.0)  # p = 0: nobody halts, N = L, R = 0
        out = model(random_ids())
        assert out.ponder_cost.item() == pytest.approx(4.0)

    def test_ponder_cost_trains_the_halting_unit(self):
        model = tiny_model(sharing={"strategy": "all"}, universal={"enabled": True})
        out = model(random_ids())
        assert 1.0 <= out.ponder_cost.item() <= 5.0
        out.ponder_cost.backward()
        assert model.encoder.act.halt.weight.grad.abs().sum() > 0


@pytest.mark.unit
@pytest.mark.parametrize(
    "variant",
    [
        {"sharing": {"strategy": "cycle", "num_sets": 2, "ratio": 0.5, "tie_penalty": 0.1}},
        {"universal": {"enabled": True}, "sharing": {"strategy": "all"}},
        {"checkpoint_layers": True},
    ],
    ids=["relaxed", "act", "activation-checkpointing"],
)
def test_compiled_blocks_give_the_eager_outputs_and_gradients(variant):
    variant = dict(variant)
    checkpointing = variant.pop("checkpoint_layers", False)
    torch.manual_seed(0)
    model = SharedTransformer(tiny_config("albert", **variant)).train()
    model.encoder.checkpoint_layers = checkpointing
    ids = random_ids(length=16)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0

    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask)
        loss = out.logits.float().square().mean()
        loss = loss + (out.ponder_cost if out.ponder_cost is not None else 0)
        loss = loss + (out.tie_penalty if out.tie_penalty is not None else 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    eager = step()
    names = list(model.state_dict())
    model.encoder.compile_blocks()
    assert list(model.state_dict()) == names  # checkpoints and exports see the same keys
    compiled = step()
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    assert compiled[1].keys() == eager[1].keys()
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], rtol=1e-3, atol=1e-6)

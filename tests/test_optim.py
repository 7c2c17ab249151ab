"""Parameter groups, LAMB against a plain reference, and the learning-rate schedule."""

from __future__ import annotations

import io
import re
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from helpers import random_ids, run_ranks, tiny_model
from torch import nn

from pretrain.config import ConfigError, OptimConfig, load_config
from pretrain.engine.optim import Lamb, build_optimizer, build_scheduler, lr_factor, param_groups

# Everything that must not decay, by name: biases, norm gains, embedding tables.
NO_DECAY = re.compile(r"(\.bias|norm\.weight|^embeddings\.(tokens|positions|token_types)\.weight)$")

MODELS = {
    "albert": lambda: tiny_model("albert"),
    "llama": lambda: tiny_model("llama"),
    "relaxed": lambda: tiny_model(
        "albert", sharing={"strategy": "all", "ratio": 0.5}, num_layers=6
    ),
    "universal": lambda: tiny_model(
        "albert", sharing={"strategy": "all"}, universal={"enabled": True}
    ),
}


def grouped_names(model: nn.Module, groups: list[dict]) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in groups]


@pytest.mark.unit
@pytest.mark.parametrize("kind", MODELS)
def test_param_groups_decay_exactly_the_linear_matrices(kind):
    model = MODELS[kind]()
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(set(g) == {"params", "weight_decay"} for g in groups)
    decayed, undecayed = grouped_names(model, groups)
    assert all(NO_DECAY.search(n) for n in undecayed), undecayed
    assert not any(NO_DECAY.search(n) for n in decayed), decayed
    for name in decayed:
        assert isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.Linear), name
    assert "encoder.attention.0.fn.q.weight" in decayed
    assert "embeddings.project.weight" in decayed
    assert "embeddings.tokens.weight" in undecayed
    assert "encoder.ffn.0.norm.weight" in undecayed


def names_by_group(kind: str) -> list[list[str]]:
    model = MODELS[kind]()
    return grouped_names(model, param_groups(model, 0.1))


@pytest.mark.unit
def test_param_groups_name_the_special_cases():
    _, albert = names_by_group("albert")
    assert {"head.bias", "embeddings.positions.weight", "embeddings.token_types.weight"} <= set(
        albert
    )
    _, llama = names_by_group("llama")
    assert {"final_norm.weight", "encoder.attention.0.norm.weight"} <= set(llama)
    decayed, _ = names_by_group("relaxed")
    deltas = [n for n in decayed if n.startswith("encoder.deltas.")]
    assert len(deltas) == 6 * 6 * 2  # layers x roles (q k v o up down) x (down, up)
    decayed, undecayed = names_by_group("universal")
    assert "encoder.act.halt.weight" in decayed and "encoder.act.halt.bias" in undecayed


@pytest.mark.unit
@pytest.mark.parametrize("kind", MODELS)
def test_param_groups_cover_every_parameter_once(kind):
    model = MODELS[kind]()
    listed = [id(p) for g in param_groups(model, 0.1) for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(id(p) for p in model.parameters())


class Shared(nn.Module):
    """One module under two names, and a decoder tied to an embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(10, 4)
        self.decoder = nn.Linear(4, 10, bias=False)
        self.decoder.weight = self.table.weight
        self.block = nn.Linear(4, 4)
        self.again = self.block
        self.norm = nn.LayerNorm(4)


@pytest.mark.unit
def test_shared_parameters_are_listed_once():
    model = Shared()
    decayed, undecayed = grouped_names(model, param_groups(model, 0.1))
    assert decayed == ["block.weight"]
    assert sorted(undecayed) == ["block.bias", "norm.bias", "norm.weight", "table.weight"]


@pytest.mark.unit
def test_empty_groups_are_dropped():
    groups = param_groups(nn.LayerNorm(4), 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------
# LAMB


def reference_lamb(w, grads, lr, betas, eps, wd):
    """LAMB on one tensor, written out step by step in float64."""
    w = w.double().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        u = m_hat / (v_hat.sqrt() + eps) + wd * w
        w_norm, u_norm = w.norm(), u.norm()
        r = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        w = w - lr * r * u
    return w.float()


def make_params_and_grads(steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 5), (5,), (3, 4, 2)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[torch.randn(s, generator=g) for _ in range(steps)] for s in shapes]
    return params, grads


def run_steps(opt, params, grads, steps):
    for k in steps:
        for p, gs in zip(params, grads, strict=True):
            p.grad = gs[k].clone()
        opt.step()


@pytest.mark.unit
@pytest.mark.parametrize("steps", [1, 5])
def test_lamb_matches_reference(steps):
    params, grads = make_params_and_grads(steps)
    start = [p.detach().clone() for p in params]
    hp = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-6}
    wds = [0.1, 0.0, 0.1]
    groups = [{"params": [p], "weight_decay": wd} for p, wd in zip(params, wds, strict=True)]
    run_steps(Lamb(groups, **hp), params, grads, range(steps))
    for p, w0, gs, wd in zip(params, start, grads, wds, strict=True):
        expected = reference_lamb(w0, gs, wd=wd, **hp)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)


@pytest.mark.unit
def test_lamb_trust_ratio_is_one_for_a_zero_weight():
    p, g = nn.Parameter(torch.zeros(6)), torch.linspace(-3, 2, 6)
    p.grad = g.clone()
    Lamb([p], lr=0.1, eps=1e-6, weight_decay=0.01).step()
    # First step: m_hat = g, v_hat = g^2, and w = 0 adds no decay term.
    torch.testing.assert_close(p.detach(), -0.1 * g / (g.abs() + 1e-6), rtol=1e-6, atol=0)


@pytest.mark.unit
def test_lamb_zero_update_leaves_a_zero_weight_finite():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.zeros(3)
    Lamb([p], lr=0.1).step()
    assert torch.equal(p.detach(), torch.zeros(3))


@pytest.mark.unit
@pytest.mark.parametrize(("name", "shrink"), [("lamb", 1 - 0.01), ("adamw", 1 - 0.01 * 0.1)])
def test_weight_decay_only_in_the_decayed_group(name, shrink):
    # With zero gradients only decay moves a weight: LAMB's trust ratio scales wd * w back
    # to ||w||, so w -> (1 - lr) w; AdamW's decoupled decay gives w -> (1 - lr * wd) w.
    model = tiny_model("albert")
    opt = build_optimizer(model, OptimConfig(name=name, lr=0.01, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed, undecayed = grouped_names(model, opt.param_groups)
    after = dict(model.named_parameters())
    for n in decayed:
        torch.testing.assert_close(after[n].detach(), shrink * before[n], rtol=1e-6, atol=0)
    for n in undecayed:
        assert torch.equal(after[n].detach(), before[n]), n


@pytest.mark.unit
def test_lamb_state_dict_round_trip_continues_identically():
    params, grads = make_params_and_grads(5)
    opt = Lamb(params, lr=0.05, weight_decay=0.1)
    run_steps(opt, params, grads, range(3))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = [nn.Parameter(p.detach().clone()) for p in params]
    opt_resumed = Lamb(resumed, lr=0.05, weight_decay=0.1)
    buffer.seek(0)
    opt_resumed.load_state_dict(torch.load(buffer))
    run_steps(opt, params, grads, range(3, 5))
    run_steps(opt_resumed, resumed, grads, range(3, 5))
    run_steps(Lamb(fresh, lr=0.05, weight_decay=0.1), fresh, grads, range(3, 5))
    for p, q, f in zip(params, resumed, fresh, strict=True):
        assert torch.equal(p, q)
        assert not torch.equal(p, f)  # the loaded moments and step count matter


@pytest.mark.unit
def test_lamb_trains_the_tiny_model():
    model = tiny_model("albert", sop_head=False).train()
    ids = random_ids(batch=4, length=12)
    opt = build_optimizer(model, OptimConfig(name="lamb", lr=0.05, weight_decay=0.01))
    losses = []
    for _ in range(30):
        logits = model(ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


# ---------------------------------------------------------------------------------------
# Building


@pytest.mark.unit
@pytest.mark.parametrize(("name", "cls"), [("adamw", torch.optim.AdamW), ("lamb", Lamb)])
def test_build_optimizer(name, cls):
    cfg = OptimConfig(name=name, lr=3e-4, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-8)
    opt = build_optimizer(tiny_model("albert"), cfg)
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for g in opt.param_groups:
        assert (g["lr"], tuple(g["betas"]), g["eps"]) == (3e-4, (0.8, 0.95), 1e-8)


@pytest.mark.unit
def test_adamw_is_fused_and_updates_as_the_foreach_kernel():
    """The fused kernel is the fast path, not a different optimizer: three updates of a
    model land where torch's multi-tensor AdamW puts them, to fp32 rounding."""
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.05)
    fused_model, foreach_model = tiny_model("albert"), tiny_model("albert")
    fused = build_optimizer(fused_model, cfg)
    assert all(g["fused"] for g in fused.param_groups)
    foreach = torch.optim.AdamW(
        param_groups(foreach_model, cfg.weight_decay), lr=cfg.lr, eps=cfg.eps, foreach=True
    )
    for step in range(3):
        for model, opt in ((fused_model, fused), (foreach_model, foreach)):
            model(random_ids(seed=step)).logits.square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    pairs = zip(fused_model.named_parameters(), foreach_model.parameters(), strict=True)
    for (name, a), b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.distributed
def test_lamb_under_zero_takes_the_whole_tensor_step():
    """2 ranks, ZeRO 1/2/3 in fp32 and bf16: every tensor moves as LAMB on the whole tensor
    would move it, one trust ratio per tensor, to 1e-6 (tests/zero_lamb.py). Ratios taken
    per flat slice miss by about 0.04 on this model."""
    layouts = [f"{stage}:{precision}" for precision in ("fp32", "bf16") for stage in (1, 2, 3)]
    rows = run_ranks("zero_lamb.py", *layouts)
    assert [row["layout"] for row in rows] == layouts
    for row in rows:
        assert row["worst"] <= 1e-6, row


@pytest.mark.e2e
def test_optim_module_does_not_import_deepspeed(cli):
    code = "import sys, pretrain.engine.optim; assert 'deepspeed' not in sys.modules"
    result = cli("-c", code)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------
# Learning-rate schedule


def factors(max_steps: int, extra: int = 5, **cfg) -> list[float]:
    optim = OptimConfig(**cfg)
    return [lr_factor(k, optim, max_steps) for k in range(max_steps + extra)]


@pytest.mark.unit
def test_warmup_then_linear_decay():
    f = factors(110, warmup_steps=10, decay="linear")
    assert f[0] == 0.1 and f[4] == 0.5 and f[9] == 1.0  # (step + 1) / warmup
    assert f[59] == pytest.approx(0.5, abs=1e-12)  # halfway from the peak at 9 to 109
    assert f[109] == 0.0 and f[114] == 0.0


@pytest.mark.unit
def test_warmup_then_cosine_decay():
    f = factors(110, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert f[0] == 0.1 and f[9] == 1.0
    assert f[59] == pytest.approx((1 + 0.1) / 2, abs=1e-12)
    assert f[34] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 2**-0.5), abs=1e-12)  # quarter way
    assert f[109] == 0.1 and f[114] == 0.1


@pytest.mark.unit
def test_constant_after_warmup():
    f = factors(20, warmup_steps=4, decay="constant", min_lr_ratio=0.3)
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(x == 1.0 for x in f[4:])


@pytest.mark.unit
@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_no_warmup_starts_at_the_peak(decay):
    f = factors(11, warmup_steps=0, decay=decay, min_lr_ratio=0.2)
    assert f[0] == 1.0 and f[10] == 0.2 and f[15] == 0.2
    assert f[5] == pytest.approx(0.6, abs=1e-12)  # halfway, for either shape


@pytest.mark.unit
def test_linear_decay_to_a_floor():
    f = factors(21, warmup_steps=1, decay="linear", min_lr_ratio=0.25)
    assert f[0] == 1.0  # one warmup step is the peak itself
    assert f[10] == pytest.approx(0.625, abs=1e-12)
    assert f[20] == 0.25 and min(f) == 0.25


@pytest.mark.unit
@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 7])
@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_schedule_is_monotone(decay, warmup, floor):
    f = factors(50, warmup_steps=warmup, decay=decay, min_lr_ratio=floor)
    peak = max(warmup - 1, 0)
    assert f[peak] == 1.0
    assert all(a <= b for a, b in pairwise(f[: peak + 1]))
    assert all(a >= b for a, b in pairwise(f[peak:]))
    assert all(floor <= x <= 1.0 for x in f[peak:])


@pytest.mark.unit
def test_scheduler_sets_the_lr_of_each_step():
    cfg = OptimConfig(name="lamb", lr=0.1, weight_decay=0.0, warmup_steps=4, decay="cosine")
    p = nn.Parameter(torch.zeros(3))
    opt = build_optimizer(nn.ParameterList([p]), cfg)
    sched = build_scheduler(opt, cfg, max_steps=12)
    for k in range(15):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(k, cfg, 12), abs=1e-15)
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
        if k == 0:  # a zero weight moves by exactly lr / (1 + eps) on its first update
            used = -p.detach() * (1 + cfg.eps)
            torch.testing.assert_close(used, torch.full((3,), 0.1 / 4), rtol=1e-6, atol=0)


@pytest.mark.unit
def test_scheduler_state_dict_round_trip():
    cfg = OptimConfig(lr=0.1, warmup_steps=3, decay="linear", min_lr_ratio=0.1)

    def build():
        opt = build_optimizer(nn.Linear(2, 2), cfg)
        return opt, build_scheduler(opt, cfg, max_steps=10)

    opt, sched = build()
    for _ in range(5):
        opt.step()
        sched.step()
    opt2, sched2 = build()
    # A checkpoint restores both: the group lrs live in the optimizer's state.
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 5
    for o, s in ((opt, sched), (opt2, sched2)):
        assert [g["lr"] for g in o.param_groups] == [0.1 * lr_factor(5, cfg, 10)] * 2
        o.step()
        s.step()
        assert [g["lr"] for g in o.param_groups] == [0.1 * lr_factor(6, cfg, 10)] * 2


@pytest.mark.unit
def test_warmup_longer_than_the_run_is_refused():
    overrides = ["--optim.warmup_steps=11", "--train.max_steps=10"]
    with pytest.raises(ConfigError, match=r"optim.warmup_steps \(11\).*train.max_steps \(10\)"):
        load_config(overrides=overrides)


@pytest.mark.unit
def test_a_partition_map_is_runs_of_tensors_not_an_index_per_element():
    from pretrain.engine.optim import Partition

    # A slice of 20: padding 0-1, tensor 2 at 2-6, tensor 0 at 7-9, a gap 10-14, tensor 1
    # at 15-17, padding to the end; an empty piece leaves no run.
    pieces = [(15, 3, 1), (2, 5, 2), (7, 3, 0), (9, 0, 3)]
    part = Partition.from_pieces(20, pieces, 4, None, torch.device("cpu"))
    assert part.owners.tolist() == [4, 2, 0, 4, 1, 4]
    assert part.lengths.tolist() == [2, 5, 3, 5, 3, 2]
    per_element = torch.repeat_interleave(part.owners, part.lengths)
    assert per_element.tolist() == [4, 4] + [2] * 5 + [0] * 3 + [4] * 5 + [1] * 3 + [4, 4]

"""Config system: presets, overrides, typed loading, and one-line errors for mistakes."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from helpers import CONFIGS, REPO

from pretrain.__main__ import main as pretrain_main
from pretrain.config import (
    Config,
    ConfigError,
    from_dict,
    load_config,
    parse_overrides,
    reference,
)
from pretrain.model import STRATEGIES, SharedTransformer
from pretrain.model.accounting import account

SMOKE = {"tiny-albert.yaml", "tiny-llama.yaml"}


@pytest.mark.unit
def test_presets_exist():
    names = {p.name for p in CONFIGS}
    expected = {
        "albert-base.yaml",
        "albert-large.yaml",
        "albert-xlarge.yaml",
        "albert-xxlarge.yaml",
        "ut-base.yaml",
        "llama-small.yaml",
        *SMOKE,
    }
    assert expected <= names


@pytest.mark.unit
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_builds(path):
    cfg = load_config(path)
    acc = account(cfg)  # builds the model on the meta device
    assert acc.unique_params > 0
    assert acc.effective_params >= acc.unique_params
    assert acc.flops_per_token > 0
    # The resolved config survives a round trip through plain data (checkpoints hold it).
    assert from_dict(Config, cfg.to_dict()) == cfg


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_smoke_configs_are_small_and_run(name):
    cfg = load_config(REPO / "configs" / name)
    model = SharedTransformer(cfg.model)
    unique = sum(p.numel() for p in model.parameters())
    assert 50_000 < unique < 1_000_000, unique
    ids = torch.randint(1, cfg.model.vocab_size, (2, cfg.data.seq_length))
    out = model(ids)
    assert out.logits.shape == (2, cfg.data.seq_length, cfg.model.vocab_size)
    assert torch.isfinite(out.logits).all()


@pytest.mark.unit
def test_albert_presets_match_paper_shapes():
    sizes = {"base": (12, 768), "large": (24, 1024), "xlarge": (24, 2048), "xxlarge": (12, 4096)}
    for name, (layers, hidden) in sizes.items():
        m = load_config(REPO / "configs" / f"albert-{name}.yaml").model
        assert (m.num_layers, m.hidden_size, m.embedding_size, m.vocab_size) == (
            layers,
            hidden,
            128,
            30000,
        )
        assert m.sharing.strategy == "all"


@pytest.mark.unit
def test_strategy_names_come_from_the_registry():
    # The config validates against the registry the plan is built from: every registered
    # strategy loads, and an unknown one is refused with the registered names.
    for name, strategy in STRATEGIES.items():
        sets = ["--model.sharing.num_sets=2"] if strategy.takes_sets else []
        load_config(overrides=[f"--model.sharing.strategy={name}", *sets])
    with pytest.raises(ConfigError, match="choose one of " + ", ".join(STRATEGIES)):
        load_config(overrides=["--model.sharing.strategy=cyclic"])


@pytest.mark.unit
def test_overrides_both_spellings_and_types():
    path = REPO / "configs" / "tiny-albert.yaml"
    cfg = load_config(
        path,
        [
            "--model.num_layers=8",
            "--model.sharing.strategy",
            "cycle",
            "--model.sharing.num_sets=2",
            "--optim.betas=[0.9, 0.98]",
            "--optim.lr=1e-4",
            "--engine.precision=bf16",
        ],
    )
    assert cfg.model.num_layers == 8
    assert cfg.model.sharing.strategy == "cycle" and cfg.model.sharing.num_sets == 2
    assert cfg.optim.betas == (0.9, 0.98)
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.engine.precision == "bf16"


@pytest.mark.unit
def test_integer_accepted_where_float_expected():
    cfg = load_config(overrides={"optim.lr": 1})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.unit
def test_family_defaults_resolve():
    albert = load_config(overrides={"model.family": "albert"}).model
    llama = load_config(overrides={"model.family": "llama"}).model
    assert (albert.norm_eps, albert.type_vocab_size, albert.causal) == (1e-12, 2, False)
    assert (llama.norm_eps, llama.type_vocab_size, llama.causal) == (1e-6, 0, True)


@pytest.mark.unit
def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"'model.num_layer'.*did you mean 'num_layers'"):
        load_config(overrides={"model.num_layer": 3})


@pytest.mark.unit
def test_bool_is_not_an_integer():
    with pytest.raises(ConfigError, match=r"model.num_layers: expected an integer"):
        load_config(overrides={"model.num_layers": True})


@pytest.mark.unit
def test_parse_overrides_rejects_positional():
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["configs/x.yaml"])


@pytest.mark.unit
def test_every_section_is_a_dataclass_with_defaults():
    # A default Config must be valid: every key has a sensible default.
    cfg = Config()
    for f in dataclasses.fields(cfg):
        assert dataclasses.is_dataclass(getattr(cfg, f.name))


# Each mistake: (YAML text or None, overrides, a fragment the one-line message must contain)
BAD_CONFIGS = {
    "typo_key": ("model:\n  num_layer: 12\n", [], "did you mean 'num_layers'"),
    "typo_section": ("modle:\n  num_layers: 12\n", [], "did you mean 'model'"),
    "wrong_type": ("model:\n  num_layers: twelve\n", [], "model.num_layers: expected an integer"),
    "sequence_not_divisible": (
        "model:\n  num_layers: 12\n  sharing:\n    strategy: sequence\n    num_sets: 5\n",
        [],
        "num_layers (12) must be divisible by sharing.num_sets (5) for sequence sharing",
    ),
    "heads_not_divisible": (
        "model:\n  hidden_size: 100\n  num_heads: 12\n",
        [],
        "model.hidden_size (100) must be divisible by model.num_heads (12)",
    ),
    "unknown_strategy": (None, ["--model.sharing.strategy=cylce"], "did you mean 'cycle'"),
    "unknown_family": (None, ["--model.family=bert"], "'bert' is not one of 'albert' | 'llama'"),
    "range_past_end": (
        "model:\n  num_layers: 12\n  sharing:\n    strategy: all\n    end: 12\n",
        [],
        "sharing.end (12) must be a layer index below model.num_layers (12)",
    ),
    "embedding_wider_than_hidden": (
        "model:\n  embedding_size: 1024\n  hidden_size: 768\n",
        [],
        "model.embedding_size (1024) must not exceed model.hidden_size (768)",
    ),
    "num_sets_missing": (
        "model:\n  sharing:\n    strategy: cycle\n",
        [],
        "sharing.num_sets is required for cycle sharing",
    ),
    "zero_stage": (
        None,
        ["--engine.zero_stage=4"],
        "engine.zero_stage: 4 is not one of 0 | 1 | 2 | 3",
    ),
    "seq_longer_than_positions": (
        "model:\n  max_position_embeddings: 128\ndata:\n  seq_length: 512\n",
        [],
        "data.seq_length (512) must not exceed model.max_position_embeddings (128)",
    ),
    "universal_needs_all_sharing": (
        "model:\n  sharing:\n    strategy: cycle\n    num_sets: 3\n"
        "  universal:\n    enabled: true\n",
        [],
        "model.universal.enabled needs model.sharing.strategy=all",
    ),
    "relaxed_ratio_too_close_to_one": (
        None,
        ["--model.sharing.ratio=0.999"],
        "sharing.ratio (0.999) leaves no room for a rank-1 delta",
    ),
    "compile_under_zero3": (
        None,
        ["--train.compile=true", "--engine.zero_stage=3"],
        "train.compile=true needs engine.zero_stage 0-2",
    ),
    "invalid_yaml": ("model: [unclosed\n", [], "is not valid YAML"),
    "override_without_value": (None, ["--model.num_layers"], "has no value"),
    "section_as_value": ("model: 12\n", [], "model: expected a mapping of keys"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_gives_one_clear_line(name, tmp_path, cli):
    text, overrides, fragment = BAD_CONFIGS[name]
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    else:
        path = REPO / "configs" / "tiny-albert.yaml"
    result = cli("-m", "pretrain.summary", str(path), *overrides)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]
    assert result.stdout == ""


@pytest.mark.e2e
def test_missing_config_file(cli, tmp_path):
    result = cli("-m", "pretrain.summary", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: config file '{tmp_path / 'nope.yaml'}' not found"
    ]


TINY = str(REPO / "configs" / "tiny-albert.yaml")


@pytest.mark.e2e
def test_config_command_prints_the_resolved_config(cli, tmp_path):
    result = cli("-m", "pretrain", "config", TINY, "--model.num_layers=6")
    assert result.returncode == 0, result.stderr
    printed = tmp_path / "resolved.yaml"
    printed.write_text(result.stdout)
    expected = load_config(TINY, ["--model.num_layers=6"])
    assert load_config(printed) == expected
    assert expected.model.num_layers == 6


@pytest.mark.e2e
def test_machine_command_names_the_cpu_class_its_peaks_and_what_auto_runs(cli, tmp_path):
    """What .ci/run prints first: the CPU class, both matmul peaks (measured once, then
    read from the host's cache) and the precision auto resolves to."""
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    first = cli("-m", "pretrain", "machine", env=env)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("device: cpu (") and "1 threads" in lines[0]
    assert "bf16 matmul peak" in lines[1] and "measured now" in lines[1]
    assert "fp32 matmul peak" in lines[2] and "measured now" in lines[2]
    assert lines[3].startswith("bf16 / fp32 matmul ratio: ")
    assert lines[4].startswith("precision auto -> ")
    again = cli("-m", "pretrain", "machine", env=env)
    assert again.stdout.replace("cached", "measured now") == first.stdout


@pytest.mark.e2e
def test_config_command_rejects_a_bad_config_in_one_line(cli):
    result = cli("-m", "pretrain", "config", TINY, "--engine.zero_stage=5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: engine.zero_stage: 5 is not one of 0 | 1 | 2 | 3"
    ]
    assert result.stdout == ""


# -- the reference: python -m pretrain config --help / --diff ---------------------------------


@pytest.mark.unit
def test_every_config_key_has_a_type_default_and_doc():
    """The reference is generated from the dataclasses; a field without its doc string
    fails here, so a new key cannot go undocumented."""
    keys = list(reference.config_keys())
    undocumented = [k.name for k in keys if not k.doc]
    assert not undocumented, f"config keys without a doc string: {undocumented}"
    flat = reference.flat(Config().to_dict())
    assert [k.name for k in keys] == list(flat)  # every key, in order, nothing invented
    for key in keys:
        assert reference.flat(Config().to_dict())[key.name] == reference._plain(key.default) or (
            key.default is None  # derived at load (the family's norm_eps, num_kv_heads)
        ), key.name


@pytest.mark.unit
def test_config_help_lists_every_key_with_its_default(capsys):
    assert pretrain_main(["config", "--help"]) == 0
    text = capsys.readouterr().out
    for key in reference.config_keys():
        assert f"  {key.name}: {key.type} = " in text, key.name
    assert "  model.sharing.strategy: str = none\n" in text
    assert "  optim.betas: list of 2 float = [0.9, 0.999]  (in [0, 1))\n" in text
    assert "      Seeds the initialisation, masking and data order.\n" in text


@pytest.mark.unit
def test_the_config_reference_page_is_what_the_dataclasses_generate(capsys):
    """docs/config.md is generated; a key added, removed or redocumented without
    regenerating it fails here, with the command that regenerates it."""
    assert pretrain_main(["config", "--markdown"]) == 0
    generated = capsys.readouterr().out
    page = REPO / reference.REFERENCE_PAGE
    assert page.read_text() == generated, (
        f"{reference.REFERENCE_PAGE} is stale: python -m pretrain config --markdown > {page}"
    )
    for key in reference.config_keys():
        assert f"| `{key.name}` |" in generated, key.name
    assert "| `optim.betas` | list of 2 float (in [0, 1)) | `[0.9, 0.999]` |" in generated


@pytest.mark.unit
def test_config_diff_shows_only_what_differs_from_the_defaults(capsys):
    path = REPO / "configs" / "tiny-llama.yaml"
    assert pretrain_main(["config", str(path), "--diff", "--train.max_steps=7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [line.split(":")[0] for line in lines]
    assert "train.max_steps:               7  # default: 1000" in lines
    assert "model.num_kv_heads:            2  # default: 4" in lines  # num_heads is 4
    assert "model.norm_eps" not in keys  # llama's own default, not a change
    cfg = load_config(path, ["--train.max_steps=7"])
    flat, defaults = reference.flat(cfg.to_dict()), reference.flat(Config().to_dict())
    changed = {k for k in flat if reference._plain(flat[k]) != reference._plain(defaults[k])}
    assert set(keys) == changed - {"model.norm_eps", "model.type_vocab_size"}
    assert pretrain_main(["config", str(REPO / "configs" / "tiny-albert.yaml"), "--diff"]) == 0
    albert = capsys.readouterr().out
    assert re.search(r"^model\.sharing\.strategy: +all  # default: none$", albert, re.M)

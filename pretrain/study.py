"""The sharing study: sharing plans trained alike, then compared on held-out data.

    python tools/sweep.py (--preset quick|paper | --variants FILE) --data PATH --output DIR
        [--steps N] [--seeds S [S ...]] [--teacher PATH] [--only NAME ...]

A sweep file (configs/sweeps/*.yaml) names a base config, the settings every variant shares
(steps, batch, schedule) and each variant's overrides. Every variant trains through the real
trainer (`python -m pretrain.train`, one rank) on the same data, seed and number of tokens,
then `pretrain.report` measures it on the same held-out batches: unique and effective
parameters, on-disk size, held-out loss and accuracy beside the unigram baseline, training
FLOPs per token and tokens/s, inference latency and throughput.

Outputs in DIR: runs/NAME/seed-S/ (each run, its resolved config.yaml, train.log and
figures.json), results.csv (one row per variant and seed), results.md (the table, means over
seeds with their spread) and sweep.png (held-out loss against unique parameters, and against
training tokens/s). Running the same command again resumes: finished runs are not rerun and
an interrupted one continues from its last checkpoint. A run whose settings changed since is
an error naming its folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from pretrain.config import Config, ConfigError, load_config, load_yaml, to_dict
from pretrain.config.reference import config_keys, flat
from pretrain.engine.optim import budget_warmup
from pretrain.errors import UserError, main_guard
from pretrain.families import FAMILIES
from pretrain.report import load_for_report, measure

REPO = Path(__file__).resolve().parents[1]
PRESETS = {name: REPO / "configs" / "sweeps" / f"{name}.yaml" for name in ("quick", "paper")}
FIGURES = "figures.json"
SWEEP_KEYS = {"base", "settings", "variants", "distilled"}
EVAL_BATCHES = 32


@dataclass
class Sweep:
    base: Path
    settings: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    distilled: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Run:
    name: str
    seed: int
    cfg: Config
    folder: Path

    @property
    def label(self) -> str:
        return f"{self.name} (seed {self.seed})"


def load_sweep(path: Path) -> Sweep:
    """A sweep file; unknown keys and variants that are not mappings fail loudly."""
    data = load_yaml(path)
    unknown = set(data) - SWEEP_KEYS
    if unknown or "base" not in data or not data.get("variants"):
        raise ConfigError(
            f"{path}: a sweep file holds base, settings, variants and optionally distilled"
            + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
        )
    groups = {key: data.get(key) or {} for key in ("settings", "variants", "distilled")}
    for key, group in groups.items():
        if not isinstance(group, dict):
            raise ConfigError(f"{path}: {key} must be a mapping")
    for name, overrides in {**groups["variants"], **groups["distilled"]}.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: variant {name!r} must map dotted keys to values")
    return Sweep((path.parent / data["base"]).resolve(), **groups)


def variant_config(sweep: Sweep, overrides: dict[str, Any], extra: dict[str, Any]) -> Config:
    return load_config(sweep.base, {**sweep.settings, **overrides, **extra})


def plan_runs(sweep: Sweep, args: argparse.Namespace) -> list[Run]:
    """Every variant at every seed, each config resolved (so a bad one stops the sweep
    before anything trains)."""
    variants = dict(sweep.variants)
    if args.teacher:
        variants |= {
            name: {**overrides, "distill.teacher": str(Path(args.teacher).resolve())}
            for name, overrides in sweep.distilled.items()
        }
    unknown = set(args.only or ()) - set(variants)
    if unknown:
        raise ConfigError(
            f"--only names no variant of this sweep: {', '.join(sorted(unknown))};"
            f" variants: {', '.join(variants)}"
        )
    runs, notes = [], []
    for name, overrides in variants.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds or [None]:
            extra = {"data.path": str(Path(args.data).resolve())}
            if seed is not None:
                extra["train.seed"] = seed
            try:
                if args.steps:
                    extra |= step_budget(sweep, overrides, extra, args.steps, notes)
                cfg = variant_config(sweep, overrides, extra)
            except ConfigError as err:
                raise ConfigError(f"variant {name!r}: {err}") from None
            folder = args.output / "runs" / name / f"seed-{cfg.train.seed}"
            cfg.train.output_dir = str(folder.resolve())
            runs.append(Run(name, cfg.train.seed, cfg, folder))
    for note in dict.fromkeys(notes):  # once each, in order
        print(note, file=sys.stderr)
    return runs


def step_budget(
    sweep: Sweep, overrides: dict[str, Any], extra: dict[str, Any], steps: int, notes: list
) -> dict[str, Any]:
    """The overrides of a `--steps` budget: max_steps, and the recipe's warmup scaled with
    the budget where it would not fit (its line added to `notes`)."""
    recipe = variant_config(sweep, overrides, extra)
    warmup, note = budget_warmup(recipe.optim, recipe.train.max_steps, steps)
    if note:
        notes.append(f"--steps {steps}: {note}")
    return {"train.max_steps": steps, "optim.warmup_steps": warmup}


def eval_config(sweep: Sweep, args: argparse.Namespace) -> Config:
    """Data and masking of the held-out figures: the same for every variant."""
    return variant_config(sweep, {}, {"data.path": str(Path(args.data).resolve())})


# -- one run --------------------------------------------------------------------------------


def resolved(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def same_settings(saved: dict[str, Any], cfg: Config) -> bool:
    """Does a run folder's config (as saved) describe `cfg`? A key the saved one lacks was
    added to the schema since, and the run had its default."""
    defaults = {k.name: k.default for k in config_keys()}
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    now = flat(yaml.safe_load(resolved(cfg)))
    was = flat(saved)
    return all(was.get(k, defaults.get(k)) == v for k, v in now.items())


def prepare(run: Run) -> bool:
    """Write the run's config; True when it already finished. A folder holding another
    config is refused rather than mixed with this one."""
    path = run.folder / "config.yaml"
    if path.is_file() and not same_settings(yaml.safe_load(path.read_text()), run.cfg):
        raise UserError(
            f"{run.folder} holds a run of {run.label} with other settings; delete that folder"
            " or sweep into another --output"
        )
    run.folder.mkdir(parents=True, exist_ok=True)
    path.write_text(resolved(run.cfg))
    return (run.folder / FIGURES).is_file()


def last_step(folder: Path) -> int:
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line]
    return max(steps, default=0)


def train(run: Run, position: str) -> None:
    """The real trainer in its own process, one rank; a progress bar follows its metrics."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "pretrain.train", "--config", str(run.folder / "config.yaml")]
    total = run.cfg.train.max_steps
    with (
        open(run.folder / "train.log", "a") as log,
        tqdm(total=total, desc=f"{position} {run.label}", unit="step", leave=True) as bar,
    ):
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        while process.poll() is None:
            time.sleep(0.5)
            bar.update(min(last_step(run.folder), total) - bar.n)
        bar.update(min(last_step(run.folder), total) - bar.n)
    if process.returncode != 0:
        tail = (run.folder / "train.log").read_text().splitlines()[-15:]
        raise RuntimeError(
            f"{run.label} failed (exit {process.returncode}); the end of"
            f" {run.folder / 'train.log'}:\n" + "\n".join(tail)
        )


def train_speed(folder: Path) -> float:
    """Median tokens/s of the logged steps, the first (warm-up) left out."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return statistics.median(speeds) if speeds else float("nan")


def evaluate(run: Run, cfg: Config) -> dict[str, Any]:
    figures = measure(load_for_report(run.folder), cfg, eval_batches=EVAL_BATCHES)
    return {
        "variant": run.name,
        "seed": run.seed,
        **figures,
        "train_steps": run.cfg.train.max_steps,
        "train_tokens": run.cfg.train.max_steps
        * run.cfg.engine.micro_batch_size
        * run.cfg.engine.grad_accum_steps
        * run.cfg.data.seq_length,
        "train_tokens_per_s": train_speed(run.folder),
    }


# -- results --------------------------------------------------------------------------------


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def by_variant(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    return groups


def mean(group: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in group)


def spread(values: list[float]) -> str:
    middle = statistics.fmean(values)
    if len(values) == 1:
        return f"{middle:.3f}"
    return f"{middle:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def markdown(rows: list[dict], settings: str) -> str:
    """Means over seeds, ± half their range where there are several."""
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"Held-out {'next' if FAMILIES[rows[0]['family']].causal else 'masked'}-token loss and"
        f" accuracy over {rows[0]['eval_targets']:,} targets; {settings}; seeds"
        f" {', '.join(map(str, seeds))}"
        + (" (± half the range across seeds)" if len(seeds) > 1 else ""),
        "",
        "| variant | plan | unique params | effective | disk MB | held-out loss | accuracy"
        " | train tokens/s | train GFLOPs/token | latency b1 ms | tokens/s b32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, group in by_variant(rows).items():
        first = group[0]
        lines.append(
            f"| {name} | {first['plan']} | {first['unique_params']:,}"
            f" | {first['effective_params']:,} | {first['disk_bytes'] / 1e6:.2f}"
            f" | {spread([r['eval_loss'] for r in group])}"
            f" | {spread([r['eval_acc'] for r in group])}"
            f" | {mean(group, 'train_tokens_per_s'):,.0f}"
            f" | {first['train_flops_per_token'] / 1e9:.3f}"
            f" | {mean(group, 'latency_ms'):.2f} | {mean(group, 'throughput_tokens_per_s'):,.0f} |"
        )
    base = rows[0]
    lines += [
        "",
        f"Unigram baseline on the same targets: loss {base['baseline_loss']:.3f}, accuracy"
        f" {base['baseline_acc']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def check_plotting() -> None:
    """The plot is drawn after every run trained: say now if it cannot be."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(
            "tools/sweep.py draws sweep.png with matplotlib, which is not installed:"
            " pip install -e '.[study]'"
        ) from None


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for i, (name, group) in enumerate(by_variant(rows).items()):
        losses = [r["eval_loss"] for r in group]
        y = statistics.fmean(losses)
        err = (max(losses) - min(losses)) / 2
        for ax, x in (
            (left, group[0]["unique_params"]),
            (right, mean(group, "train_tokens_per_s")),
        ):
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3)
            # Staggered, so that variants with the same x and nearly the same loss stay legible.
            offset = (5, 4 + 8 * (i % 4))
            ax.annotate(name, (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.set_xscale("log")
    left.set_xlabel("unique parameters")
    left.set_ylabel(f"held-out loss (unigram baseline: {rows[0]['baseline_loss']:.3f})")
    right.set_xlabel("training tokens/s")
    fig.suptitle("sharing plans at equal effective depth, data and tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: list[dict], output: Path, settings: str) -> None:
    write_csv(rows, output / "results.csv")
    (output / "results.md").write_text(markdown(rows, settings))
    plot(rows, output / "sweep.png")


# -- the sweep ------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/sweep.py", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a built-in sweep")
    source.add_argument("--variants", type=Path, help="a sweep file (see configs/sweeps/)")
    parser.add_argument("--data", required=True, help="token shards (tools/preprocess.py)")
    parser.add_argument("--output", type=Path, required=True, help="the sweep's folder")
    parser.add_argument(
        "--steps",
        type=int,
        help="every variant's step budget (smoke runs); below the recipe's warmup, the warmup"
        " is scaled with it",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the config's seed")
    parser.add_argument("--teacher", help="adds the sweep's distilled variants with this teacher")
    parser.add_argument("--only", nargs="+", help="run these variants only")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_plotting()
    sweep = load_sweep(PRESETS[args.preset] if args.preset else args.variants)
    runs = plan_runs(sweep, args)
    cfg = eval_config(sweep, args)
    args.output.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for i, run in enumerate(runs, 1):
        position = f"[{i}/{len(runs)}]"
        if prepare(run):
            print(f"{position} {run.label}: finished before, not rerun", flush=True)
        else:
            try:
                train(run, position)
            except RuntimeError as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                failed.append(run.label)
                continue
            figures = evaluate(run, cfg)
            (run.folder / FIGURES).write_text(json.dumps(figures, indent=2) + "\n")
        rows.append(json.loads((run.folder / FIGURES).read_text()))
    if rows:
        first = runs[0].cfg
        settings = (
            f"{first.train.max_steps} steps of {first.engine.micro_batch_size} x"
            f" {first.data.seq_length} tokens each, base {sweep.base.name}"
        )
        write_results(rows, args.output, settings)
        print((args.output / "results.md").read_text())
        print(f"results: {args.output / 'results.csv'}, results.md, sweep.png")
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))

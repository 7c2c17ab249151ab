"""Train-step throughput: our model against the Hugging Face reference, side by side.

    python tools/bench_train.py CONFIG [--dotted.overrides] [--steps N] [--warmup N]
        [--precision auto|bf16|fp32|both] [--device cpu|cuda] [--threads N] [--engine]
        [--no-reference] [--fit-batch] [--json]

CONFIG is a YAML file or the name of one in configs/ (`demo`, `albert-base`, `llama-small`).
Batch and length come from the config (`--engine.micro_batch_size`, `--data.seq_length`);
`--train.compile=true` compiles our shared blocks (the warm-up steps absorb the compile).

Both models start from the same weights (ours, converted by the exporter): HF
`AlbertForMaskedLM` for the albert family (MLM only: the SOP head is left out of both) and
`LlamaForCausalLM` for llama. Each step is forward, the same loss code, backward and the same
AdamW update, on the same synthetic batch (no padding; ALBERT's samples mostly fill the
sequence). The two are interleaved step by step after warm-up, in alternating order, so a
slow stretch of the machine hits both. Printed per model: tokens/s (median step), peak
memory, achieved TFLOP/s from our FLOP accounting (every application of a shared layer
counts), and MFU against the datasheet peak (when the device has one) and against the matmul
peak of the step's dtype measured once per host (the trainer's own MFU denominator, from the
same cache). The device line names the CPU class (AVX2, AVX512, AVX512-BF16, AMX, ...);
`--precision auto` (the shipped configs' setting) picks what the trainer would, and says why;
`--precision both` times fp32 and bf16 and prints them in one table.

`--engine` also times the real path: our DeepSpeed engine on one rank, fed by the real
loader from `data.path`, against the bare step of the same model on the same batches; the
difference is the engine's overhead.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from pretrain.config import Config, ConfigError, load_config
from pretrain.data.masking import IGNORE_INDEX
from pretrain.engine.optim import build_optimizer
from pretrain.errors import main_guard
from pretrain.export.hf import HFReference, hf_model
from pretrain.hardware import cached_peak, choose_precision, device_name
from pretrain.metrics import peak_tflops, sync, throughput
from pretrain.model import SharedTransformer
from pretrain.model.accounting import account
from pretrain.objectives import compute_loss, model_inputs

REPO = Path(__file__).resolve().parents[1]
_GIB = 2**30


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="YAML config, or a name in configs/ (e.g. demo)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32", "both"),
        help="default: the config's; both: fp32 and bf16 side by side",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present")
    parser.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--engine", action="store_true", help="also time the real engine path")
    parser.add_argument("--no-reference", action="store_true", help="time only our model")
    parser.add_argument(
        "--fit-batch",
        action="store_true",
        help="on out-of-memory, halve the micro-batch and retry: the largest that fits both",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    return parser.parse_known_args(argv)


def resolve_config(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    preset = REPO / "configs" / f"{name}.yaml"
    if preset.exists():
        return preset
    names = ", ".join(sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
    raise ConfigError(f"no config file {name!r} and no preset of that name; presets: {names}")


# -- batches and steps -----------------------------------------------------------------


def synthetic_batch(cfg: Config, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """One micro-batch shaped as the loader's, without padding (so, as the loader, without an
    attention mask). MLM masks as many positions
    per sequence as training does (mask_prob, capped at max_predictions)."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = cfg.engine.micro_batch_size, cfg.data.seq_length, cfg.model.vocab_size
    input_ids_BT = torch.randint(5, V, (B, T), generator=g)
    if cfg.model.causal:
        batch = {"input_ids": input_ids_BT, "labels": input_ids_BT.clone()}
    else:
        o = cfg.objective
        n = min(o.max_predictions, max(1, round(T * o.mask_prob)))
        picked_BN = torch.rand(B, T - 2, generator=g).argsort(-1)[:, :n] + 1  # not CLS/SEP
        labels_BT = torch.full((B, T), IGNORE_INDEX)
        labels_BT.scatter_(1, picked_BN, input_ids_BT.gather(1, picked_BN))
        token_type_ids_BT = (torch.arange(T) >= T // 2).long().expand(B, T).contiguous()
        batch = {
            "input_ids": input_ids_BT,
            "token_type_ids": token_type_ids_BT,
            "mlm_labels": labels_BT,
        }
    return {k: v.to(device) for k, v in batch.items()}


class Timed:
    """One model, its optimizer and its step times."""

    def __init__(self, name: str, model: torch.nn.Module, cfg: Config, device, autocast) -> None:
        self.name, self.cfg, self.device, self.autocast = name, cfg, device, autocast
        self.model = model.to(device).train()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.times: list[float] = []
        self.peak_bytes = 0
        self.first_loss: float | None = None  # same weights, same batch: equal across models

    def step(self, batch: dict[str, torch.Tensor], record: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        start = time.perf_counter()
        with self.autocast():
            loss, _ = compute_loss(self.model(**model_inputs(batch)), batch, self.cfg)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:  # the recipe the engine runs (HF's Trainer clips too)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - start)
        if self.first_loss is None:
            self.first_loss = float(loss.detach())  # read after the clock stopped
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))

    def measure_cpu_memory(self, batch: dict[str, torch.Tensor]) -> None:
        """Without a device allocator to ask: parameters, gradients and optimizer state,
        plus every tensor autograd saves for backward in one step (the activations)."""
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.autocast():
            loss, _ = compute_loss(self.model(**model_inputs(batch)), batch, self.cfg)
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        state = sum(
            t.numel() * t.element_size()
            for s in self.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        self.peak_bytes = 2 * params + state + saved  # weights, gradients, Adam moments

    def tokens_per_s(self) -> float:
        B, T = self.cfg.engine.micro_batch_size, self.cfg.data.seq_length
        return B * T / statistics.median(self.times)


def our_model(cfg: Config) -> SharedTransformer:
    """Our model as the trainer builds it (compiled with train.compile; the compile happens
    in the first, untimed, warm-up step)."""
    model = SharedTransformer(cfg.model)
    if cfg.train.compile:
        model.encoder.compile_blocks()
    return model


def build_models(cfg: Config, reference: bool) -> dict[str, torch.nn.Module]:
    torch.manual_seed(cfg.train.seed)
    ours = our_model(cfg)
    if not reference:
        return {"ours": ours}
    hf = hf_model({k: v.clone() for k, v in ours.state_dict().items()}, cfg.model)
    return {"ours": ours, "reference": HFReference(hf)}


def run_interleaved(timed: list[Timed], batch: dict, warmup: int, steps: int) -> None:
    for i in range(warmup + steps):
        order = timed if i % 2 == 0 else timed[::-1]
        for t in order:
            t.step(batch, record=i >= warmup)


# -- the engine path ---------------------------------------------------------------------


def time_engine(cfg: Config, args: argparse.Namespace, autocast) -> dict:
    """Real path (our DeepSpeed engine, one rank, the real loader) against the bare step of
    the same model on the same batches."""
    from pretrain.data.loader import make_loader
    from pretrain.train import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg.train.output_dir = out
        cfg.train.eval_every = 0
        cfg.engine.grad_accum_steps = 1
        trainer = Trainer(cfg)
        try:
            device = trainer.world.device
            B, T = cfg.engine.micro_batch_size, cfg.data.seq_length
            loader = make_loader(trainer.train_data, 0, B)
            batches = list(zip(range(args.warmup + args.steps), loader, strict=False))
            bare = Timed("bare", our_model(cfg), cfg, device, autocast)
            engine_times = []
            for i, batch in batches:
                sync(device)
                start = time.perf_counter()
                trainer.train_step(iter([batch]))
                sync(device)
                if i >= args.warmup:
                    engine_times.append(time.perf_counter() - start)
                bare.step({k: v.to(device) for k, v in batch.items()}, record=i >= args.warmup)
            # What the trainer logs for a step of the median time: its FLOPs, its peak.
            logged = throughput(
                B * T, statistics.median(engine_times), trainer.flops_per_token, 1, trainer.peak
            )
        finally:
            trainer.close()
    engine_tps = B * T / statistics.median(engine_times)
    bare_tps = B * T / statistics.median(bare.times)
    return {
        "engine_tokens_per_s": engine_tps,
        "bare_tokens_per_s": bare_tps,
        "overhead": bare_tps / engine_tps - 1.0,
        "logged_mfu": logged["mfu"],
        "logged_peak_tflops": trainer.peak,
    }


# -- report ------------------------------------------------------------------------------


def report(cfg: Config, args: argparse.Namespace, device: torch.device, precision: str) -> dict:
    bf16 = precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    # The throughput compared is the MLM (or causal LM) step: HF's MaskedLM has no SOP head.
    cfg.model.sop_head = False
    models = build_models(cfg, not args.no_reference)
    timed = [Timed(name, m, cfg, device, autocast) for name, m in models.items()]
    batch = synthetic_batch(cfg, device, cfg.train.seed)
    run_interleaved(timed, batch, args.warmup, args.steps)
    if device.type == "cpu":
        for t in timed:
            t.measure_cpu_memory(batch)
    flops_per_token = account(cfg).flops_per_token
    datasheet = peak_tflops(device_name(device), precision, cfg.logging.peak_tflops)
    measured = {p: cached_peak(device, p).tflops for p in ("bf16", "fp32")}
    result: dict = {
        "config": str(args.config),
        "family": cfg.model.family,
        "device": device_name(device),
        "precision": precision,
        "batch": cfg.engine.micro_batch_size,
        "seq_length": cfg.data.seq_length,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "flops_per_token": flops_per_token,
        "peak_tflops": {"datasheet": datasheet, "measured_matmul": measured},
    }
    for t in timed:
        tps = t.tokens_per_s()
        tflops = tps * flops_per_token / 1e12
        result[t.name] = {
            "tokens_per_s": tps,
            "step_ms": 1e3 * statistics.median(t.times),
            "first_loss": t.first_loss,
            "peak_memory_gib": t.peak_bytes / _GIB,
            "tflops": tflops,
            "mfu": tflops / datasheet if datasheet else None,
            "mfu_measured": tflops / measured[precision],
        }
    result["mfu"] = result["ours"]["mfu"]
    if "reference" in result:
        result["ratio"] = result["ours"]["tokens_per_s"] / result["reference"]["tokens_per_s"]
    if args.engine:
        engine = time_engine(cfg, args, autocast)
        # The bench's own MFU of the engine path, against the peak the trainer divides by.
        tflops = engine["engine_tokens_per_s"] * flops_per_token / 1e12
        engine["mfu"] = tflops / engine["logged_peak_tflops"]
        result["engine"] = engine
    return result


def _fmt(value: float | None, spec: str) -> str:
    """`spec` formats a number; a trailing % is appended as text."""
    if value is None:
        return "-"
    return format(value, spec.rstrip("%")) + ("%" if spec.endswith("%") else "")


def print_table(results: list[dict], write: Callable[[str], None] = print) -> None:
    """One table of the runs in `results` (one per precision), the same config and device."""
    r = results[0]
    write(
        f"{r['config']}: {r['family']}, B {r['batch']} x T {r['seq_length']},"
        f" {r['device']}" + (f", {r['threads']} threads" if r["threads"] else "")
    )
    peaks = r["peak_tflops"]
    write(
        f"FLOPs per token (ours, effective): {r['flops_per_token'] / 1e6:.1f} M;"
        f" peak TFLOP/s: datasheet {_fmt(peaks['datasheet'], '.1f')},"
        f" measured matmul bf16 {peaks['measured_matmul']['bf16']:.3g}"
        f" / fp32 {peaks['measured_matmul']['fp32']:.3g}"
    )
    write(
        f"{'model':<10} {'precision':<9} {'tokens/s':>10} {'step ms':>9} {'memory GiB':>11}"
        f" {'TFLOP/s':>8} {'MFU':>7} {'MFU (matmul)':>13}"
    )
    for r in results:
        for name in ("ours", "reference"):
            if name not in r:
                continue
            m = r[name]
            write(
                f"{name:<10} {r['precision']:<9} {m['tokens_per_s']:>10,.0f} {m['step_ms']:>9.1f}"
                f" {m['peak_memory_gib']:>11.3f} {m['tflops']:>8.3f}"
                f" {_fmt(m['mfu'] and 100 * m['mfu'], '.1f%'):>7}"
                f" {100 * m['mfu_measured']:>12.1f}%"
            )
    for r in results:
        if "ratio" in r:
            write(f"ours / reference, {r['precision']}: {r['ratio']:.2f}x")
    if len(results) == 2:
        fp32, bf16 = (next(r for r in results if r["precision"] == p) for p in ("fp32", "bf16"))
        speedup = bf16["ours"]["tokens_per_s"] / fp32["ours"]["tokens_per_s"]
        write(f"ours, bf16 / fp32: {speedup:.2f}x")
    for r in results:
        if "engine" in r:
            e = r["engine"]
            write(
                f"engine path, {r['precision']}: {e['engine_tokens_per_s']:,.0f} tokens/s against"
                f" a bare step's {e['bare_tokens_per_s']:,.0f}: overhead {100 * e['overhead']:.1f}%"
            )
            write(
                f"engine MFU: {100 * e['mfu']:.1f}% by this bench, {100 * e['logged_mfu']:.1f}%"
                f" as the trainer logs it (peak {e['logged_peak_tflops']:.3g} TFLOP/s)"
            )


def bench_precisions(requested: str, device: torch.device) -> list[str]:
    """The precisions to time: both, or what the trainer would run (auto resolved, and the
    line saying why)."""
    if requested == "both":
        return ["fp32", "bf16"]
    choice = choose_precision(requested, device)
    if choice.message:
        print(choice.message, file=sys.stderr)
    if choice.precision not in ("bf16", "fp32"):
        raise ConfigError(
            f"bench precision {choice.precision!r} (from {requested}): use --precision bf16 or fp32"
        )
    return [choice.precision]


def report_fitting(cfg: Config, args: argparse.Namespace, device, precision: str) -> dict:
    """`report`, halving the micro-batch on out-of-memory with --fit-batch."""
    while True:
        try:
            return report(cfg, args, device, precision)
        except torch.OutOfMemoryError:
            B = cfg.engine.micro_batch_size
            if not args.fit_batch or B == 1:
                hint = "lower --engine.micro_batch_size" if B > 1 else "the model does not fit"
                raise ConfigError(f"out of memory at micro-batch {B}: {hint}") from None
            cfg.engine.micro_batch_size = B // 2
            gc.collect()
            torch.cuda.empty_cache()
            print(f"out of memory at micro-batch {B}; trying {B // 2}", file=sys.stderr)


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    args.config = resolve_config(args.config)
    cfg = load_config(args.config, overrides)
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps must be >= 1 and --warmup >= 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.engine and args.precision == "both":
        # DeepSpeed keeps its process groups for the life of the process: one engine each.
        raise ConfigError("--engine times one precision per process; use --precision fp32 or bf16")
    results = []
    for precision in bench_precisions(args.precision or cfg.engine.precision, device):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.engine.precision = precision  # the engine path runs what is timed bare
        results.append(report_fitting(run_cfg, args, device, precision))
    print_table(results)
    if args.json:
        one = len(results) == 1
        print(json.dumps(results[0] if one else {r["precision"]: r for r in results}))
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))

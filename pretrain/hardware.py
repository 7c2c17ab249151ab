"""What this machine computes fast: its CPU class, matmul peaks measured once per host and
kept in a cache, and the precision `engine.precision: auto` resolves to.

Nothing here knows about distribution: the engine has rank 0 measure while the other ranks
wait, and hands them its result (engine/runtime.py), so that a peak is never measured by
ranks competing for the same cores and every rank runs the same precision.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.cache import cache_root

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# CPU classes whose bf16 matmuls run on native instructions (not emulated through fp32).
NATIVE_BF16 = ("AMX", "AVX512-BF16", "Arm BF16")

# Square sizes and operand layouts the peak is searched over. Both matter where bf16 is
# emulated: there a 128-wide product runs several times faster than a 1024-wide one, and
# a @ b.T (a linear layer's forward) ten times faster than a @ b (its input gradient); a
# peak taken at one size and layout lay below what the model's own matmuls reached (an MFU
# over 100 %). "nn" is a @ b, "nt" a @ b.T, "tn" a.T @ b: the three products of a linear
# layer's forward and backward.
_CPU_SIZES = (128, 256, 512, 1024)
_CUDA_SIZES = (4096, 8192)
_LAYOUTS = ("nn", "nt", "tn")
_SCAN_SECONDS = 0.25  # each size and layout is timed once this long, to find the best
_RUN_SECONDS = 0.5  # the best is then timed again in runs at least this long
_RUNS_AT_BEST = 3  # the best run counts


def cpu_class() -> str:
    """The class of this CPU by what torch computes with: "AMX", "AVX512-BF16", "AVX512",
    "AVX2", "Arm BF16", "Arm" or torch's capability name. ATen's dispatch level decides
    (ATEN_CPU_CAPABILITY can lower it): a CPU whose AVX-512 is not used counts as AVX2."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "Arm BF16" if _arm_has_bf16() else "Arm"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return capability
    if _cpu_has("_is_amx_tile_supported"):
        return "AMX"
    if _cpu_has("_is_avx512_bf16_supported"):
        return "AVX512-BF16"
    return "AVX512"


def _cpu_has(probe: str) -> bool:
    """torch's CPU feature probe (torch.cpu._is_*_supported); False where this torch lacks it."""
    return bool(getattr(torch.cpu, probe, lambda: False)())


def _arm_has_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.system() == "Darwin"  # Apple M2 and later; M1's bf16 is slow anyway
    return any(line.startswith("Features") and " bf16" in line for line in text.splitlines())


def device_name(device: torch.device) -> str:
    """The device as a datasheet names it: the CUDA device's name, or "cpu (CLASS)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_class()})"


# -- measured matmul peaks ----------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(
    device: torch.device, dtype: torch.dtype, n: int, seconds: float, layout: str = "nn"
) -> float:
    """TFLOP/s of an n x n matmul in `dtype` with operands in `layout` ("nn": a @ b, "nt":
    a @ b.T, "tn": a.T @ b), over one run of at least `seconds`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    left, right = (a.T if layout[0] == "t" else a), (b.T if layout[1] == "t" else b)
    left @ right  # first call: kernel selection, allocation
    _sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        left @ right
        iters += 1
        if iters % 8 == 0 or device.type != "cuda":  # bound the queue of launched kernels
            _sync(device)
            if time.perf_counter() - start >= seconds:
                break
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def measure_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, int, str]:
    """(best TFLOP/s, at which size, in which layout) of square matmuls in `dtype` on
    `device`, now. For each layout sizes grow while the rate does; the best size and
    layout then get more runs and the best run counts, so a moment of contention lowers
    one run, not the peak."""
    sizes = _CUDA_SIZES if device.type == "cuda" else _CPU_SIZES
    best, best_n, best_layout = 0.0, sizes[0], _LAYOUTS[0]
    for layout in _LAYOUTS:
        top = 0.0
        for n in sizes:
            rate = matmul_rate(device, dtype, n, _SCAN_SECONDS, layout)
            if rate > best:
                best, best_n, best_layout = rate, n, layout
            if rate < 0.7 * top:  # past the size this layout runs best at
                break
            top = max(top, rate)
    for _ in range(_RUNS_AT_BEST):
        best = max(best, matmul_rate(device, dtype, best_n, _RUN_SECONDS, best_layout))
    return best, best_n, best_layout


def cache_file() -> Path:
    """Where measured peaks are kept: one JSON file per host under ~/.cache/pretrain (or
    $XDG_CACHE_HOME/pretrain)."""
    return cache_root() / f"matmul-peaks-{socket.gethostname()}.json"


def _cache_key(device: torch.device, precision: str) -> str:
    """What a peak depends on besides the host: device, precision, threads, torch's build
    and the instruction sets it may use (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)."""
    parts = [device_name(device), precision, f"torch {torch.__version__}"]
    if device.type == "cpu":
        parts.append(f"{torch.get_num_threads()} threads")
        if isa := os.environ.get("ONEDNN_MAX_CPU_ISA"):
            parts.append(f"oneDNN {isa}")
    return " | ".join(parts)


@dataclass(frozen=True)
class Peak:
    tflops: float
    precision: str
    size: int  # the square size it was reached at
    layout: str  # and the operands' layout: nn, nt or tn
    cached: bool  # read from the cache rather than measured by this process

    def describe(self) -> str:
        how = "cached" if self.cached else "measured now"
        product = {"nn": "a @ b", "nt": "a @ b.T", "tn": "a.T @ b"}[self.layout]
        return (
            f"{self.precision} matmul peak {self.tflops:.3g} TFLOP/s per rank"
            f" (best {self.size}x{self.size} {product}, {how}; {cache_file()})"
        )


def cached_peak(device: torch.device, precision: str) -> Peak:
    """The matmul peak of `precision` on `device`: from the host's cache, else measured now
    (a few seconds) and cached. Call it from one process while no other is computing."""
    path, key = cache_file(), _cache_key(device, precision)
    cache = _read_cache(path)
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.keys() >= {"tflops", "size", "layout"}:
        return Peak(float(entry["tflops"]), precision, int(entry["size"]), entry["layout"], True)
    tflops, size, layout = measure_peak(device, DTYPES[precision])
    cache = _read_cache(path)  # another process may have written meanwhile
    cache[key] = {
        "tflops": tflops,
        "size": size,
        "layout": layout,
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    }
    _write_cache(path, cache)
    return Peak(tflops, precision, size, layout, cached=False)


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure again and write a good one
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, cache: dict) -> None:
    """Written whole under another name and renamed, so a reader never sees half a file;
    a cache that cannot be written (read-only home) only costs a measurement next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:
            json.dump(cache, f, indent=2, sort_keys=True)
        os.replace(f.name, path)
    except OSError:
        pass


# -- engine.precision: auto -----------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and the one line that says why."""

    precision: str
    message: str | None  # None: nothing worth saying (an explicit choice that suits)
    warning: bool = False


def choose_precision(requested: str, device: torch.device) -> PrecisionChoice:
    """What `engine.precision` runs as on `device`. On CUDA, auto is bf16 where the GPU has
    it, else fp16 (with DeepSpeed's dynamic loss scale). On a CPU, auto is bf16 only where
    the CPU class computes it natively and a measured bf16 matmul beats fp32's; an explicit
    bf16 where it does not runs, with a warning that gives the measured ratio."""
    if device.type == "cuda":
        return _choose_on_cuda(requested, device)
    if requested in ("fp32", "fp16"):
        return PrecisionChoice(requested, None)
    cls = cpu_class()
    bf16, fp32 = cached_peak(device, "bf16").tflops, cached_peak(device, "fp32").tflops
    fast = cls in NATIVE_BF16 and bf16 > fp32
    measured = f"bf16 matmuls measured {_ratio(bf16, fp32)} than fp32"
    if requested == "bf16":
        if fast:
            return PrecisionChoice("bf16", None)
        return PrecisionChoice(
            "bf16",
            f"warning: engine.precision=bf16 on a CPU without fast bf16 ({cls}): {measured};"
            " engine.precision=auto (or fp32) would run fp32",
            warning=True,
        )
    if fast:
        why = f"this CPU has native bf16 ({cls}); {measured}"
        return PrecisionChoice("bf16", f"precision auto -> bf16: {why}")
    if cls in NATIVE_BF16:
        why = f"this CPU reports native bf16 ({cls}) but {measured}"
    else:
        why = f"this CPU has no native bf16 ({cls}); {measured}"
    return PrecisionChoice("fp32", f"precision auto -> fp32: {why}")


def _choose_on_cuda(requested: str, device: torch.device) -> PrecisionChoice:
    if requested != "auto":
        return PrecisionChoice(requested, None)
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported():
        return PrecisionChoice("bf16", f"precision auto -> bf16: {name} computes bf16")
    return PrecisionChoice(
        "fp16", f"precision auto -> fp16 with a dynamic loss scale: {name} has no bf16"
    )


def _ratio(bf16: float, fp32: float) -> str:
    if bf16 >= fp32:
        return f"{bf16 / fp32:.1f}x faster"
    return f"{fp32 / bf16:.1f}x slower"


def describe_machine(device: torch.device) -> str:
    """What `python -m pretrain machine` prints: the device or CPU class, the matmul peaks
    of both precisions (measured now, or cached) and what auto would run."""
    lines = [f"device: {device_name(device)}"]
    if device.type == "cpu":
        lines[0] += (
            f", torch capability {torch.backends.cpu.get_cpu_capability()},"
            f" {torch.get_num_threads()} threads"
        )
    peaks = {p: cached_peak(device, p) for p in ("bf16", "fp32")}
    for peak in peaks.values():
        lines.append(peak.describe())
    bf16, fp32 = peaks["bf16"].tflops, peaks["fp32"].tflops
    lines.append(f"bf16 / fp32 matmul ratio: {bf16 / fp32:.3g} (bf16 {_ratio(bf16, fp32)})")
    choice = choose_precision("auto", device)
    lines.append(choice.message or f"precision auto -> {choice.precision}")
    return "\n".join(lines) + "\n"

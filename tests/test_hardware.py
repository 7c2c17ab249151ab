"""What the machine computes fast: the CPU class, matmul peaks measured once per host, and
the precision `engine.precision: auto` resolves to (with the line saying why)."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain import hardware
from pretrain.hardware import Peak, cached_peak, choose_precision, cpu_class, measure_peak

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def fake_cpu(monkeypatch, cls: str, bf16: float, fp32: float) -> list[str]:
    """A CPU of class `cls` whose measured peaks are `bf16` and `fp32` TFLOP/s; returns the
    precisions measured, in order."""
    measured = []

    def peak(device, precision):
        measured.append(precision)
        return Peak({"bf16": bf16, "fp32": fp32}[precision], precision, 256, "nt", cached=True)

    monkeypatch.setattr(hardware, "cpu_class", lambda: cls)
    monkeypatch.setattr(hardware, "cached_peak", peak)
    return measured


def test_auto_runs_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    fake_cpu(monkeypatch, "AVX2", bf16=0.00078, fp32=0.0201)
    choice = choose_precision("auto", CPU)
    assert choice.precision == "fp32" and not choice.warning
    assert choice.message == (
        "precision auto -> fp32: this CPU has no native bf16 (AVX2);"
        " bf16 matmuls measured 25.8x slower than fp32"
    )


@pytest.mark.parametrize("cls", ["AMX", "AVX512-BF16", "Arm BF16"])
def test_auto_runs_bf16_where_it_is_native_and_measured_faster(monkeypatch, cls):
    fake_cpu(monkeypatch, cls, bf16=0.33, fp32=0.08)
    choice = choose_precision("auto", CPU)
    assert choice.precision == "bf16"
    assert choice.message == (
        f"precision auto -> bf16: this CPU has native bf16 ({cls});"
        " bf16 matmuls measured 4.1x faster than fp32"
    )


def test_auto_trusts_the_measurement_over_the_cpu_flags(monkeypatch):
    """A CPU that reports AVX-512-BF16 while oneDNN is kept off it (ONEDNN_MAX_CPU_ISA)
    computes bf16 slowly: the measured ratio decides."""
    fake_cpu(monkeypatch, "AVX512-BF16", bf16=0.002, fp32=0.08)
    choice = choose_precision("auto", CPU)
    assert choice.precision == "fp32"
    assert "reports native bf16 (AVX512-BF16) but bf16 matmuls measured 40.0x slower" in (
        choice.message
    )


def test_an_explicit_bf16_on_a_slow_cpu_runs_with_one_warning(monkeypatch):
    fake_cpu(monkeypatch, "AVX2", bf16=0.001, fp32=0.026)
    choice = choose_precision("bf16", CPU)
    assert choice.precision == "bf16" and choice.warning
    assert choice.message.startswith("warning: engine.precision=bf16 on a CPU without fast bf16")
    assert "bf16 matmuls measured 26.0x slower than fp32" in choice.message


def test_an_explicit_choice_that_suits_says_nothing_and_fp32_measures_nothing(monkeypatch):
    measured = fake_cpu(monkeypatch, "AMX", bf16=0.5, fp32=0.1)
    assert choose_precision("bf16", CPU) == hardware.PrecisionChoice("bf16", None)
    measured.clear()
    assert choose_precision("fp32", CPU) == hardware.PrecisionChoice("fp32", None)
    assert measured == []


def test_the_cpu_class_follows_what_aten_dispatches_to(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine makes it an AVX2 machine to torch."""
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_class() == "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    flags = {"_is_amx_tile_supported": False, "_is_avx512_bf16_supported": True}
    monkeypatch.setattr(hardware, "_cpu_has", lambda probe: flags[probe])
    assert cpu_class() == "AVX512-BF16"
    flags["_is_amx_tile_supported"] = True
    assert cpu_class() == "AMX"
    flags.update(_is_amx_tile_supported=False, _is_avx512_bf16_supported=False)
    assert cpu_class() == "AVX512"


def test_the_peak_is_the_best_size_and_layout_not_the_largest_square(monkeypatch):
    """Where bf16 is emulated, small products run faster than large ones and a @ b.T (a
    linear layer's forward) much faster than a @ b: the peak is the best rate over sizes
    and layouts (a peak from a 1024-wide a @ b alone gave an MFU of 411 %)."""
    rates = {
        "nn": {128: 2.0, 256: 3.0, 512: 1.0, 1024: 0.5},
        "nt": {128: 8.0, 256: 15.0, 512: 20.0, 1024: 19.0},
        "tn": {128: 7.0, 256: 4.0, 512: 1.0, 1024: 1.0},
    }
    timed = []

    def rate(device, dtype, n, seconds, layout):
        timed.append((layout, n, seconds))
        again = seconds == hardware._RUN_SECONDS and timed.count((layout, n, seconds)) == 2
        return rates[layout][n] * (1.1 if again else 1.0)  # the second long run is best

    monkeypatch.setattr(hardware, "matmul_rate", rate)
    assert measure_peak(CPU, torch.bfloat16) == (pytest.approx(22.0), 512, "nt")
    scan, runs = hardware._SCAN_SECONDS, hardware._RUN_SECONDS
    assert timed == [
        *[("nn", n, scan) for n in (128, 256, 512)],  # 512 fell well below 256: stop
        *[("nt", n, scan) for n in (128, 256, 512, 1024)],
        *[("tn", n, scan) for n in (128, 256)],
        *[("nt", 512, runs)] * hardware._RUNS_AT_BEST,
    ]


def test_a_peak_is_a_real_measurement(monkeypatch):
    monkeypatch.setattr(hardware, "_SCAN_SECONDS", 0.01)
    monkeypatch.setattr(hardware, "_RUN_SECONDS", 0.02)
    tflops, size, layout = measure_peak(CPU, torch.float32)
    assert 1e-4 < tflops < 100  # TFLOP/s: any CPU lies between
    assert size in hardware._CPU_SIZES and layout in hardware._LAYOUTS
    # At least what one timed product reaches: the peak is the best of them.
    assert tflops >= 0.5 * hardware.matmul_rate(CPU, torch.float32, 256, 0.05, "nt")


def test_peaks_are_measured_once_per_host_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def measure(device, dtype):
        calls.append(dtype)
        return 0.25, 512, "nt"

    monkeypatch.setattr(hardware, "measure_peak", measure)
    first = cached_peak(CPU, "fp32")
    assert first == Peak(0.25, "fp32", 512, "nt", cached=False) and len(calls) == 1
    again = cached_peak(CPU, "fp32")
    assert again == Peak(0.25, "fp32", 512, "nt", cached=True) and len(calls) == 1
    assert hardware.cache_file().parent == tmp_path / "pretrain"
    cached_peak(CPU, "bf16")  # another dtype is another measurement
    assert calls == [torch.float32, torch.bfloat16]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(old + 1)  # another thread count too
        cached_peak(CPU, "fp32")
    finally:
        torch.set_num_threads(old)
    assert len(calls) == 3
    keys = json.loads(hardware.cache_file().read_text())
    assert len(keys) == 3 and all("cpu (" in key for key in keys)


def test_an_unreadable_cache_is_measured_again_and_rewritten(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hardware, "measure_peak", lambda device, dtype: (0.5, 256, "nn"))
    hardware.cache_file().parent.mkdir(parents=True)
    hardware.cache_file().write_text("{half a file")
    assert cached_peak(CPU, "fp32").cached is False
    assert cached_peak(CPU, "fp32").cached is True

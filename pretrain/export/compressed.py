"""Post-training compression of a trained model for inference: dynamic int8 linears, and
magnitude pruning.

An int8 folder is laid out like the native export:

model.safetensors   the native state dict, except that each quantized linear's `X.weight` is
                    `X.weight_int8` (int8, out x in) and `X.weight_scale` (fp32, one per row)
config.json         {"format": INT8_FORMAT, "model": <ModelConfig>, "compression": {...}}
tokenizer/          the tokenizer folder of the source

A pruned model is a plain native export (dense storage) whose config.json also carries
"compression": every reader of native exports loads it.

A shared parameter set is one module used by many layers, so it is quantized or pruned
once, and stored once.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as QLinear

from pretrain.config import ModelConfig, from_dict, to_dict
from pretrain.errors import UserError
from pretrain.export.native import CONFIG, TOKENIZER, WEIGHTS, check_state, save_native
from pretrain.model import SharedTransformer
from pretrain.model.heads import CausalLMHead
from pretrain.model.relaxed import LowRankDelta

INT8_FORMAT = "pretrain-int8/1"
INT8, SCALE = "weight_int8", "weight_scale"


@contextmanager
def _quantized_tensors() -> Iterator[None]:
    """torch 2.13 deprecates creating qint8 tensors, which the dynamic int8 Linear still
    packs its weights from: silence that one warning while we build them."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel"
        )
        yield


# -- which linears --------------------------------------------------------------------------


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every distinct nn.Linear by its first (state dict) name: a shared one appears once."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _read_as_weights(model: SharedTransformer) -> set[int]:
    """ids of the linears whose weight the model also reads as a tensor, which a quantized
    module no longer has: the relaxed deltas (their tie penalty) and, for a head tied
    through the embedding projection (llama), that projection."""
    read = {id(lin) for m in model.modules() if isinstance(m, LowRankDelta) for lin in m.children()}
    if isinstance(model.head, CausalLMHead) and model.embeddings.project is not None:
        read.add(id(model.embeddings.project))
    return read


def quantizable(model: SharedTransformer) -> dict[str, nn.Linear]:
    """The linears `quantize_int8` replaces, by name."""
    skip = _read_as_weights(model)
    return {name: m for name, m in linear_modules(model).items() if id(m) not in skip}


def _replace(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Put `new[id(old)]` wherever the module `old` is registered (under every name)."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in new:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new[id(module)])


# -- int8 -------------------------------------------------------------------------------------


def _row_scales(weight_OI: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row scales (O,) in fp32: absmax / 127 (a zero row keeps a tiny scale)."""
    absmax_O = weight_OI.detach().float().abs().amax(dim=1)
    return absmax_O.clamp_min(torch.finfo(torch.float32).tiny) / 127.0


def _qweight(int8_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
    """The per-row qint8 tensor of stored int8 values and fp32 scales, bit for bit."""
    zeros_O = torch.zeros(scale_O.shape, dtype=torch.long)
    with _quantized_tensors():
        return torch._make_per_channel_quantized_tensor(int8_OI, scale_O.double(), zeros_O, 0)


def _qlinear(qweight_OI: torch.Tensor, bias_O: torch.Tensor | None) -> QLinear:
    out_features, in_features = qweight_OI.shape
    with _quantized_tensors():
        qlinear = QLinear(in_features, out_features, bias_=bias_O is not None, dtype=torch.qint8)
        qlinear.set_weight_bias(qweight_OI, None if bias_O is None else bias_O.detach().float())
    return qlinear


def _quantize_linear(linear: nn.Linear) -> QLinear:
    weight_OI = linear.weight.detach().float()
    # fp32 scales, exact in the float64 the quantizer keeps: the file stores them losslessly.
    scale_O = _row_scales(weight_OI)
    zeros_O = torch.zeros(scale_O.shape, dtype=torch.long)
    with _quantized_tensors():
        qweight_OI = torch.quantize_per_channel(
            weight_OI, scale_O.double(), zeros_O, 0, torch.qint8
        )
    return _qlinear(qweight_OI, linear.bias)


def quantize_int8(model: SharedTransformer) -> int:
    """Replace the model's linears in place by dynamic int8 ones (per-row symmetric qint8
    weights, fp32 activations); returns how many distinct linears were quantized.

    Not quantized: the token table (the MLM head reads it as a weight), the relaxed deltas
    and llama's embedding projection (read as weights too); they stay fp32.
    """
    linears = quantizable(model)
    _replace(model, {id(lin): _quantize_linear(lin) for lin in linears.values()})
    return len(linears)


def _quantized(model: nn.Module) -> dict[str, QLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}


def int8_state(model: SharedTransformer) -> dict[str, torch.Tensor]:
    """The tensors an int8 folder stores: the native state dict with each quantized
    `X.weight` as `X.weight_int8` and `X.weight_scale`."""
    quantized = _quantized(model)
    prefixes = tuple(f"{name}." for name in quantized)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, qlinear in quantized.items():
        qweight_OI = qlinear.weight()
        state[f"{name}.{INT8}"] = qweight_OI.int_repr()
        state[f"{name}.{SCALE}"] = qweight_OI.q_per_channel_scales().float()
        if qlinear.bias() is not None:
            state[f"{name}.bias"] = qlinear.bias()
    return state


def check_output(output: Path) -> None:
    """A compressed model goes to a new (or empty) folder, never over another."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output {output} is not empty; choose a new folder")


def write_folder(output: str | Path, write: Callable[[Path], None]) -> None:
    """Run `write(folder)` on a new folder beside `output`, then rename it to `output`:
    on any error nothing is left at `output`. Refuses an `output` that is not empty."""
    output = Path(output)
    check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        write(staging)
        if output.exists():
            output.rmdir()  # empty, checked above
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_int8(
    model: SharedTransformer,
    cfg: ModelConfig,
    tokenizer_dir: str | Path | None,
    output: str | Path,
    source: str | None = None,
) -> None:
    """Write a model quantized by `quantize_int8` as an int8 folder (see the module doc)."""
    state = int8_state(model)
    compression = {"method": "int8", "source": source, "quantized_linears": len(_quantized(model))}
    meta = {"format": INT8_FORMAT, "model": to_dict(cfg), "compression": compression}

    def write(folder: Path) -> None:
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, str(folder / WEIGHTS), {"format": INT8_FORMAT})
        (folder / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, folder / TOKENIZER)

    write_folder(output, write)


def _meta(path: Path) -> dict | None:
    try:
        return json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return None


def is_int8(path: str | Path) -> bool:
    """Whether `path` is an int8 folder (its config.json says INT8_FORMAT)."""
    meta = _meta(Path(path))
    return isinstance(meta, dict) and meta.get("format") == INT8_FORMAT


def _check_int8_state(
    state: dict[str, torch.Tensor], model: SharedTransformer, where: Path
) -> None:
    """The file must hold what `save_int8` writes for the fp32 `model` of its config."""
    int8_names = {k.removesuffix(f".{INT8}") for k in state if k.endswith(f".{INT8}")}
    if int8_names != set(quantizable(model)):
        odd = sorted(int8_names ^ set(quantizable(model)))[0]
        raise UserError(f"the weights of {where} do not match int8 linears of its config: {odd}")
    for name in int8_names:
        if state.get(f"{name}.{SCALE}", torch.empty(0)).shape != state[f"{name}.{INT8}"].shape[:1]:
            raise UserError(f"{where}: {name}.{SCALE} must hold one scale per row")
    # With the int8 values in place of the weights the rest is a native state dict.
    renamed = {k.replace(f".{INT8}", ".weight"): v for k, v in state.items()}
    check_state({k: v for k, v in renamed.items() if not k.endswith(SCALE)}, model, str(where))


def load_int8(path: str | Path) -> SharedTransformer:
    """An int8 folder as a model in eval mode, its quantized linears exactly those saved."""
    path = Path(path)
    if not is_int8(path):
        raise UserError(f"{path} is not an int8 export ({CONFIG} with format {INT8_FORMAT!r})")
    cfg = from_dict(ModelConfig, _meta(path)["model"], "model")
    model = SharedTransformer(cfg)
    state = load_file(str(path / WEIGHTS))
    _check_int8_state(state, model, path)
    linears = quantizable(model)
    rest = {k: v for k, v in state.items() if not k.endswith((INT8, SCALE))}
    model.load_state_dict(rest, strict=False)  # only the quantized weights are missing
    new = {
        id(lin): _qlinear(_qweight(state[f"{name}.{INT8}"], state[f"{name}.{SCALE}"]), lin.bias)
        for name, lin in linears.items()
    }
    _replace(model, new)
    return model.eval()


# -- pruning ----------------------------------------------------------------------------------


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {sparsity}: e.g. --sparsity 0.5")


def _prune_tensor(weight: torch.Tensor, sparsity: float) -> int:
    """Zero the round(sparsity * numel) smallest-magnitude entries of `weight` in place
    (exactly that many: ties at the threshold are broken by position); returns its zeros."""
    flat = weight.detach().view(-1)
    smallest = flat.abs().argsort(stable=True)[: round(sparsity * flat.numel())]
    flat[smallest] = 0.0
    return int((flat == 0).sum())


@torch.no_grad()
def prune(model: SharedTransformer, sparsity: float) -> dict:
    """Magnitude-prune every distinct linear weight of `model` in place to `sparsity` (per
    tensor, so over the pruned tensors it holds to rounding). A shared set's weights are
    one tensor, pruned once; biases, norms and embeddings are left as they are.

    Returns what was pruned: tensor names, entries, zeros and the sparsity reached."""
    check_sparsity(sparsity)
    if any(isinstance(m, QLinear) for m in model.modules()):
        raise UserError("the model is int8: prune the fp32 model, then quantize it")
    weights = {}  # id -> (name, tensor): a weight two modules hold is pruned once
    for name, linear in linear_modules(model).items():
        weights.setdefault(id(linear.weight), (f"{name}.weight", linear.weight))
    zeros = sum(_prune_tensor(w, sparsity) for _, w in weights.values())
    numel = sum(w.numel() for _, w in weights.values())
    return {
        "sparsity": sparsity,
        "achieved": zeros / numel if numel else 0.0,
        "zeros": zeros,
        "numel": numel,
        "tensors": [name for name, _ in weights.values()],
    }


def save_pruned(
    model: SharedTransformer,
    tokenizer_dir: str | Path | None,
    output: str | Path,
    compression: dict,
) -> None:
    """A native export of `model` (dense storage) whose config.json also says how it was
    compressed; readers of native exports ignore the extra key."""

    def write(folder: Path) -> None:
        save_native(model.state_dict(), model.cfg, tokenizer_dir, folder)
        meta = json.loads((folder / CONFIG).read_text()) | {"compression": compression}
        (folder / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    write_folder(output, write)

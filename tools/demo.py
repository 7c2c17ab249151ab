"""`make demo`: what the stack can do so far, end to end on CPU.

Prints the accounting of every preset in configs/, then builds the tiny ALBERT and tiny
llama models, exports them to Hugging Face classes through the state-dict adapters and
prints the largest logit difference (fp32).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.export import hf_albert, hf_llama
from pretrain.model import SharedTransformer
from pretrain.summary import account

REPO = Path(__file__).resolve().parents[1]


def presets() -> None:
    print(
        f"{'config':<22}{'family':<8}{'sharing':<16}{'unique':>14}{'effective':>15}{'GFLOP/tok':>11}"
    )
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        s = cfg.model.sharing
        plan = s.strategy + (f" M={s.num_sets}" if s.num_sets else "")
        plan += " +ACT" if cfg.model.universal.enabled else ""
        acc = account(cfg)
        print(
            f"{path.name:<22}{cfg.model.family:<8}{plan:<16}{acc.unique_params:>14,}"
            f"{acc.effective_params:>15,}{acc.flops_per_token / 1e9:>11.3f}"
        )


def export_check(name: str) -> None:
    import transformers

    cfg = load_config(REPO / "configs" / name).model
    torch.manual_seed(0)
    ours = SharedTransformer(cfg).eval()
    ids = torch.randint(1, cfg.vocab_size, (2, 32))
    if cfg.family == "albert":
        hf_cfg = transformers.AlbertConfig(**hf_albert.config_to_hf(cfg))
        hf = transformers.AlbertForPreTraining(hf_cfg).eval()
        hf.load_state_dict(hf_albert.to_hf(ours.state_dict(), cfg))
        with torch.no_grad():
            diff = (hf(input_ids=ids).prediction_logits - ours(ids).logits).abs().max()
        what = f"AlbertForPreTraining, {hf_cfg.num_hidden_groups} group(s)"
    else:
        hf_cfg = transformers.LlamaConfig(**hf_llama.config_to_hf(cfg))
        hf = transformers.LlamaForCausalLM(hf_cfg).eval()
        hf.load_state_dict(hf_llama.to_hf(ours.state_dict(), cfg))
        with torch.no_grad():
            diff = (hf(input_ids=ids).logits - ours(ids).logits).abs().max()
        what = f"LlamaForCausalLM, {hf_cfg.num_hidden_layers} layers unrolled"
    print(f"{name:<22}-> {what}: max |logit diff| = {diff.item():.2e}")


def main() -> int:
    print("== Presets: unique vs effective parameters, training FLOPs per token")
    presets()
    print("\n== Export to Hugging Face and compare logits (fp32)")
    for name in ("tiny-albert.yaml", "tiny-llama.yaml"):
        export_check(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

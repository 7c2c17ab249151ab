"""Parameter and FLOP accounting of a config, without allocating its weights.

python -m pretrain.summary configs/albert-base.yaml [--model.num_layers=24] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from pretrain.config import Config, load_config
from pretrain.errors import main_guard
from pretrain.model.accounting import Accounting, account
from pretrain.sharing import SharingPlan


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_table(cfg: Config, acc: Accounting) -> str:
    m = cfg.model
    plan = SharingPlan.from_config(m).description
    lines = [
        f"family {m.family}  L={m.num_layers} H={m.hidden_size} E={m.embedding_size}"
        f" V={m.vocab_size} heads={m.num_heads}  sharing: {plan}"
        + ("  universal (ACT, counted at max steps)" if m.universal.enabled else ""),
        f"{'component':<20}{'unique':>14}{'effective':>14}{'FLOPs/token':>14}",
    ]
    for c in acc.components:
        lines.append(
            f"{c.name:<20}{c.unique_params:>14,}{c.effective_params:>14,}"
            f"{_human(c.flops_per_token):>14}"
        )
    lines.append(
        f"{'total':<20}{acc.unique_params:>14,}{acc.effective_params:>14,}"
        f"{_human(acc.flops_per_token):>14}"
    )
    ratio = acc.effective_params / acc.unique_params
    lines.append(
        f"effective / unique = {ratio:.2f}x; FLOPs per token are forward + backward at"
        f" seq_length {acc.seq_length}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.summary",
        description="Unique and effective parameters and FLOPs per token of a config.",
    )
    parser.add_argument("config", help="YAML config, e.g. configs/albert-base.yaml")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    acc = account(cfg)
    print(json.dumps(acc.to_dict()) if args.json else format_table(cfg, acc))
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))

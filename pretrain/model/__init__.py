"""Pure PyTorch model code: no deepspeed, no torch.distributed."""

from pretrain.model.accounting import Accounting, count
from pretrain.model.sharing import STRATEGIES, SharingPlan
from pretrain.model.transformer import ModelOutput, SharedTransformer

__all__ = [
    "STRATEGIES",
    "Accounting",
    "ModelOutput",
    "SharedTransformer",
    "SharingPlan",
    "count",
]

"""Pure PyTorch model code: no deepspeed, no torch.distributed."""

from pretrain.model.accounting import Accounting, count
from pretrain.model.transformer import ModelOutput, SharedTransformer
from pretrain.sharing import STRATEGIES, SharingPlan

__all__ = [
    "STRATEGIES",
    "Accounting",
    "ModelOutput",
    "SharedTransformer",
    "SharingPlan",
    "count",
]

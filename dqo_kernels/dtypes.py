"""The compute dtype shared by every op and backend of the library."""
from __future__ import annotations

from typing import Optional

import torch


def acc_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any of ``tensors`` is float64, else float32: half inputs are read as they
    are and computed in fp32. ``None`` entries (optional inputs) are ignored."""
    if any(x is not None and x.dtype == torch.float64 for x in tensors):
        return torch.float64
    return torch.float32

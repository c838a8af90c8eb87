"""dqo-kernels: fused kernels for Direct Q-function Optimization (DQO) and its relatives.

>>> from dqo_kernels import fused_dqo_loss
"""
from .aggregation import LOSS_AGGS, row_scale
from .alignment import (
    action_logprobs,
    action_logprobs_from_logits,
    action_targets,
    response_mask,
    to_actions,
)
from .backends import BACKENDS, resolve_backend
from .dqo_loss import DQOLossOutput, dro_loss, fused_dqo_loss
from .dqo_scan_reference import dqo_scan_reference
from .logprobs import linear_logprobs, token_logprobs
from .logprobs_cpp import empty_cache
from .logprobs_reference import linear_logprobs_reference, token_logprobs_reference
from .validation import set_data_checks

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DQOLossOutput",
    "LOSS_AGGS",
    "action_logprobs",
    "action_logprobs_from_logits",
    "action_targets",
    "dqo_scan_reference",
    "dro_loss",
    "empty_cache",
    "fused_dqo_loss",
    "linear_logprobs",
    "linear_logprobs_reference",
    "resolve_backend",
    "response_mask",
    "row_scale",
    "set_data_checks",
    "to_actions",
    "token_logprobs",
    "token_logprobs_reference",
]

"""dqo-kernels: fused kernels for Direct Q-function Optimization (DQO) and its relatives.

>>> from dqo_kernels import fused_dqo_loss

One package per op, ``dqo_loss/`` and ``logprobs/``, whose modules mean the same in both:
``naive`` (the materialising definition: the tests' oracle, and the DQO loss's backend
``"torch"``), ``chunked`` (memory-bounded PyTorch: the log-probs' backend ``"torch"``),
``triton``, and ``cpp`` (launchers of the native CPU kernels of ``csrc/``, which ``_native/``
builds and loads); :func:`resolve_backend` picks one for every op.
"""
from .alignment import (
    action_logprobs,
    action_logprobs_from_logits,
    action_targets,
    packed_response_mask,
    response_mask,
    to_actions,
)
from .backends import BACKENDS, resolve_backend
from .dqo_loss import DQOLossOutput, dro_loss, fused_dqo_loss
from .dqo_loss.aggregation import LOSS_AGGS, row_scale
from .dqo_loss.naive import dqo_scan_reference
from .logprobs import linear_logprobs, token_logprobs
from .logprobs.cpu_pool import empty_cache
from .logprobs.naive import linear_logprobs_reference, token_logprobs_reference
from .packing import cu_seqlens_from_lengths, position_ids
from .validation import check_pending, set_data_checks

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "check_pending",
    "cu_seqlens_from_lengths",
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
    "packed_response_mask",
    "position_ids",
    "resolve_backend",
    "response_mask",
    "row_scale",
    "set_data_checks",
    "to_actions",
    "token_logprobs",
    "token_logprobs_reference",
]

"""From a causal LM's batch to the ``[B, T]`` action-aligned tensors of :func:`fused_dqo_loss`
(SPEC section 2): what every integration otherwise writes by hand, and gets wrong silently.

Position t of every ``[B, T]`` tensor is the action ``input_ids[b, t]`` taken in the state
``input_ids[b, :t]``. A causal LM's output at position t - 1 is about that action, so log-probs
and values are the model's outputs shifted right by one, with column 0 (never an action) zero::

    mask = response_mask(attention_mask, prompt_lengths)          # [B, T] bool
    hidden = model.model(input_ids, attention_mask=...).last_hidden_state
    logp = action_logprobs(hidden, model.lm_head.weight, input_ids, mask)   # [B, T]
    values = to_actions(value_head(hidden[:, :-1]).squeeze(-1))             # [B, T]

Left and right padding both work: positions are counted in real tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

from .logprobs import linear_logprobs, token_logprobs


def response_mask(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool, True on the response tokens (the actions): the real tokens (attention
    mask 1) after each row's first ``prompt_lengths[b]`` real tokens. Left or right padded."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected [B, T], got shape "
                         f"{tuple(attention_mask.shape)}")
    prompt_lengths = torch.as_tensor(prompt_lengths, device=attention_mask.device)
    if prompt_lengths.shape != attention_mask.shape[:1]:
        raise ValueError(f"prompt_lengths: expected shape ({attention_mask.shape[0]},), got "
                         f"{tuple(prompt_lengths.shape)}")
    real = attention_mask.bool()
    position = real.long().cumsum(-1) - 1  # index among the real tokens
    return real & (position >= prompt_lengths[:, None])


def action_targets(input_ids: torch.Tensor, mask: torch.Tensor,
                   ignore_index: int = -100) -> torch.Tensor:
    """``[B, T - 1]`` targets for the model's outputs at positions 0..T-2: the next token where
    it is an action, ``ignore_index`` elsewhere."""
    if input_ids.shape != mask.shape:
        raise ValueError(f"mask: expected shape {tuple(input_ids.shape)} (input_ids'), got "
                         f"{tuple(mask.shape)}")
    return input_ids[:, 1:].masked_fill(~mask[:, 1:].bool(), ignore_index)


def to_actions(x: torch.Tensor) -> torch.Tensor:
    """``[B, T - 1]`` outputs of positions 0..T-2 -> ``[B, T]`` on the action positions (column 0,
    never an action, is 0)."""
    return torch.nn.functional.pad(x, (1, 0))


def action_logprobs(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                    mask: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                    temperature: float = 1.0, backend: Optional[str] = None) -> torch.Tensor:
    """``[B, T]`` fp32 log-probs of the taken tokens on action positions (0 elsewhere), straight
    from the last hidden states ``[B, T, D]`` and the lm_head weight ``[V, D]`` (no ``[B, T, V]``
    logits): :func:`linear_logprobs` on the shifted targets."""
    logp = linear_logprobs(hidden[:, :-1], weight, action_targets(input_ids, mask), bias=bias,
                           temperature=temperature, backend=backend)
    return to_actions(logp)


def action_logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor,
                                mask: torch.Tensor, *, temperature: float = 1.0,
                                backend: Optional[str] = None) -> torch.Tensor:
    """The same from ``[B, T, V]`` logits (models whose logits are not linear in the hidden
    state, such as Gemma's soft-capped ones)."""
    return to_actions(token_logprobs(logits[:, :-1], action_targets(input_ids, mask),
                                     temperature=temperature, backend=backend))

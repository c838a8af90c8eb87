"""From a causal LM's batch to the ``[B, T]`` action-aligned tensors of :func:`fused_dqo_loss`
(docs/math.md §2): what every integration otherwise writes by hand, and gets wrong silently.

Position t of every ``[B, T]`` tensor is the action ``input_ids[b, t]`` taken in the state
``input_ids[b, :t]``. A causal LM's output at position t - 1 is about that action, so log-probs
and values are the model's outputs shifted right by one, with column 0 (never an action) zero::

    mask = response_mask(attention_mask, prompt_lengths)          # [B, T] bool
    hidden = model.model(input_ids, attention_mask=...).last_hidden_state
    logp = action_logprobs(hidden, model.lm_head.weight, input_ids, mask)   # [B, T]
    values = to_actions(value_head(hidden[:, :-1]).squeeze(-1))             # [B, T]

Left and right padding both work: positions are counted in real tokens. Packed rows (several
sequences end to end, :mod:`dqo_kernels.packing`) work too: give ``cu_seqlens`` and the
model ``position_ids(cu_seqlens)``; the output at a sequence's last token then predicts the next
sequence's first token, which is never an action (it has no state), so nothing crosses a
boundary (:func:`packed_response_mask` builds such a mask; the helpers check a given one).
"""
from __future__ import annotations

from typing import Optional

import torch

from .logprobs import linear_logprobs, token_logprobs
from .packing import check_cu_seqlens
from .validation import check_token_ids


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


def packed_response_mask(cu_seqlens: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """``[1, N]`` bool for packed sequences: True on the positions of sequence s after its
    first ``prompt_lengths[s]`` tokens."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64)
    prompt_lengths = torch.as_tensor(prompt_lengths, device=cu.device)
    if prompt_lengths.shape != (cu.numel() - 1,):
        raise ValueError(f"prompt_lengths: expected shape ({cu.numel() - 1},) (one a sequence of "
                         f"cu_seqlens), got {tuple(prompt_lengths.shape)}")
    lengths = cu[1:] - cu[:-1]
    n = int(cu[-1])
    offset = torch.arange(n, device=cu.device) - torch.repeat_interleave(cu[:-1], lengths)
    return (offset >= torch.repeat_interleave(prompt_lengths, lengths))[None]


def check_packed_mask(mask: torch.Tensor, cu_seqlens) -> None:
    """A ValueError if a packed sequence's first position is marked an action: its output row
    is the previous sequence's last one, so its log-prob would be read across the boundary."""
    cu = check_cu_seqlens(cu_seqlens, mask.numel(), mask.device)
    nonempty = torch.nonzero(cu[1:] > cu[:-1]).flatten()  # an empty sequence has no start
    bad = mask.reshape(-1)[cu[nonempty]].bool()
    if bool(bad.any()):
        s = int(nonempty[bad.nonzero()[0]])
        raise ValueError(f"mask: the first position of packed sequence {s} (flat position "
                         f"{int(cu[s])}) is marked an action; a sequence's first token has no "
                         f"state to act in (mark it 0, as packed_response_mask does)")


def action_targets(input_ids: torch.Tensor, mask: torch.Tensor,
                   ignore_index: int = -100) -> torch.Tensor:
    """``[B, T - 1]`` targets for the model's outputs at positions 0..T-2: the next token where
    it is an action, ``ignore_index`` elsewhere."""
    if input_ids.shape != mask.shape:
        raise ValueError(f"mask: expected shape {tuple(input_ids.shape)} (input_ids'), got "
                         f"{tuple(mask.shape)}")
    check_token_ids("input_ids", input_ids)  # before ignore_index is written into them
    return input_ids[:, 1:].masked_fill(~mask[:, 1:].bool(), ignore_index)


def to_actions(x: torch.Tensor) -> torch.Tensor:
    """``[B, T - 1]`` outputs of positions 0..T-2 -> ``[B, T]`` on the action positions (column 0,
    never an action, is 0)."""
    return torch.nn.functional.pad(x, (1, 0))


def action_rows(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices into the ``[B * T]`` positions of the outputs that predict an action: row
    ``b * T + t - 1`` for every action ``(b, t)`` (the output at t - 1 is about token t)."""
    B, T = mask.shape
    b, t = mask[:, 1:].bool().nonzero(as_tuple=True)
    return b * T + t


def _scatter_actions(values: torch.Tensor, rows: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Per-action ``values`` [N] at flat output rows ``rows`` -> ``[B, T]`` on the action
    positions (the output row ``b * T + t - 1`` is action t's), 0 elsewhere."""
    out = values.new_zeros(B * T).index_put((rows + 1,), values)
    return out.view(B, T)


def action_logprobs(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                    mask: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                    temperature: float = 1.0, cu_seqlens: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``[B, T]`` fp32 log-probs of the taken tokens on action positions (0 elsewhere), straight
    from the last hidden states ``[B, T, D]`` and the lm_head weight ``[V, D]`` (no ``[B, T, V]``
    logits): :func:`linear_logprobs` on the hidden rows that predict an action only, so the
    head's time and memory follow the action tokens, not the prompt and padding positions.
    ``cu_seqlens``: packed rows, checked for actions at sequence starts."""
    if input_ids.shape != mask.shape or hidden.shape[:2] != mask.shape:
        raise ValueError(f"mask: expected the shape of input_ids and of hidden's first two "
                         f"dimensions, got mask {tuple(mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}, hidden {tuple(hidden.shape)}")
    check_token_ids("input_ids", input_ids)
    if cu_seqlens is not None:
        check_packed_mask(mask, cu_seqlens)
    B, T = mask.shape
    rows = action_rows(mask)
    # row r predicts token r + 1 of the flattened batch (never across rows: t - 1 < T - 1)
    targets = input_ids.reshape(-1)[rows + 1]
    h = hidden.reshape(B * T, hidden.shape[-1]).index_select(0, rows)
    logp = linear_logprobs(h, weight, targets, bias=bias, temperature=temperature,
                           backend=backend)
    return _scatter_actions(logp, rows, B, T)


def action_logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor,
                                mask: torch.Tensor, *, temperature: float = 1.0,
                                cu_seqlens: Optional[torch.Tensor] = None,
                                backend: Optional[str] = None) -> torch.Tensor:
    """The same from ``[B, T, V]`` logits (models whose logits are not linear in the hidden
    state, such as Gemma's soft-capped ones): the targets are shifted instead of the logits,
    so that no ``[B, T - 1, V]`` copy of the logits is made; rows without an action target
    are ignored. ``cu_seqlens``: packed rows, as :func:`action_logprobs`."""
    if cu_seqlens is not None:
        check_packed_mask(mask, cu_seqlens)
    targets = torch.nn.functional.pad(action_targets(input_ids, mask), (0, 1), value=-100)
    logp = token_logprobs(logits, targets, temperature=temperature, backend=backend)
    return to_actions(logp[:, :-1])

"""What every algorithm is, and the pieces they share.

An algorithm says which examples it trains on (``items``), how they batch (``collate``),
whether it needs a value model and reference log-probs, what it prepares before the first
update (``setup``) and what one micro-batch does (``step``), which returns its statistics;
``num_tokens`` weights them. Each is registered under its name and built from the run's
config by :func:`make`, taking only the options it uses.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Type

import torch

from ..data import Batch, Example, collate

REGISTRY: Dict[str, Type["Algorithm"]] = {}


def register(name: str) -> Callable[[Type["Algorithm"]], Type["Algorithm"]]:
    """Class decorator: the algorithm ``--algo name`` runs."""
    def wrap(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return wrap


class Algorithm:
    name: str = ""
    needs_value: bool = False  # trains a value model beside the policy
    needs_ref: bool = False  # needs the reference policy's log-probs of the examples

    @classmethod
    def from_config(cls, cfg) -> "Algorithm":
        """The algorithm with the options it uses from ``cfg`` (a :class:`TrainConfig`)."""
        return cls()

    def items(self, examples: List[Example], seed: int = 0) -> List:
        """What one training item is (an example; a pair for DPO and KTO)."""
        return list(examples)

    def collate(self, chunk: Sequence, pad_id: int, padding: str = "right") -> Batch:
        return collate(chunk, pad_id, padding=padding)

    @staticmethod
    def length(item) -> int:
        """Tokens of an item's longest row (what --group-by-length orders by)."""
        return max(len(x) for x in item) if isinstance(item, tuple) else len(item)

    def setup(self, items: List, policy, pad_id: int, cache_dir: str) -> None:
        """Work before the first update, while ``policy`` is still the reference."""

    def step(self, engines, b: Batch, num_tokens) -> Dict[str, float]:
        """One micro-batch: forward, loss, each engine's backward and step; its statistics."""
        raise NotImplementedError


def policy_logp(engines, b: Batch) -> torch.Tensor:
    # Through the engine (a PolicyLogprobs module), so that ZeRO-3 gathers the parameters.
    return engines["policy"](b.input_ids, b.attention_mask, b.action_mask)


def backward_and_step(engines, losses: Dict[str, torch.Tensor]) -> None:
    for name, loss in losses.items():
        engines[name].backward(loss)
    for engine in engines.values():
        engine.step()


def last_action(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last action position (rows have at least one)."""
    T = mask.shape[-1]
    return T - 1 - mask.flip(-1).float().argmax(-1)


def values_and_bootstrap(engines, b: Batch):
    """``values`` [B, T] and, if the batch has unfinished responses, ``bootstrap`` [B]: V of
    the state after an unfinished response's last token (stop-gradient), 0 for a finished one
    (docs/math.md §2: the return of a response cut at the length limit bootstraps from it)."""
    if b.unfinished is None or not bool(b.unfinished.any()):
        return engines["value"](b.input_ids, b.attention_mask), None
    values, after = engines["value"](b.input_ids, b.attention_mask, with_after=True)
    last = last_action(b.action_mask)
    boot = after[torch.arange(len(last), device=last.device), last].detach()
    return values, torch.where(b.unfinished, boot, torch.zeros_like(boot))


def non_finite(*xs: Optional[torch.Tensor], mask: Optional[torch.Tensor] = None) -> bool:
    return any(not bool(torch.isfinite(x if mask is None else x[mask]).all())
               for x in xs if x is not None)


def skip_with_nan_gradients(engines, **tensors) -> Dict[str, float]:
    """Model outputs that are not finite (a diverged model, an overflow in bf16): the loss
    would refuse them, so back-propagate NaN instead. Every parameter they depend on gets a NaN
    gradient, every engine's finite-gradient check then skips the step, and every rank still
    runs the same backward (DeepSpeed's gradient hooks stay in step). An engine that cannot
    skip a step (DeepSpeed without ZeRO in fp32) would apply the NaN: that is an error."""
    blind = [n for n, e in engines.items() if not getattr(e, "skips_non_finite", True)]
    if blind:
        raise RuntimeError(f"non-finite model outputs, and the {', '.join(blind)} engine "
                           f"cannot skip a step (DeepSpeed ZeRO-0 in fp32 checks no gradient); "
                           f"use --zero-stage 1 or more")
    for name, x in tensors.items():
        engines[name].backward(x.sum() * float("nan"))
    for engine in engines.values():
        engine.step()
    nan = float("nan")
    return dict(loss=nan, policy_loss=nan, value_loss=nan, num_tokens=0.0)

"""The algorithms the trainer runs on the same offline samples (paper appendix A):

- ``dqo``: token-level soft Q-learning with lambda-returns and importance sampling (ours);
- ``dro``: the sequence-level special case (one action per response), policy + value;
- ``sft``: the examples' responses as targets (give reference solutions);
- ``rs``:  rejection sampling: SFT on the correct samples;
- ``dpo``: pairs of a correct and an incorrect sample of a prompt (at most 12 a prompt);
- ``kto``: every sample, label = correctness (the outcome reward, never process rewards), as
  TRL's KTOTrainer: its reference point from mismatched (prompt, completion) pairs, the
  desirable weight by the KTO paper's ratio rule.

Responses cut at the length limit (``Example.finished`` False) bootstrap their return from the
value model in DQO and DRO, and are incorrect samples for RS, DPO and KTO: no algorithm sees a
token that was not generated.

Each algorithm says which examples it trains on (``items``), how they batch (``collate``),
whether it needs a value model and reference log-probs, and what one micro-batch does
(``micro_step``), which returns its statistics; ``num_tokens`` weights them.
"""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch

from dqo_kernels import dro_loss, fused_dqo_loss

from .data import Batch, Example, collate
from .losses import dpo_loss, kto_loss, kto_reference_point, sequence_sum, sft_loss

log = logging.getLogger(__name__)

ALGOS = ("dqo", "dro", "sft", "rs", "dpo", "kto")
NEEDS_VALUE = {"dqo", "dro"}
NEEDS_REF = {"dqo", "dro", "dpo", "kto"}


def mismatched(examples: Sequence[Example]) -> List[Example]:
    """For KTO's reference point: example i's prompt with another prompt's response. Examples
    are grouped by prompt and every response moves on by the largest group's size, so that it
    always lands on a different prompt (when there is more than one)."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].prompt)
    groups: Dict[str, int] = defaultdict(int)
    for e in examples:
        groups[e.prompt] += 1
    shift = max(groups.values()) if len(groups) > 1 else 1
    out: List[Optional[Example]] = [None] * len(examples)
    for k, i in enumerate(order):
        j = order[(k + shift) % len(order)]
        e, other = examples[i], examples[j]
        out[i] = Example(e.prompt_ids, other.response_ids, [0.0] * len(other.response_ids),
                         prompt=e.prompt, response=other.response,
                         source=f"{e.source} x {other.source}", finished=other.finished)
    same = sum(a.prompt == b.prompt for a, b in zip(examples, out))
    if same:  # one prompt holds more than half of the samples: not every pair can mismatch
        log.warning("KTO: %d of %d reference-point pairs share their prompt (one prompt has "
                    "more than half of the samples)", same, len(out))
    return out


def items(algo: str, examples: List[Example], seed: int = 0, max_pairs: int = 12) -> List:
    if algo == "kto":  # (example, its mismatched pair)
        return list(zip(examples, mismatched(examples)))
    if algo == "rs":
        return [e for e in examples if e.correct]
    if algo == "dpo":
        by_prompt: Dict[str, List[Example]] = defaultdict(list)
        for e in examples:
            by_prompt[e.prompt].append(e)
        rng = random.Random(seed)
        pairs = []
        for group in by_prompt.values():
            good = [e for e in group if e.correct]
            bad = [e for e in group if not e.correct]
            all_pairs = [(g, b) for g in good for b in bad]
            pairs += rng.sample(all_pairs, min(max_pairs, len(all_pairs)))
        return pairs
    if algo in ALGOS:
        return list(examples)
    raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}")


def collate_items(algo: str, chunk: Sequence, pad_id: int, padding: str = "right") -> Batch:
    if algo in ("dpo", "kto"):  # DPO: chosen rows, then rejected; KTO: rows, then KL pairs
        return collate([c for c, _ in chunk] + [r for _, r in chunk], pad_id, padding=padding)
    return collate(chunk, pad_id, padding=padding)


def _logp(engines, b: Batch) -> torch.Tensor:
    # Through the engine (a PolicyLogprobs module), so that ZeRO-3 gathers the parameters.
    return engines["policy"](b.input_ids, b.attention_mask, b.action_mask)


def _backward_and_step(engines, losses: Dict[str, torch.Tensor]) -> None:
    for name, loss in losses.items():
        engines[name].backward(loss)
    for engine in engines.values():
        engine.step()


def _values_and_bootstrap(engines, b: Batch):
    """``values`` [B, T] and, if the batch has unfinished responses, ``bootstrap`` [B]: V of
    the state after an unfinished response's last token (stop-gradient), 0 for a finished one
    (SPEC 2: the return of a response cut at the length limit bootstraps from it)."""
    if b.unfinished is None or not bool(b.unfinished.any()):
        return engines["value"](b.input_ids, b.attention_mask), None
    values, after = engines["value"](b.input_ids, b.attention_mask, with_after=True)
    last = last_action(b.action_mask)
    boot = after[torch.arange(len(last), device=last.device), last].detach()
    return values, torch.where(b.unfinished, boot, torch.zeros_like(boot))


def last_action(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last action position (rows have at least one)."""
    T = mask.shape[-1]
    return T - 1 - mask.flip(-1).float().argmax(-1)


def _non_finite(*xs: Optional[torch.Tensor], mask: Optional[torch.Tensor] = None) -> bool:
    return any(not bool(torch.isfinite(x if mask is None else x[mask]).all())
               for x in xs if x is not None)


def _skip_with_nan_gradients(engines, **tensors) -> Dict[str, float]:
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


def micro_step(algo: str, engines, b: Batch, args, num_tokens) -> Dict[str, float]:
    if algo == "dqo":
        logp = _logp(engines, b)
        values, bootstrap = _values_and_bootstrap(engines, b)
        if _non_finite(logp, values, mask=b.action_mask) or _non_finite(bootstrap):
            return _skip_with_nan_gradients(engines, policy=logp, value=values)
        out = fused_dqo_loss(
            logp, b.ref_logp, values, b.rewards, b.action_mask, behavior_logp=b.behavior_logp,
            bootstrap=bootstrap,
            beta=args.beta, lam=args.lam, gamma=args.gamma, is_clip=args.is_clip,
            is_policy=args.is_policy, is_value=args.is_value, target_grad=args.target_grad,
            loss_agg=args.loss_agg,
            num_tokens=num_tokens if args.loss_agg == "token-mean" else None)
        _backward_and_step(engines, {"policy": out.policy_loss, "value": out.value_loss})
        stats = {k: v.item() for k, v in out.metrics.items()}
        stats.update(policy_loss=out.policy_loss.item(), value_loss=out.value_loss.item())
        stats["loss"] = stats["policy_loss"] + stats["value_loss"]
        return stats
    if algo == "dro":
        logp = _logp(engines, b)
        values, bootstrap = _values_and_bootstrap(engines, b)
        if _non_finite(logp, values, mask=b.action_mask) or _non_finite(bootstrap):
            return _skip_with_nan_gradients(engines, policy=logp, value=values)
        first = b.action_mask.float().argmax(-1)  # V(prompt) = V at the first action
        rows = torch.arange(len(first), device=first.device)
        beh = None if b.behavior_logp is None else sequence_sum(b.behavior_logp, b.action_mask)
        ret = sequence_sum(b.rewards, b.action_mask)  # the one action's reward ...
        if bootstrap is not None:  # ... and, for a cut response, the value it stopped at
            ret = ret + bootstrap
        out = dro_loss(sequence_sum(logp, b.action_mask), sequence_sum(b.ref_logp, b.action_mask),
                       values[rows, first], ret,
                       behavior_logp=beh, beta=args.beta, is_clip=args.is_clip)
        _backward_and_step(engines, {"policy": out.policy_loss, "value": out.value_loss})
        return dict(loss=out.loss.item(), policy_loss=out.policy_loss.item(),
                    value_loss=out.value_loss.item(), kl=out.metrics["kl"].item(),
                    num_tokens=float(len(first)))
    if algo in ("sft", "rs"):
        loss = sft_loss(_logp(engines, b), b.action_mask)
        _backward_and_step(engines, {"policy": loss})
        return dict(loss=loss.item(), num_tokens=float(b.action_mask.sum()))
    if algo == "dpo":
        seq = sequence_sum(_logp(engines, b), b.action_mask)
        ref = sequence_sum(b.ref_logp, b.action_mask)
        P = seq.shape[0] // 2
        loss = dpo_loss(seq[:P], seq[P:], ref[:P], ref[P:], beta=args.beta)
        _backward_and_step(engines, {"policy": loss})
        margin = ((seq[:P] - ref[:P]) - (seq[P:] - ref[P:])).mean().item()
        return dict(loss=loss.item(), margin=margin, num_tokens=float(P))
    if algo == "kto":
        B = b.input_ids.shape[0] // 2
        rows, pairs = b.select(slice(0, B)), b.select(slice(B, None))
        m = rows.action_mask
        seq, ref = sequence_sum(_logp(engines, rows), m), sequence_sum(rows.ref_logp, m)
        with torch.no_grad():  # the reference point carries no gradient (TRL)
            kl = sequence_sum(_logp(engines, pairs), pairs.action_mask)
        z0 = kto_reference_point(kl, sequence_sum(pairs.ref_logp, pairs.action_mask))
        # the outcome label, not the summed reward: process rewards never make a failed
        # response desirable
        loss = kto_loss(seq, ref, rows.correct, z0, beta=args.beta,
                        lambda_d=args.kto_desirable_weight, lambda_u=args.kto_undesirable_weight)
        _backward_and_step(engines, {"policy": loss})
        return dict(loss=loss.item(), kl=z0.item(), num_tokens=float(B))
    raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}")

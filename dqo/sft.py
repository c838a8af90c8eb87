"""Supervised fine-tuning on (prompt, response) pairs: the warm-up of the embedded default."""
from __future__ import annotations

import logging
import random
from typing import Callable, Optional, Sequence, Tuple

import torch

from .data import collate, tokenize_row
from .losses import sft_loss
from .modeling import policy_logprobs
from .threads import adapt as adapt_threads

log = logging.getLogger(__name__)


def sft_train(model, tokenizer, pairs: Sequence[Tuple[str, str]], *, steps: int,
              lr: float = 1e-3, batch_size: int = 32, seed: int = 0,
              eval_fn: Optional[Callable[[], float]] = None, eval_every: int = 100,
              target: Optional[float] = None, progress: bool = True) -> int:
    """Train for at most ``steps`` steps; stop early once ``eval_fn() >= target``.
    Returns the number of steps taken."""
    examples = [tokenize_row(dict(prompt=p, response=r, reward=0.0), tokenizer) for p, r in pairs]
    rng = random.Random(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    it = range(1, steps + 1)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="sft warm-up", leave=False, disable=None)
    try:
        for step in it:
            adapt_threads()
            b = collate(rng.sample(examples, min(batch_size, len(examples))),
                        tokenizer.pad_token_id).to(device)
            loss = sft_loss(policy_logprobs(model, b.input_ids, b.attention_mask, b.action_mask),
                            b.action_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if eval_fn is not None and target is not None and step % eval_every == 0:
                score = eval_fn()
                log.info("sft step %d: loss %.3f, eval %.3f", step, loss.item(), score)
                model.train()
                if score >= target:
                    return step
        return steps
    finally:
        # the last step's gradients would otherwise ride into the next training's first step
        # (the model saved and loaded again has none: a resumed run would differ)
        opt.zero_grad(set_to_none=True)

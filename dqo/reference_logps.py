"""Reference log-probs, computed once over the dataset with the fused log-prob op and cached.

The cache file is keyed by a fingerprint of the reference model's weights and of the data, so
a changed model or dataset is recomputed and never silently reused.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .atomic import atomic_write
from .data import Example, collate
from .modeling import policy_logprobs

log = logging.getLogger(__name__)


def fingerprint(model, examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
        h.update(str(float(p.detach().float().sum())).encode())
    for e in examples:
        h.update(repr((e.prompt_ids, e.response_ids)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_ref_logps(model, examples: List[Example], pad_id: int, *, batch_size: int = 32,
                      cache_dir: Optional[str] = None) -> None:
    """Fill ``example.ref_logp`` (per response token) for every example, from cache if valid."""
    key = fingerprint(model, examples)
    path = Path(cache_dir) / f"ref_logps-{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        cached = torch.load(path, weights_only=True)
        for e, lp in zip(examples, cached):
            e.ref_logp = lp.tolist()
        log.info("reference log-probs loaded from %s", path)
        return
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        b = collate(chunk, pad_id).to(device)
        lp = policy_logprobs(model, b.input_ids, b.attention_mask, b.action_mask).float().cpu()
        for i, e in enumerate(chunk):
            row = lp[i][b.action_mask[i].cpu()]
            e.ref_logp = row.tolist()
            out.append(row)
    model.train(was_training)
    if path is not None:
        atomic_write(path, lambda f: torch.save(out, f), binary=True)

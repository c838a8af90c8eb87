"""Sampling with a Hugging Face model: ``n`` responses to every prompt, each with the
behaviour log-prob of every generated token, read from ``generate``'s raw logits through the
fused log-prob op (``log_softmax(logits / temperature)``; the top-k/top-p truncation is not
included: with temperature 1 this is exactly the reference policy the paper reweights against).

A response ends at the first stop token (EOS, the generation config's EOS ids, the chat
template's end of turn), which is kept in its ids (the policy chose it) and left out of its
text; one that reaches ``max_new_tokens`` first is unfinished.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from dqo_kernels import token_logprobs

from ..decoding import DecodingConfig, encode_prompt, own_generation_config, split_at_stop
from ..threads import adapt as adapt_threads
from .types import Sample, Sampler


@torch.no_grad()
def generate(model: Union[torch.nn.Module, Sampler], tokenizer, prompts: Sequence[str], *,
             decoding: DecodingConfig, n: int = 1, greedy: bool = False, batch_size: int = 64,
             prefixes: Optional[Sequence[str]] = None,
             progress: bool = False) -> List[List[Sample]]:
    """``n`` continuations of every prompt (of ``prompt + prefix`` when ``prefixes`` is given;
    the returned text then excludes the prefix), decoded as ``decoding`` says (greedy: its
    length limit and stop tokens only). ``model``: a Hugging Face model, sampled here with
    ``generate`` (``batch_size`` sequences at a time), or a :class:`Sampler`, which generates
    itself."""
    decoding = decoding.with_stop_ids(tokenizer, model)
    if not isinstance(model, torch.nn.Module):  # a Sampler: it generates itself
        return model.generate(tokenizer, prompts, decoding=decoding, n=n, greedy=greedy,
                              prefixes=prefixes)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen_config = decoding.generation_config(tokenizer, greedy=greedy)
    encoded = [encode_prompt(tokenizer, p, prefixes[i] if prefixes else "")
               for i, p in enumerate(prompts)]
    jobs = [(i, e) for i, e in enumerate(encoded) for _ in range(n)]
    out: List[List[Sample]] = [[] for _ in prompts]
    pad = gen_config.pad_token_id
    chunks = range(0, len(jobs), batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="sampling", leave=False, disable=None)
    for start in chunks:
        adapt_threads()
        batch = jobs[start:start + batch_size]
        width = max(len(e) for _, e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, (_, e) in enumerate(batch):  # left padding for generation
            ids[r, width - len(e):] = torch.tensor(e)
            attn[r, width - len(e):] = 1
        with own_generation_config(model):
            res = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                 generation_config=gen_config)
        new = res.sequences[:, width:]
        temp = 1.0 if greedy else decoding.temperature
        # One [b, V] step at a time through the fused op: no [b, L, V] fp32 stack, no full
        # log_softmax output, just the taken tokens' log-probs.
        logp = torch.stack([token_logprobs(step_logits, new[:, j], temperature=temp)
                            for j, step_logits in enumerate(res.logits)], dim=1).cpu()
        new = new.cpu()
        for r, (i, _) in enumerate(batch):
            toks, finished = split_at_stop(new[r].tolist(), decoding.stop_ids)
            body = toks[:-1] if finished else toks
            text = tokenizer.decode(body, skip_special_tokens=True)
            out[i].append(Sample(text, toks, logp[r, :len(toks)].tolist(), finished))
    model.train(was_training)
    return out

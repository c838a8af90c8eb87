"""Sampling with a Hugging Face model: ``n`` responses to every prompt, each with the
behaviour log-prob of every generated token, read from the model's raw logits through the
fused log-prob op (``log_softmax(logits / temperature)``; the top-k/top-p truncation is not
included: with temperature 1 this is exactly the reference policy the paper reweights against).
Each step's logits are read as the step runs (:class:`StepLogprobs`), so memory does not grow
with the response length (``generate(output_logits=True)`` would keep fp32 ``[b, V]`` logits of
every step: 10-20 GB at batch 32-64, 512 tokens, V = 152k).

A response ends at the first stop token (EOS, the generation config's EOS ids, the chat
template's end of turn), which is kept in its ids (the policy chose it) and left out of its
text; one that reaches ``max_new_tokens`` first is unfinished.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

from dqo_kernels import token_logprobs

from ..decoding import DecodingConfig, encode_prompt, own_generation_config, split_at_stop
from ..engine import rank
from ..launcher import in_order, shard
from ..rng import stage_seed
from ..threads import adapt as adapt_threads
from .types import Sample, Sampler


@torch.no_grad()
def generate(model: Union[torch.nn.Module, Sampler], tokenizer, prompts: Sequence[str], *,
             decoding: DecodingConfig, n: int = 1, greedy: bool = False, batch_size: int = 64,
             prefixes: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
             progress: bool = False) -> List[List[Sample]]:
    """``n`` continuations of every prompt (of ``prompt + prefix`` when ``prefixes`` is given;
    the returned text then excludes the prefix), decoded as ``decoding`` says (greedy: its
    length limit and stop tokens only). ``model``: a Hugging Face model, sampled here with
    ``generate`` (``batch_size`` sequences at a time), or a :class:`Sampler`, which generates
    itself. ``seeds`` (one a prompt): each sample draws from its own generator
    (:func:`sample_seed`), so what prompt i's k-th sample draws does not depend on the other
    prompts or the batches; without them sampling draws from torch's global generator."""
    decoding = decoding.with_stop_ids(tokenizer, model)
    if not isinstance(model, torch.nn.Module):  # a Sampler: it generates itself
        kw = {} if seeds is None else {"seeds": list(seeds)}
        return model.generate(tokenizer, prompts, decoding=decoding, n=n, greedy=greedy,
                              prefixes=prefixes, **kw)
    out: List[List[Sample]] = [[] for _ in prompts]
    for batch in sample_batches(model, tokenizer, prompts, decoding=decoding, n=n, greedy=greedy,
                                batch_size=batch_size, prefixes=prefixes, seeds=seeds,
                                progress=progress):
        for i, sample in batch:
            out[i].append(sample)
    return out


def generate_sharded(model: torch.nn.Module, tokenizer, prompts: Sequence[str], *,
                     decoding: DecodingConfig, n: int = 1, greedy: bool = False,
                     batch_size: int = 64, seeds: Optional[Sequence[int]] = None,
                     progress: bool = False) -> List[List[Sample]]:
    """:func:`generate` with a Hugging Face model, its generation batches shared among the
    launcher's ranks (:mod:`dqo.launcher`: rank r runs batches r, r + W, ...): every rank
    returns every prompt's samples, the ones one process returns (the same batches, the same
    bits). In one process, :func:`generate`. Sampled without ``seeds``, the ranks would draw
    from their own global generators: pass them for one-process results."""
    decoding = decoding.with_stop_ids(tokenizer, model)
    out: List[List[Sample]] = [[] for _ in prompts]
    mine = sample_batches(model, tokenizer, prompts, decoding=decoding, n=n, greedy=greedy,
                          batch_size=batch_size, seeds=seeds, sharded=True,
                          progress=progress and rank() == 0)
    for batch in in_order(mine):
        for i, sample in batch:
            out[i].append(sample)
    return out


def sample_seed(seed: int, k: int) -> int:
    """The seed of the ``k``-th sample of a prompt whose seed is ``seed``."""
    return stage_seed(seed, f"sample {k}")


def uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """[len(seeds), steps] uniforms in [0, 1), row r drawn from a generator seeded ``seeds[r]``."""
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(s))
                        for s in seeds])


class RowSampler:
    """Samples every row from its own uniforms (inverse CDF), then leaves only the drawn token,
    so that ``generate`` in greedy mode takes it. The distribution is transformers' own
    (temperature, top-k, top-p warpers in its order); the draws are the rows', not the batch's
    global generator's. ``generate``'s raw logits (the behaviour log-probs) are untouched."""

    def __init__(self, decoding: DecodingConfig, u: torch.Tensor, width: int):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers = []
        if decoding.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(decoding.temperature))
        if decoding.top_k:
            self.warpers.append(TopKLogitsWarper(decoding.top_k))
        if decoding.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(decoding.top_p))
        if decoding.min_p:  # after top-p, in transformers' order
            from transformers import MinPLogitsWarper
            self.warpers.append(MinPLogitsWarper(decoding.min_p))
        self.u, self.width = u, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for w in self.warpers:
            scores = w(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        cdf = probs.cumsum(-1)
        u = self.u[:, input_ids.shape[1] - self.width].unsqueeze(1)
        picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        # u * total can round up to the total: never past the last token that can be drawn
        last = probs.shape[1] - 1 - (probs > 0).flip(1).int().argmax(1, keepdim=True)
        picked = torch.minimum(picked, last)
        return torch.full_like(scores, -torch.inf).scatter_(1, picked, 0.0)


class StepLogprobs:
    """The log-prob of each token ``generate`` picks, read from the model's raw logits while
    it runs: a forward hook keeps the last position's fp32 logits of one call and, at the next
    call (whose input is the token picked from them), reads the picked token's log-prob through
    the fused op; :meth:`finish` reads the last one. One ``[b, V]`` step alive at a time."""

    def __init__(self, model: torch.nn.Module, temperature: float):
        # a peft model generates through the transformers model it wraps: hook that one
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.temperature, self.last, self.steps = temperature, None, []
        self.handle = causal_lm.register_forward_hook(self._read, with_kwargs=True)

    def _read(self, module, args, kwargs, output) -> None:
        ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        if self.last is not None:
            self.steps.append(self._logp(ids[:, -1]))
        self.last = output.logits[:, -1, :].float()

    def _logp(self, tokens: torch.Tensor) -> torch.Tensor:
        return token_logprobs(self.last, tokens, temperature=self.temperature).cpu()

    def finish(self, new: torch.Tensor) -> torch.Tensor:
        """``[b, L]`` log-probs of the ``L`` generated tokens ``new``."""
        self.close()
        if new.shape[1]:
            self.steps.append(self._logp(new[:, -1]))
        self.last = None
        return torch.stack(self.steps, 1) if self.steps else torch.zeros(new.shape)

    def close(self) -> None:
        self.handle.remove()


def zero3_partitioned(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``model``'s parameters (in a multi-rank group)."""
    p = next(model.parameters(), None)
    return (p is not None and hasattr(p, "ds_id") and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def sample_batches(model: torch.nn.Module, tokenizer, prompts: Sequence[str], *,
                   decoding: DecodingConfig, n: int = 1, greedy: bool = False,
                   batch_size: int = 64, prefixes: Optional[Sequence[str]] = None,
                   seeds: Optional[Sequence[int]] = None, first_batch: int = 0,
                   sharded: bool = False,
                   progress: bool = False) -> Iterator[List[Tuple[int, Sample]]]:
    """The samples of a Hugging Face model, one ``generate`` batch at a time: ``(prompt index,
    sample)`` in job order (prompt 0's ``n`` samples, then prompt 1's...), ``batch_size`` jobs
    a batch, from batch ``first_batch`` on (a resumed run). ``sharded``: this rank's share of
    those batches only (:func:`dqo.launcher.shard`; each batch exactly as one process runs it).
    See :func:`generate`."""
    decoding = decoding.with_stop_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seeded = seeds is not None and not greedy
    gen_config = decoding.generation_config(tokenizer, greedy=greedy or seeded)
    encoded = [encode_prompt(tokenizer, p, prefixes[i] if prefixes else "")
               for i, p in enumerate(prompts)]
    jobs = [(i, k) for i in range(len(prompts)) for k in range(n)]
    pad = gen_config.pad_token_id
    chunks = range(first_batch * batch_size, len(jobs), batch_size)
    if sharded:
        chunks = shard(chunks)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="sampling", leave=False, disable=None)
    try:
        for start in chunks:
            adapt_threads()
            batch = jobs[start:start + batch_size]
            width = max(len(encoded[i]) for i, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, (i, _) in enumerate(batch):  # left padding for generation
                e = encoded[i]
                ids[r, width - len(e):] = torch.tensor(e)
                attn[r, width - len(e):] = 1
            # ZeRO-3 gathers each layer's weights in a collective at every forward: every
            # rank must run the same number of forwards, so generate keeps stepping until all
            # ranks' batches have ended
            kw = {"synced_gpus": True} if zero3_partitioned(model) else {}
            if seeded:
                u = uniforms([sample_seed(seeds[i], k) for i, k in batch],
                             decoding.max_new_tokens).to(device)
                from transformers import LogitsProcessorList
                kw["logits_processor"] = LogitsProcessorList([RowSampler(decoding, u, width)])
            reader = StepLogprobs(model, 1.0 if greedy else decoding.temperature)
            try:
                with own_generation_config(model):
                    res = model.generate(input_ids=ids.to(device),
                                         attention_mask=attn.to(device),
                                         generation_config=gen_config, **kw)
            finally:
                reader.close()
            new = res.sequences[:, width:]
            logp = reader.finish(new)
            new = new.cpu()
            out = []
            for r, (i, _) in enumerate(batch):
                toks, finished = split_at_stop(new[r].tolist(), decoding.stop_ids)
                body = toks[:-1] if finished else toks
                text = tokenizer.decode(body, skip_special_tokens=True)
                out.append((i, Sample(text, toks, logp[r, :len(toks)].tolist(), finished)))
            yield out
    finally:
        model.train(was_training)

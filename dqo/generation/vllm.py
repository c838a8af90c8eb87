"""Sampling with vLLM (``dqo.sample --engine vllm``, ``dqo.evaluate --engine vllm``): the same
rows as the Hugging Face engine (:mod:`dqo.generation.hf`: ``response_ids``, per-token
``behavior_logp``, ``finished``), and the Monte-Carlo process scores through the same engine.
vLLM is an optional install, imported only here, and only when an engine is built.

What makes the rows the same as the HF engine's:

- prompts go in as token ids (:func:`dqo.decoding.encode_prompt`: chat template, BOS);
- every sampling knob is explicit, and the checkpoint's ``generation_config.json`` is not used
  as defaults (``generation_config="vllm"``);
- the stop ids are the decoding config's (EOS, generation config, end of turn); a response that
  ends on one keeps it (vLLM includes a stop token id in ``token_ids``); ``finished`` is
  ``finish_reason == "stop"``, so a response cut at ``max_tokens`` is unfinished;
- ``behavior_logp`` is vLLM's log-prob of each sampled token (``logprobs=0``), which vLLM
  computes from the raw logits: the HF engine's ``log_softmax(logits / temperature)`` only at
  temperature 1 (the paper's). Another temperature is refused rather than recorded wrong.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from ..decoding import DecodingConfig, encode_prompt, split_at_stop
from .types import Sample


class VLLMEngine:
    """A vLLM ``LLM`` for a model directory or Hub id; a :class:`dqo.generation.Sampler`."""

    def __init__(self, model: str, seed: int = 0, **llm_kwargs):
        from transformers import GenerationConfig
        from vllm import LLM

        self.llm = LLM(model=model, seed=seed, generation_config="vllm", **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        try:  # its EOS ids join the stop ids (stop_token_ids reads them from here)
            self.generation_config = GenerationConfig.from_pretrained(model)
        except Exception:  # none in the checkpoint (or offline): the tokenizer's EOS alone
            self.generation_config = None

    def generate(self, tokenizer, prompts: Sequence[str], *, decoding: DecodingConfig, n: int = 1,
                 greedy: bool = False, prefixes: Optional[Sequence[str]] = None,
                 seeds: Optional[Sequence[int]] = None):
        from vllm import TokensPrompt

        encoded = [encode_prompt(tokenizer, p, prefixes[i] if prefixes else "")
                   for i, p in enumerate(prompts)]
        # seeds: one request generator a prompt (vLLM's per-request seed), so that a prompt's
        # samples do not depend on the other prompts of the call
        params = (sampling_params(decoding, n, greedy) if seeds is None
                  else [sampling_params(decoding, n, greedy, seed=s) for s in seeds])
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=e) for e in encoded],
                                    params, use_tqdm=False)
        return samples_from_vllm(outputs, tokenizer, decoding.stop_ids)


def sampling_params(decoding: DecodingConfig, n: int, greedy: bool, seed: Optional[int] = None):
    """vLLM ``SamplingParams`` for ``decoding`` (greedy: temperature 0), every knob explicit;
    ``seed``: the request's own generator."""
    from vllm import SamplingParams

    if decoding.stop_ids is None:
        raise ValueError("stop_ids: call with_stop_ids(tokenizer, model) first")
    if not greedy and decoding.temperature != 1.0:
        raise ValueError(f"temperature: the vLLM engine records behaviour log-probs of the raw "
                         f"logits, exact at temperature 1 only, got {decoding.temperature}; use "
                         f"--engine hf for another temperature")
    return SamplingParams(
        n=n, temperature=0.0 if greedy else decoding.temperature,
        top_p=1.0 if greedy else decoding.top_p,
        top_k=-1 if greedy or decoding.top_k == 0 else decoding.top_k,
        min_p=0.0 if greedy else decoding.min_p, repetition_penalty=1.0, presence_penalty=0.0,
        frequency_penalty=0.0,
        max_tokens=decoding.max_new_tokens, stop_token_ids=list(decoding.stop_ids),
        ignore_eos=False, logprobs=0, skip_special_tokens=True,
        **({} if seed is None else {"seed": seed}))


def samples_from_vllm(outputs, tokenizer, stop_ids: Sequence[int]) -> List[List[Sample]]:
    """vLLM ``RequestOutput``s -> one list of :class:`dqo.generation.Sample` a prompt."""
    out = []
    for request in outputs:
        samples = []
        for c in request.outputs:
            ids = list(c.token_ids)
            logp = [float(step[t].logprob) for t, step in zip(ids, c.logprobs)]
            if len(logp) != len(ids):
                raise ValueError(f"vLLM returned {len(logp)} log-probs for {len(ids)} tokens: "
                                 f"sample with logprobs=0")
            finished = c.finish_reason == "stop"
            kept, stopped = split_at_stop(ids, stop_ids)
            body = kept[:-1] if stopped else kept
            samples.append(Sample(tokenizer.decode(body, skip_special_tokens=True), kept,
                                  logp[:len(kept)], finished))
        out.append(samples)
    return out

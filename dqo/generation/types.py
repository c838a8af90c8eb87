"""What generation returns and takes: a :class:`Sample`, a :data:`Verifier`, and the
:class:`Sampler` protocol of an engine that generates (the vLLM engine; a Hugging Face model goes
through :func:`dqo.generation.generate` itself)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Sequence, Union

from ..decoding import DecodingConfig
from ..rewards import Reward


@dataclass
class Sample:
    text: str  # the response without its stop token
    ids: List[int]  # generated tokens, the stop token included if one was generated
    logp: List[float]  # behaviour log-prob of every generated token
    finished: bool = True  # False: cut at max_new_tokens


# a verifier ``(responses, answers) -> list[bool]`` or a :class:`dqo.rewards.Reward`
Verifier = Union[Callable[[Sequence[str], Sequence[str]], List[bool]], Reward]


class Sampler(Protocol):
    """An engine that samples (``dqo.generation.vllm.VLLMEngine``): ``n`` continuations of
    every prompt (of ``prompt + prefix`` with ``prefixes``; the text then excludes the prefix),
    decoded as ``decoding`` says (its ``stop_ids`` filled in), as the Hugging Face path of
    :func:`dqo.generation.generate` does; ``seeds`` (one a prompt, optional): each prompt's
    samples drawn from a generator of its own."""

    def generate(self, tokenizer, prompts: Sequence[str], *, decoding: DecodingConfig,
                 n: int = 1, greedy: bool = False, prefixes: Optional[Sequence[str]] = None,
                 seeds: Optional[Sequence[int]] = None) -> List[List[Sample]]:
        ...

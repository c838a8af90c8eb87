"""The sampler a command line names: a Hugging Face model, or the vLLM engine."""
from __future__ import annotations

from ..errors import UsageError


def load_sampler(args):
    """(tokenizer, what :func:`dqo.generation.generate` samples with) for ``args`` (its
    ``engine``, ``model``, ``temperature``, ``seed``): the HF model, or a vLLM engine."""
    from ..restore import load_trained_policy
    if args.engine == "vllm":
        if args.temperature not in (None, 1.0):
            raise UsageError(f"--temperature: the vLLM engine records behaviour log-probs of "
                             f"the raw logits, exact at temperature 1 only, got "
                             f"{args.temperature}; use --engine hf")
        from ..optional import require
        require("vllm", "--engine vllm")
        from .vllm import VLLMEngine
        engine = VLLMEngine(args.model, seed=args.seed)
        return engine.tokenizer, engine
    return load_trained_policy(args.model)

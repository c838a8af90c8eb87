"""Generation: sampling responses with their behaviour log-probs, grading them into rows of the
data format, and process rewards.

- :mod:`dqo.generation.types`: :class:`Sample`, :data:`Verifier`, the :class:`Sampler` protocol;
- :mod:`dqo.generation.hf`: :func:`generate` (a Hugging Face model, or any Sampler);
- :mod:`dqo.generation.vllm`: ``VLLMEngine``, a Sampler (vLLM, an optional install, is imported
  only when one is built);
- :mod:`dqo.generation.labels`: :func:`label_samples` (samples -> rows), :func:`reward_columns`;
- :mod:`dqo.generation.process_rewards`: Monte-Carlo and exact process scores;
- :mod:`dqo.generation.engines`: :func:`load_sampler` (what a command line names).
"""
from .engines import load_sampler
from .hf import generate
from .labels import label_samples, reward_columns
from .process_rewards import (
    PROCESS_REWARD_TOTAL,
    exact_process_scores,
    mc_process_scores,
    step_lines,
    with_step_rewards,
)
from .types import Sample, Sampler, Verifier

__all__ = [
    "PROCESS_REWARD_TOTAL", "Sample", "Sampler", "Verifier", "exact_process_scores", "generate",
    "label_samples", "load_sampler", "mc_process_scores", "reward_columns", "step_lines",
    "with_step_rewards",
]

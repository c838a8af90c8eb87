"""The algorithms the trainer runs on the same offline samples (paper appendix A), one module
each, registered by name:

- ``dqo``: token-level soft Q-learning with lambda-returns and importance sampling (ours);
- ``dro``: the sequence-level special case (one action per response), policy + value;
- ``sft``: the examples' responses as targets (give reference solutions);
- ``rs``:  rejection sampling: SFT on the correct samples;
- ``dpo``: pairs of a correct and an incorrect sample of a prompt (at most 12 a prompt);
- ``kto``: every sample, label = correctness, TRL's reference point and weights.

Responses cut at the length limit (``Example.finished`` False) bootstrap their return from the
value model in DQO and DRO, and are incorrect samples for RS, DPO and KTO: no algorithm sees a
token that was not generated.
"""
from ..configs import ALGOS
from . import dpo, dqo, dro, kto, sft  # noqa: F401  (each registers itself)
from .base import REGISTRY, Algorithm, last_action, register

assert set(REGISTRY) == set(ALGOS), (tuple(REGISTRY), ALGOS)


def make(name: str, cfg=None) -> Algorithm:
    """The algorithm ``name``, with its options from ``cfg`` (a TrainConfig; None: defaults)."""
    if name not in REGISTRY:
        raise ValueError(f"algo: expected one of {ALGOS}, got {name!r}")
    cls = REGISTRY[name]
    return cls() if cfg is None else cls.from_config(cfg)


__all__ = ["ALGOS", "Algorithm", "REGISTRY", "last_action", "make", "register"]

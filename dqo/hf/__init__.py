"""DQO in a ``transformers.Trainer``, used the way TRL's trainers are (docs/hf-trainer.md):

- :class:`DQOConfig` (:mod:`dqo.hf.config`): ``TrainingArguments`` with the DQO options;
- :class:`DQOTrainer` (:mod:`dqo.hf.trainer`): the Trainer, from a model (or its path) and a
  dataset of text, conversations or ``dqo.sample``'s rows (:mod:`dqo.hf.data`);
- :class:`DQOCollator`, :class:`PolicyWithValue` (:mod:`dqo.hf.modules`): the collator and the
  policy with its value model as one module.

``DQOConfig`` and ``DQOTrainer`` import transformers' Trainer (and accelerate) on first access.
"""
from .modules import DQOCollator, PolicyWithValue, load_value_model

_LAZY = {"DQOConfig": "config", "DQOTrainer": "trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DQOCollator", "DQOConfig", "DQOTrainer", "PolicyWithValue", "load_value_model"]

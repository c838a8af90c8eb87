"""``DQOConfig``: ``transformers.TrainingArguments`` with DQO's options, as TRL's ``KTOConfig``
is for KTO.

The loss options are :class:`dqo.configs.DQOLossConfig`'s own fields (inherited: one
declaration, one set of bounds and defaults for the command line and the Trainer); the data
options are declared in :class:`DQODataArgs`, a few of them taken whole from the command line's
sections. Every one is checked when the config is built: a bad value is a
:class:`~dqo.errors.UsageError` naming the field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from transformers import TrainingArguments

from ..configs import DQOLossConfig, TrainDataConfig
from ..errors import UsageError
from ..options import FieldMetadata, Options, all_metadata, check_field, opt
from ..prompts import resolve_template

inf = math.inf


def same_as(section, name: str, **changes):
    """A field declared as ``section``'s field ``name`` (its default, help and bounds), so an
    option shared with the command line is declared once."""
    f = next(f for f in dataclasses.fields(section) if f.name == name)
    meta = all_metadata(f)  # the bounds too
    if "help" in changes:
        meta["help"] = changes.pop("help")
    return dataclasses.field(default=changes.pop("default", f.default),
                             metadata=FieldMetadata(meta))


@dataclass
class DQODataArgs(Options):
    """How ``DQOTrainer`` turns a dataset into training rows, and its value model's rate."""

    _argument_group_name = "DQO data"
    value_learning_rate: Optional[float] = opt(
        None, "learning rate of the value model (default: learning_rate x "
        "dqo.configs.VALUE_LR_RATIO, as the command line's --value-lr-ratio)", gt=0, lt=inf)
    max_length: Optional[int] = same_as(
        TrainDataConfig, "max_length", help="tokens of prompt + completion; longer completions "
        "are cut to fit (unfinished, see truncated); default: no limit")
    max_prompt_length: Optional[int] = opt(
        None, "tokens of a prompt kept, its last ones (the nearest context); default: all", ge=1)
    truncated: str = same_as(TrainDataConfig, "truncated")
    truncated_reward: float = same_as(TrainDataConfig, "truncated_reward")
    precompute_ref_log_probs: bool = opt(
        True, "the reference log-probs once, before training (a batched pass); false: in every "
        "step, under no_grad")
    precompute_ref_batch_size: Optional[int] = opt(
        None, "sequences a forward of that pass (default: per_device_eval_batch_size)", ge=1)
    system_prompt: Optional[str] = opt(
        None, "a system turn put first in every prompt that has none (needs a chat template)")
    prompt_template: Optional[str] = opt(
        None, "the instruction around each text prompt (or a conversation's last user turn): "
        "paper-gsm8k, paper-math, none, or a file with one {prompt}")

    def check(self) -> None:
        super().check()
        if self.max_length is not None and self.max_prompt_length is not None \
                and self.max_prompt_length >= self.max_length:
            raise UsageError(f"max_prompt_length: expected less than max_length "
                             f"({self.max_length}), got {self.max_prompt_length}")

    def template_text(self) -> Optional[str]:
        """The prompt template's text (None: prompts as they are)."""
        if self.prompt_template is None:
            return None
        text = resolve_template(self.prompt_template)
        return None if text == "{prompt}" else text


@dataclass
class DQOConfig(TrainingArguments, DQODataArgs, DQOLossConfig):
    """``TrainingArguments`` plus the DQO loss (``beta``, ``lam``, ``gamma``, ``is_clip``,
    ``is_policy``, ``is_value``, ``target_grad``, ``loss_agg``: :class:`DQOLossConfig`) and the
    data options (:class:`DQODataArgs`). Defaults differing from ``TrainingArguments``:
    ``learning_rate`` 5e-7 (the paper's, the command line's --lr), ``logging_steps`` 10, and
    ``remove_unused_columns`` False (the DQO columns are no model inputs)."""

    learning_rate: float = dataclasses.field(
        default=5e-7, metadata={"help": "learning rate of the policy (the paper's 5e-7)"})
    logging_steps: float = dataclasses.field(
        default=10, metadata={"help": "steps between two logs of the loss and DQO metrics"})
    remove_unused_columns: bool = dataclasses.field(
        default=False, metadata={"help": "kept False: the DQO columns are no model inputs"})

    def __post_init__(self):
        TrainingArguments.__post_init__(self)
        try:
            for f in dqo_fields():
                check_field(self, f)
            self.check()  # each section's rules between its fields (cooperative)
            self.template_text()  # a template name or file that does not resolve fails here
        except UsageError as e:  # named as the field, not as the command line's flag
            name, _, rest = str(e).partition(":")
            if name.startswith("--"):
                name = name[2:].replace("-", "_")
            raise UsageError(f"DQOConfig.{name}:{rest}") from None


def dqo_fields():
    """The DQO options of :class:`DQOConfig` (the loss's and the data's), in order."""
    return dataclasses.fields(DQOLossConfig) + dataclasses.fields(DQODataArgs)

"""DQO in a ``transformers.Trainer``: a data collator that keeps DQO's columns, the policy and
its value model as one module, and a Trainer whose ``compute_loss`` is the fused DQO loss.

    trainer = DQOTrainer(model=PolicyWithValue(policy, ValueModel.from_policy(policy)),
                         args=TrainingArguments(...), train_dataset=rows,
                         data_collator=DQOCollator(tokenizer.pad_token_id), beta=0.1)
    trainer.train()

A row is one response: ``input_ids`` (prompt + response token ids), ``prompt_length``,
``rewards`` (one per response token: the outcome on the last, process rewards on step ends) or
``reward`` (the outcome alone), ``ref_logp`` (one per response token), and optionally
``behavior_logp`` (one per response token) and ``finished`` (False: cut at a length limit; its
return bootstraps from the value of the state after its last token). The data ``dqo.sample``
writes become such rows with :func:`dqo.data.trainer_rows` (after ``read_jsonl``,
``tokenize_rows`` and ``dqo.reference_logps.ref_logps``).

Exact token-mean under gradient accumulation and data parallelism: the collator's ``labels``
are the action tokens, so the Trainer's ``num_items_in_batch`` is the number of action tokens
of the whole optimizer step (every micro-batch, every rank with ``average_tokens_across_devices``,
its default); it is the loss's ``num_tokens``, and the Trainer neither divides the loss by the
accumulation steps (``model_accepts_loss_kwargs``) nor lets data parallelism average it away
(the loss is multiplied by the number of processes, as the Trainer's own ``compute_loss`` does).
"""
from __future__ import annotations

import functools
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from dqo_kernels import fused_dqo_loss

from .data.collate import collate_trainer_rows
from .modeling import ValueModel, policy_logprobs


class DQOCollator:
    """Rows (see the module docstring; :func:`dqo.data.trainer_rows` makes them from the data
    ``dqo.sample`` writes) -> one padded batch, every DQO column kept: the per-response-token
    lists land on their action positions of the ``[B, T]`` tensors
    (:func:`dqo.data.collate_trainer_rows`)."""

    def __init__(self, pad_token_id: int, padding: str = "right"):
        if padding not in ("left", "right"):
            raise ValueError(f"padding: expected 'left' or 'right', got {padding!r}")
        self.pad_token_id, self.padding = pad_token_id, padding

    def __call__(self, rows: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        return collate_trainer_rows(rows, self.pad_token_id, self.padding)


class PolicyWithValue(nn.Module):
    """The policy and its value model as the one module a Trainer optimizes. ``forward`` gives
    the ``[B, T]`` action-aligned log-probs (lm_head fused, no logits), values, and the value of
    the state after each row's last token (for rows cut at a length limit)."""

    def __init__(self, policy: nn.Module, value: ValueModel):
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config

    def forward(self, input_ids, attention_mask, action_mask, **_):
        logp = policy_logprobs(self.policy, input_ids, attention_mask, action_mask)
        values, after = self.value(input_ids, attention_mask, with_after=True)
        last = input_ids.shape[1] - 1 - action_mask.flip(-1).float().argmax(-1)
        end_value = after[torch.arange(len(last), device=last.device), last]
        return logp, values, end_value


@functools.lru_cache(maxsize=None)
def _trainer_class():
    from transformers import Trainer

    class DQOTrainer(Trainer):
        """A ``transformers.Trainer`` that trains :class:`PolicyWithValue` with the fused DQO
        loss; the DQO hyper-parameters are keyword arguments (see ``fused_dqo_loss``)."""

        def __init__(self, *args, beta: float = 0.1, lam: float = 1.0, gamma: float = 1.0,
                     is_clip: float = 1.0, **kwargs):
            training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
            if training_args is not None:
                training_args.remove_unused_columns = False  # the DQO columns are not inputs
            super().__init__(*args, **kwargs)
            self.dqo_params = dict(beta=beta, lam=lam, gamma=gamma, is_clip=is_clip)
            # the loss is normalised by num_items_in_batch here: no 1 / accumulation steps
            self.model_accepts_loss_kwargs = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logp, values, end_value = model(inputs["input_ids"], inputs["attention_mask"],
                                            inputs["action_mask"])
            finished = inputs["finished"]
            bootstrap = None if bool(finished.all()) else torch.where(
                finished, torch.zeros_like(end_value), end_value.detach())
            out = fused_dqo_loss(
                logp, inputs["ref_logp"], values, inputs["rewards"], inputs["action_mask"],
                behavior_logp=inputs.get("behavior_logp"), bootstrap=bootstrap,
                num_tokens=None if num_items_in_batch is None else float(num_items_in_batch),
                **self.dqo_params)
            loss = out.loss
            if (num_items_in_batch is not None and self.args.average_tokens_across_devices
                    and self.accelerator.num_processes > 1):
                loss = loss * self.accelerator.num_processes  # DDP averages over ranks
            return (loss, out) if return_outputs else loss

    return DQOTrainer


def __getattr__(name):  # transformers' Trainer (and accelerate) only when asked for
    if name == "DQOTrainer":
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__: List[str] = ["DQOCollator", "PolicyWithValue"]  # and DQOTrainer, on first access

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
import math
from dataclasses import fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from dqo_kernels import fused_dqo_loss

from .algos import last_action
from .atomic import safe_load
from .configs import DQOLossConfig
from .data.collate import collate_trainer_rows
from .modeling import (
    ValueModel,
    disable_checkpointing,
    enable_checkpointing,
    policy_logprobs,
)
from .options import check_range

LOSS_OPTIONS = tuple(f.name for f in fields(DQOLossConfig))


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

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **extra):
        """``TrainingArguments(gradient_checkpointing=True)``: both models, non-reentrant."""
        enable_checkpointing(self.policy, activation_checkpointing_kwargs, **extra)
        self.value.activation_checkpointing_enable(activation_checkpointing_kwargs, **extra)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **extra):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **extra)

    def activation_checkpointing_disable(self):
        disable_checkpointing(self.policy)
        self.value.activation_checkpointing_disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    def save_pretrained(self, path, **_) -> None:
        """Each model where its own ``from_pretrained`` finds it: the policy in ``path``
        (a transformers model directory, or a peft adapter's; tied embeddings saved once) and
        the value model in ``path/value``."""
        path = Path(path)
        self.policy.save_pretrained(path)
        self.value.save_pretrained(path / "value")

    def load_weights(self, path) -> None:
        """The weights :meth:`save_pretrained` wrote, into these models (a Trainer's resume)."""
        path = Path(path)
        if getattr(self.policy, "peft_config", None):
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(self.policy, load_weights_file(path, "adapter_model"))
        else:
            load_into(self.policy, load_weights_file(path, "model"), path)
        load_into(self.value.backbone, load_weights_file(path / "value", "model"), path / "value")
        self.value.head.load_state_dict(safe_load(path / "value" / "value_head.pt"))

    def forward(self, input_ids, attention_mask, action_mask, **_):
        logp = policy_logprobs(self.policy, input_ids, attention_mask, action_mask)
        values, after = self.value(input_ids, attention_mask, with_after=True)
        last = last_action(action_mask)
        end_value = after[torch.arange(len(last), device=last.device), last]
        return logp, values, end_value


def load_weights_file(path: Path, stem: str) -> Dict[str, torch.Tensor]:
    """``stem.safetensors`` of a model directory, or all its shards (``stem.safetensors.index
    .json``)."""
    from safetensors.torch import load_file

    single = path / f"{stem}.safetensors"
    if single.is_file():
        return load_file(single)
    index = path / f"{stem}.safetensors.index.json"
    if not index.is_file():
        from .errors import CheckpointError
        raise CheckpointError(f"{path}: no {single.name} nor {index.name}")
    import json
    out: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(path / shard))
    return out


def load_into(model: nn.Module, state: Dict[str, torch.Tensor], where: Path) -> None:
    """``state`` into ``model``; a weight it lacks must be tied to one it has (saved once)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {p.data_ptr() for n, p in params.items() if n in state}
    untied = [n for n in missing if n not in params or params[n].data_ptr() not in loaded]
    if unexpected or untied:
        from .errors import CheckpointError
        raise CheckpointError(f"{where}: the weights do not match the model (missing "
                              f"{untied[:3]}, unexpected {unexpected[:3]})")


@functools.lru_cache(maxsize=None)
def _trainer_class():
    from transformers import Trainer

    class DQOTrainer(Trainer):
        """A ``transformers.Trainer`` that trains :class:`PolicyWithValue` with the fused DQO
        loss. Its options are :class:`dqo.configs.DQOLossConfig`'s, as keyword arguments
        (``beta=``, ``lam=``, ``gamma=``, ``is_clip=``, ``is_policy=``, ``is_value=``,
        ``target_grad=``, ``loss_agg=``) or as ``loss=DQOLossConfig(...)``, checked as the
        command line checks them; ``value_lr`` is the value model's learning rate (default:
        the Trainer's)."""

        def __init__(self, *args, loss: Optional[DQOLossConfig] = None,
                     value_lr: Optional[float] = None, **kwargs):
            options = {k: kwargs.pop(k) for k in LOSS_OPTIONS if k in kwargs}
            if loss is not None and options:
                raise TypeError(f"DQOTrainer: give loss= or the loss options "
                                f"({', '.join(options)}), not both")
            self.loss_config = loss if loss is not None else DQOLossConfig(**options)
            check_range("value_lr", value_lr, 0, math.inf, low_open=True, high_open=True)
            self.value_lr = value_lr
            training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
            if training_args is not None:
                training_args.remove_unused_columns = False  # the DQO columns are not inputs
            super().__init__(*args, **kwargs)
            # the loss is normalised by num_items_in_batch here: no 1 / accumulation steps
            self.model_accepts_loss_kwargs = True

        def create_optimizer(self, *args, **kwargs):
            """The Trainer's optimizer, with the value model's parameters in groups of their
            own at ``value_lr`` (a critic learns at a larger rate than the policy)."""
            opt = super().create_optimizer(*args, **kwargs)
            if self.value_lr is None:
                return opt
            value = getattr(self.model, "value", None)
            if value is None:
                raise ValueError("value_lr: the model has no value model (expected a "
                                 "PolicyWithValue)")
            ids = {id(p) for p in value.parameters()}
            moved = []
            for g in opt.param_groups:
                mine = [p for p in g["params"] if id(p) in ids]
                if mine:
                    g["params"] = [p for p in g["params"] if id(p) not in ids]
                    moved.append({**{k: v for k, v in g.items() if k != "params"},
                                  "params": mine, "lr": self.value_lr})
            opt.param_groups[:] = [g for g in opt.param_groups if g["params"]]
            for g in moved:
                opt.add_param_group(g)
            return opt

        def _save(self, output_dir=None, state_dict=None):
            """A checkpoint whose models load with ``from_pretrained``: the policy where the
            Trainer puts a model (config, weights, the tokenizer beside them), the value model
            in ``value/``. The Trainer's own save of a non-transformers module writes one state
            dict, which fails on tied embeddings and that nothing can load."""
            output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
            if not self.args.should_save:
                return
            output_dir.mkdir(parents=True, exist_ok=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, output_dir / "training_args.bin")

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            (model or self.model).load_weights(resume_from_checkpoint)

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
                **self.loss_config.loss_kwargs())
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

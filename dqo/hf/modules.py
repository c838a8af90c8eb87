"""The modules a ``transformers.Trainer`` trains with DQO: the collator that keeps DQO's
columns, and the policy with its value model as one module that saves and loads each model in
its own transformers (or peft) format.

A row is one response: ``input_ids`` (prompt + response token ids), ``prompt_length``,
``rewards`` (one per response token: the outcome on the last, process rewards on step ends) or
``reward`` (the outcome alone), ``ref_logp`` (one per response token; without it the trainer
computes it batch by batch), and optionally ``behavior_logp`` (one per response token) and
``finished`` (False: cut at a length limit; its return bootstraps from the value of the state
after its last token). :mod:`dqo.hf.data` makes such rows from text, conversations or the rows
``dqo.sample`` writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import torch
import torch.nn as nn

from ..algos import last_action
from ..atomic import safe_load
from ..data.collate import collate_trainer_rows
from ..errors import CheckpointError
from ..modeling import (
    ValueModel,
    disable_checkpointing,
    enable_checkpointing,
    policy_logprobs,
)


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
        load_model_weights(self.policy, path)
        load_model_weights(self.value.backbone, path / "value")
        self.value.head.load_state_dict(safe_load(path / "value" / "value_head.pt"))

    def forward(self, input_ids, attention_mask, action_mask, **_):
        logp = policy_logprobs(self.policy, input_ids, attention_mask, action_mask)
        values, after = self.value(input_ids, attention_mask, with_after=True)
        last = last_action(action_mask)
        end_value = after[torch.arange(len(last), device=last.device), last]
        return logp, values, end_value


def load_model_weights(model: nn.Module, path: Path) -> None:
    """What ``model.save_pretrained(path)`` wrote, into ``model``: a peft model's adapter, or
    a transformers model's weights."""
    if getattr(model, "peft_config", None):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_weights_file(path, "adapter_model"))
    else:
        load_into(model, load_weights_file(path, "model"), path)


def load_weights_file(path: Path, stem: str) -> Dict[str, torch.Tensor]:
    """``stem.safetensors`` of a model directory, or all its shards (``stem.safetensors.index
    .json``)."""
    from safetensors.torch import load_file

    single = path / f"{stem}.safetensors"
    if single.is_file():
        return load_file(single)
    index = path / f"{stem}.safetensors.index.json"
    if not index.is_file():
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
        raise CheckpointError(f"{where}: the weights do not match the model (missing "
                              f"{untied[:3]}, unexpected {unexpected[:3]})")


def load_value_model(path) -> ValueModel:
    """A value model from ``path``: a saved :class:`ValueModel` (``value/`` of a checkpoint), or
    any transformers checkpoint, whose backbone gets a fresh scalar head (of any size: the
    value model need not be the policy's)."""
    if (Path(path) / "value_head.pt").is_file():
        return ValueModel.from_pretrained(path)
    from transformers import AutoModel

    from ..modeling import attn_implementation
    try:
        backbone = AutoModel.from_pretrained(path, dtype=torch.float32,
                                             attn_implementation=attn_implementation())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"value_model: {path} is no transformers checkpoint ({e})") from None
    return ValueModel(backbone)

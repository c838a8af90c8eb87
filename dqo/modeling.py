"""Policy and value models, and the per-token quantities the loss needs (docs/math.md §2).

Everything is aligned on the action position t: ``logp[:, t]`` is the log-prob of
``input_ids[:, t]`` given ``input_ids[:, :t]`` (from the hidden state at t-1) and
``values[:, t] = V(s_t)`` (the value head on the hidden state at t-1). Column 0 is 0 in both:
the first token is never an action.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from dqo_kernels import (
    action_logprobs,
    action_logprobs_from_logits,
    cu_seqlens_from_lengths,
    to_actions,
)
from dqo_kernels import position_ids as packed_positions

from . import lora
from .atomic import safe_load
from .errors import UsageError
from .manifest import check_weights, verify_model_dir

log = logging.getLogger(__name__)


def attn_implementation() -> str:
    """flash-attn 2 on GPU when it is installed, SDPA otherwise."""
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def tiny_config(tokenizer, *, hidden_size=128, layers=4, heads=4, max_positions=128,
                attention_dropout=0.0):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, attention_dropout=attention_dropout,
    )


def build_policy(config=None, path: Optional[str] = None, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                    attn_implementation=attn_implementation())
    return AutoModelForCausalLM.from_config(config, dtype=dtype,
                                            attn_implementation=attn_implementation())


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_policy(path: str, precision: Optional[str] = None):
    """(tokenizer, policy) from a HF path, for sampling, evaluation and training: bf16 on the
    GPU when there is one (the current device), fp32 on CPU, unless ``precision`` (``bf16``,
    ``fp16``, ``fp32``) says otherwise."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lora.tokenizer_source(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    on_gpu = torch.cuda.is_available()
    dtype = DTYPES[precision] if precision else torch.bfloat16 if on_gpu else torch.float32
    verify_model_dir(path)  # a damaged weights file is an error, never a 0.000 accuracy
    if lora.is_adapter_dir(path):  # a LoRA policy: its base + the adapter
        model = lora.load_merged(path, dtype=dtype, attn_implementation=attn_implementation())
    else:
        model = build_policy(path=path, dtype=dtype)
    check_weights(model.named_parameters(), path)
    return tok, model.cuda() if on_gpu else model


def enable_checkpointing(model: nn.Module, kwargs: Optional[dict] = None, **extra) -> None:
    """Non-reentrant activation checkpointing of a transformers model: each decoder layer's
    activations are recomputed in the backward instead of kept (about a layer's input a token
    kept per layer instead of all its intermediates). Any transformers version: 5.x names it
    ``activation_checkpointing_enable``, 4.x ``gradient_checkpointing_enable``."""
    kw = {"use_reentrant": False, **(kwargs or {})}
    if getattr(model, "peft_config", None) and len(model.peft_config) > 1:
        # two adapters on one base: each layer recomputed with the adapter it ran with
        kw.setdefault("context_fn", lora.checkpoint_context(model))
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw, **extra)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def disable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Positions count real tokens, so left- and right-padded rows see the same positions
    # (as in generate()).
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer under the LM head (``model.model``), through a peft wrapper too."""
    if hasattr(model, "get_base_model"):  # a peft PeftModel
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix)


def packed_layout(attention_mask: torch.Tensor):
    """The real tokens of a padded batch as one packed row: which positions they are (``[B, T]``
    bool) and their ``cu_seqlens``. Each row's real tokens must be contiguous (left or right
    padding), as :func:`dqo.data.collate` makes them."""
    real = attention_mask.bool()
    return real, cu_seqlens_from_lengths(real.sum(-1)).to(real.device)


def unpad(packed: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``[1, N, ...]`` outputs of the packed real tokens -> ``[B, T, ...]``, 0 on padding."""
    out = packed.new_zeros(*real.shape, *packed.shape[2:])
    out[real] = packed[0]
    return out


def backbone_hidden(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    packing: bool = False) -> torch.Tensor:
    """``[B, T, D]`` last hidden states. With ``packing`` the backbone runs on the real tokens
    only, every row's end to end in one row with restarting position ids (transformers then
    keeps the sequences apart: its sdpa, eager and flash-attention paths build the
    block-diagonal mask from the positions when given no attention mask and no cache), so no
    compute goes to padding; the states are put back on their padded positions."""
    if not packing:
        return backbone(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids(attention_mask)).last_hidden_state
    real, cu = packed_layout(attention_mask)
    hidden = backbone(input_ids=input_ids[real][None], position_ids=packed_positions(cu),
                      use_cache=False).last_hidden_state
    return unpad(hidden, real)


def policy_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    action_mask: torch.Tensor, *, temperature: float = 1.0,
                    packing: bool = False) -> torch.Tensor:
    """``[B, T]`` fp32 log-probs of the taken tokens on action positions (0 elsewhere),
    computed from the last hidden states and the lm_head weight without ``[B, T, V]`` logits;
    ``packing``: the forward on the real tokens only (:func:`backbone_hidden`)."""
    head = model.get_output_embeddings()
    if getattr(model.config, "final_logit_softcapping", None):
        # Soft-capped logits are not a linear function of the hidden state: go through them.
        if not packing:
            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask)).logits
            return action_logprobs_from_logits(logits, input_ids, action_mask,
                                               temperature=temperature)
        real, cu = packed_layout(attention_mask)
        ids = input_ids[real][None]
        logits = model(input_ids=ids, position_ids=packed_positions(cu), use_cache=False).logits
        logp = action_logprobs_from_logits(logits, ids, action_mask[real][None],
                                           temperature=temperature, cu_seqlens=cu)
        return unpad(logp, real)
    hidden = backbone_hidden(backbone_of(model), input_ids, attention_mask, packing)
    return action_logprobs(hidden, head.weight, input_ids, action_mask,
                           bias=getattr(head, "bias", None), temperature=temperature)


def check_packing(policy: "PolicyLogprobs", forward, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, action_mask: torch.Tensor,
                  tolerance: float = 0.1) -> None:
    """A UsageError if the policy's attention does not keep packed sequences apart: the packed
    and the padded ``forward`` (the policy's engine, so that ZeRO-3 gathers its parameters) of
    the batch's first rows must give the same log-probs up to ``tolerance`` nats (bf16 noise),
    as transformers' sdpa, eager and flash-attention paths do; an attention that ignored the
    restarting positions would mix the sequences and train on wrong log-probs without a word."""
    rows = slice(0, min(2, input_ids.shape[0]))
    args = (input_ids[rows], attention_mask[rows], action_mask[rows])
    packing, training = policy.packing, policy.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    # eval mode: dropout would tell the two forwards apart; and the training's RNG untouched,
    # so that a resumed run draws what an uninterrupted one does
    policy.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            policy.packing = False
            padded = forward(*args)
            policy.packing = True
            packed = forward(*args)
    finally:
        policy.packing = packing
        policy.train(training)
    gap = float((padded - packed).abs().max()) if padded.numel() else 0.0
    if not gap <= tolerance:
        impl = getattr(policy.config, "_attn_implementation", "?")
        raise UsageError(f"--packing: this model's attention ({impl}) does not keep packed "
                         f"sequences apart (packed and padded log-probs differ by {gap:.3g}); "
                         f"use attn_implementation sdpa, eager or flash_attention_2, or drop "
                         f"--packing")


class PolicyLogprobs(nn.Module):
    """The policy as the trainer's engine sees it: ``forward`` returns the ``[B, T]`` log-probs
    of the taken tokens (:func:`policy_logprobs`).

    It reads the lm_head weight without calling the lm_head module, so that weight is
    registered as an external parameter of this module: under ZeRO-3 DeepSpeed then gathers it
    for this forward (and reduces its gradient) like any of its own parameters."""

    def __init__(self, model, deepspeed: bool = False, packing: bool = False):
        super().__init__()
        self.model = model
        self.config = model.config
        self.packing = packing
        if not deepspeed:
            return
        # A no-op below ZeRO-3; must happen before deepspeed.initialize partitions.
        import deepspeed  # deepspeed.zero is an attribute, not an importable module

        register_external_parameter = deepspeed.zero.register_external_parameter
        head = model.get_output_embeddings()
        for p in (head.weight, getattr(head, "bias", None)):
            if p is not None:
                register_external_parameter(self, p)

    def forward(self, input_ids, attention_mask, action_mask):
        if not getattr(self.model, "peft_config", None):
            return policy_logprobs(self.model, input_ids, attention_mask, action_mask,
                                   packing=self.packing)
        with lora.use_adapter(self.model, lora.POLICY_ADAPTER):  # a value adapter may share it
            return policy_logprobs(self.model, input_ids, attention_mask, action_mask,
                                   packing=self.packing)

    def trainable_parameters(self):
        """What the policy's optimizer trains: with LoRA its own adapter alone (a value
        adapter on the same base belongs to the value model's optimizer)."""
        if getattr(self.model, "peft_config", None):
            return lora.policy_parameters(self.model)
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(self, path, state_dict: Optional[dict] = None) -> None:
        """``state_dict``: this module's full state when its parameters are partitioned
        (DeepSpeed ZeRO-3 gathers it into rank 0's CPU memory)."""
        state = sub_state(state_dict, "model.")
        if getattr(self.model, "peft_config", None):  # the policy's adapter, in peft's format
            self.model.save_pretrained(path, selected_adapters=[lora.POLICY_ADAPTER],
                                       **state)
            return
        self.model.save_pretrained(path, **state)

    # With LoRA a checkpoint holds what training changes in peft's format (the engines'
    # ``save_checkpoint``): the same files as final/policy, read back by ``load_adapters``.
    @property
    def has_adapters(self) -> bool:
        return bool(getattr(self.model, "peft_config", None))

    def save_adapters(self, path) -> None:
        lora.save_adapter(self.model, path, lora.POLICY_ADAPTER)

    def load_adapters(self, path) -> None:
        lora.load_adapter(self.model, path, lora.POLICY_ADAPTER)


def sub_state(state_dict: Optional[dict], prefix: str) -> dict:
    """``save_pretrained``'s keyword for a sub-module's part of a full ``state_dict`` (keys
    under ``prefix``, stripped), or none without one."""
    if state_dict is None:
        return {}
    return {"state_dict": {k[len(prefix):]: v for k, v in state_dict.items()
                           if k.startswith(prefix)}}


def head_values(head: nn.Linear, hidden: torch.Tensor, with_after: bool):
    """A scalar head on the last hidden states: ``values`` [B, T], ``V(s_t)`` on position t
    (0 on column 0), and with ``with_after`` also ``after`` [B, T], V of the state after token
    t (``values`` shifted left by one, completed by the state after the last column)."""
    after = head(hidden.to(head.weight.dtype)).squeeze(-1).float()
    values = to_actions(after[:, :-1])
    return (values, after) if with_after else values


def _saved_as(path) -> dict:
    f = Path(path) / "value_model.json"
    return json.loads(f.read_text()) if f.is_file() else {}


class ValueModel(nn.Module):
    """A transformers backbone with a scalar head: ``V(s_t)`` for every position t."""

    packing = False  # the forward on the real tokens only (backbone_hidden); set by the trainer

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        # V = 0 at the start: the value model learns the returns from scratch.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy) -> "ValueModel":
        """A value model whose backbone starts as a copy of the policy's."""
        import copy
        return cls(copy.deepcopy(backbone_of(policy)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                with_after: bool = False):
        """``values`` [B, T]: ``V(s_t)`` on position t (0 on column 0). With ``with_after``,
        also ``after`` [B, T]: V of the state after token t, i.e. ``values`` shifted left by one
        and completed by the state after the last column, which a response cut at the length
        limit bootstraps from."""
        hidden = backbone_hidden(self.backbone, input_ids, attention_mask, self.packing)
        return head_values(self.head, hidden, with_after)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **extra):
        enable_checkpointing(self.backbone, activation_checkpointing_kwargs, **extra)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **extra):
        enable_checkpointing(self.backbone, gradient_checkpointing_kwargs, **extra)

    def activation_checkpointing_disable(self):
        disable_checkpointing(self.backbone)

    gradient_checkpointing_disable = activation_checkpointing_disable

    def save_pretrained(self, path, state_dict: Optional[dict] = None) -> None:
        """``state_dict``: as :meth:`PolicyLogprobs.save_pretrained`."""
        path = Path(path)
        self.backbone.save_pretrained(path, **sub_state(state_dict, "backbone."))
        head = sub_state(state_dict, "head.").get("state_dict") or self.head.state_dict()
        torch.save(head, path / "value_head.pt")
        (path / "value_model.json").write_text(json.dumps({"head": "value_head.pt"}))

    @property
    def has_adapters(self) -> bool:
        """A LoRA backbone: checkpoints hold its adapter and the head
        (:meth:`save_pretrained`'s files), read back by :meth:`load_adapters`."""
        return bool(getattr(self.backbone, "peft_config", None))

    def save_adapters(self, path) -> None:
        self.save_pretrained(path)

    def load_adapters(self, path) -> None:
        lora.load_adapter(self.backbone, path, lora.POLICY_ADAPTER)  # peft's name: default
        self.head.load_state_dict(safe_load(Path(path) / "value_head.pt"))

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32) -> "ValueModel":
        """A value model this class or :class:`SharedValueModel` saved (its ``value_head.pt``
        beside the backbone, or beside a LoRA adapter: merged into its base, for evaluation),
        or the backbone of any transformers checkpoint (a smaller critic than the policy, a Hub
        id): its scalar head then starts as a new one does."""
        from transformers import AutoModel

        verify_model_dir(path)
        kw = dict(dtype=dtype, attn_implementation=attn_implementation())
        if not lora.is_adapter_dir(path):
            backbone = AutoModel.from_pretrained(path, **kw)
        elif _saved_as(path).get("backbone") == "shared":  # an adapter on the policy's base
            backbone = backbone_of(lora.load_merged(path, **kw))
        else:  # a LoRA backbone of its own: the adapter on the base's backbone
            peft = lora.require_peft()
            base = peft.PeftConfig.from_pretrained(str(path)).base_model_name_or_path
            backbone = peft.PeftModel.from_pretrained(
                AutoModel.from_pretrained(base, **kw), str(path)).merge_and_unload()
        model = cls(backbone)
        head = Path(path) / "value_head.pt"
        if head.is_file():
            model.head.load_state_dict(torch.load(head, weights_only=True))
        else:
            log.info("%s: no value_head.pt (a plain checkpoint): its scalar head starts new",
                     path)
        check_weights(model.named_parameters(), path)
        return model


class SharedValueModel(nn.Module):
    """``V(s_t)`` from the policy's frozen base with an adapter of its own and a scalar head.

    Its parameters are that adapter and the head only (the base and the policy's adapter are
    reachable but not registered here), so its optimizer and gradient clipping see nothing
    of the policy's."""

    packing = False  # as ValueModel.packing

    def __init__(self, peft_policy: nn.Module, adapter_cfg, adapter: str = lora.VALUE_ADAPTER):
        super().__init__()
        peft_policy.add_adapter(adapter, adapter_cfg)
        for p in lora.adapter_parameters(peft_policy, adapter):
            p.requires_grad_(True)
        object.__setattr__(self, "shared", peft_policy)  # not a submodule: not our parameters
        self.adapter_name = adapter
        self.adapter = nn.ParameterList(lora.adapter_parameters(peft_policy, adapter))
        self.config = peft_policy.config
        self.head = nn.Linear(self.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(peft_policy.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                with_after: bool = False):
        with lora.use_adapter(self.shared, self.adapter_name):
            hidden = backbone_hidden(backbone_of(self.shared), input_ids, attention_mask,
                                     self.packing)
        return head_values(self.head, hidden, with_after)

    def train(self, mode: bool = True):
        super().train(mode)
        self.shared.train(mode)
        return self

    def save_pretrained(self, path) -> None:
        """The value adapter in peft's format (on the policy's base, which its
        ``adapter_config.json`` names) and the head, beside each other."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lora.save_adapter(self.shared, path, self.adapter_name)
        torch.save(self.head.state_dict(), path / "value_head.pt")
        (path / "value_model.json").write_text(json.dumps(
            {"head": "value_head.pt", "adapter": self.adapter_name, "backbone": "shared"}))

    has_adapters = True

    def save_adapters(self, path) -> None:
        self.save_pretrained(path)

    def load_adapters(self, path) -> None:
        lora.load_adapter(self.shared, path, self.adapter_name)
        self.head.load_state_dict(safe_load(Path(path) / "value_head.pt"))

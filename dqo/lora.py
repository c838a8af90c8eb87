"""LoRA through ``peft``: the policy's adapter, and optionally the value model as a second
adapter with a scalar head on the same frozen base, so that one base model in memory serves the
policy, the value model and the reference (the base with the adapters off, which at the first
step is exactly the policy: a fresh LoRA adapter adds zero).

Both adapters live in the same LoRA layers; which one a forward uses is the layers' active
adapter. :func:`use_adapter` switches it for one forward without touching ``requires_grad``
(peft's own ``set_adapter`` freezes the other adapter, whose graph may still be waiting for
its backward), and activation checkpointing recomputes each layer under the adapter it first
ran with (:func:`checkpoint_context`), so the two models' backward passes can run in any order.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, List, Optional

import torch.nn as nn

POLICY_ADAPTER, VALUE_ADAPTER = "default", "value"


def require_peft():
    from .optional import require
    return require("peft", "--lora-r (LoRA)")


def lora_config(r: int, alpha: float, dropout: float, target_modules: str):
    """peft's ``LoraConfig`` from the command line's options; ``target_modules`` is
    ``all-linear`` (every linear layer but the lm_head, peft's own default for that name) or
    comma-separated module names such as ``q_proj,v_proj``."""
    peft = require_peft()
    targets = (target_modules if target_modules == "all-linear"
               else [t.strip() for t in target_modules.split(",") if t.strip()])
    return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                           task_type="CAUSAL_LM")


def _tuner_layers(model: nn.Module) -> List[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_parameters(model: nn.Module, adapter: str) -> List[nn.Parameter]:
    """The parameters of one adapter (e.g. ``lora_A.value.weight``)."""
    return [p for n, p in model.named_parameters() if f".{adapter}." in n]


def current_adapter(model: nn.Module) -> Optional[str]:
    layers = _tuner_layers(model)
    return layers[0].active_adapters[0] if layers else None


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter: str) -> Iterator[None]:
    """Run ``model``'s LoRA layers with ``adapter`` alone, then restore the previous one."""
    layers = _tuner_layers(model)
    before = [m.active_adapter for m in layers]
    for m in layers:
        m._active_adapter = [adapter]
    try:
        yield
    finally:
        for m, a in zip(layers, before):
            m._active_adapter = a


def checkpoint_context(model: nn.Module):
    """A ``context_fn`` for ``torch.utils.checkpoint``: the recomputation of a layer in the
    backward runs with the adapter its forward ran with."""
    from torch.utils.checkpoint import noop_context_fn

    def context_fn():
        adapter = current_adapter(model)
        return noop_context_fn()[0], use_adapter(model, adapter)
    return context_fn


def add_policy_adapter(policy: nn.Module, cfg) -> nn.Module:
    """The policy as a ``PeftModel`` with a fresh adapter (the base frozen). ``cfg`` is left
    as it is: peft resolves ``all-linear`` into the policy's module names in the config it is
    given, names a separate value backbone (no ``model.`` prefix) would not have."""
    import copy
    return require_peft().get_peft_model(policy, copy.deepcopy(cfg))


def add_backbone_adapter(backbone: nn.Module, cfg) -> nn.Module:
    """A separate value model's backbone (no LM head) with an adapter of its own."""
    import copy
    peft = require_peft()
    cfg = copy.deepcopy(cfg)
    cfg.task_type = None
    return peft.get_peft_model(backbone, cfg)


def policy_parameters(peft_policy: nn.Module) -> List[nn.Parameter]:
    """What the policy's optimizer trains: its own adapter only."""
    return adapter_parameters(peft_policy, POLICY_ADAPTER)


def is_adapter_dir(path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


# --- adapters on disk: peft's own format, in checkpoints and in final/ ---

def save_adapter(model: nn.Module, path, adapter: str = POLICY_ADAPTER) -> None:
    """``adapter`` of the ``PeftModel`` ``model`` in peft's format (``adapter_config.json``
    naming the base, ``adapter_model.safetensors``) directly in ``path``: what
    ``PeftModel.from_pretrained(base, path)`` loads. (peft itself puts any adapter but
    ``default`` in a sub-directory named after it.)"""
    path = Path(path)
    model.save_pretrained(path, selected_adapters=[adapter])
    if adapter != "default":
        sub = path / adapter
        for f in sub.iterdir():
            os.replace(f, path / f.name)
        sub.rmdir()


def load_adapter(model: nn.Module, path, adapter: str = POLICY_ADAPTER) -> None:
    """Set ``adapter``'s weights of ``model`` from what :func:`save_adapter` wrote to
    ``path``, exactly. A file that does not hold this adapter's tensors (another rank, other
    target modules) is a ``CheckpointError`` naming it."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    from .errors import CheckpointError
    file = Path(path) / "adapter_model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{path}: no adapter_model.safetensors (a LoRA checkpoint "
                              f"holds its adapter in peft's format)")
    device = next(model.parameters()).device
    weights = load_peft_weights(str(path), device=str(device))
    expected = adapter_parameters(model, adapter)
    try:
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter)
    except RuntimeError as exc:  # a shape mismatch: another rank
        raise CheckpointError(f"{file}: does not fit this run's LoRA adapter (another "
                              f"--lora-r?): {str(exc).splitlines()[-1].strip()}") from None
    if result.unexpected_keys or len(weights) != len(expected):
        raise CheckpointError(f"{file}: holds {len(weights)} tensors, this run's adapter "
                              f"{len(expected)} (unexpected: {result.unexpected_keys[:3]}): a "
                              f"checkpoint of a run with other --lora-target-modules")


def tokenizer_source(path) -> str:
    """Where the tokenizer of the model in ``path`` is: ``path`` itself, or for an adapter
    directory without one (a checkpoint's) the base its ``adapter_config.json`` names."""
    path = Path(path)
    if not is_adapter_dir(path) or (path / "tokenizer_config.json").is_file():
        return str(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    return cfg.get("base_model_name_or_path") or str(path)


def load_merged(path, **kwargs) -> nn.Module:
    """The LoRA policy in ``path`` as one transformers model: the base its
    ``adapter_config.json`` names (``from_pretrained`` with ``kwargs``), the adapter merged in.
    The base keeps its embeddings as they are (peft's ``AutoPeftModelForCausalLM`` resizes
    them to a tokenizer beside the adapter that counts more tokens, with new random rows)."""
    from transformers import AutoModelForCausalLM

    peft = require_peft()
    cfg = peft.PeftConfig.from_pretrained(str(path))
    base = AutoModelForCausalLM.from_pretrained(cfg.base_model_name_or_path, **kwargs)
    return peft.PeftModel.from_pretrained(base, str(path)).merge_and_unload()


def save_merged(adapter_dir, out) -> None:
    """The policy in ``adapter_dir`` (base + adapter) merged into one transformers model in
    ``out`` (``AutoModelForCausalLM.from_pretrained`` loads it; no peft needed), with the
    tokenizer and ``decoding.json`` beside it. The base is read again from disk in its own
    dtype on the CPU, so the trained model in memory is left as it is and no GPU memory is
    needed."""
    import shutil

    from transformers import AutoTokenizer

    adapter_dir, out = Path(adapter_dir), Path(out)
    load_merged(adapter_dir, dtype="auto", device_map="cpu").save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_source(adapter_dir)).save_pretrained(out)
    if (adapter_dir / "decoding.json").is_file():
        shutil.copy(adapter_dir / "decoding.json", out / "decoding.json")

"""A policy from anything ``dqo.train`` writes, for ``dqo.evaluate`` and ``dqo.sample``: a
transformers directory (``final/policy``, ``base``), a LoRA adapter directory (on the base it
names), or a training checkpoint (``checkpoints/step-N`` or its ``policy`` sub-directory, whose
``engine.pt`` holds the trained tensors): that one is loaded onto the base model named in its
run's ``config.yaml`` (the embedded default: the run's ``base``). What cannot be loaded is one
line that says what it needs, never a traceback about a missing tokenizer."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Tuple

from .errors import UsageError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def engine_dir(path: Path):
    """The directory holding the policy's ``engine.pt`` when ``path`` is a checkpoint (or its
    policy part); None otherwise."""
    for d in (path, path / "policy"):
        if (d / "engine.pt").is_file():
            return d
    return None


def load_trained_policy(model: str, flag: str = "--model"):
    """(tokenizer, policy) of ``model``: see the module docstring."""
    from .modeling import load_policy

    path = Path(model).expanduser()
    if not path.is_dir():
        return load_policy(model)  # a Hub id (check_model vetted it)
    from .lora import is_adapter_dir
    for d in (path, path / "policy"):  # a LoRA checkpoint holds its adapter in peft's format
        if is_adapter_dir(str(d)):
            return load_policy(str(d))
    engine = engine_dir(path)
    if engine is not None:
        return load_checkpoint_policy(engine, flag)
    if (path / "trainer_state.json").is_file() or (path / "policy" / "latest").is_file():
        raise UsageError(f"{flag}: {model} is a DeepSpeed checkpoint (no engine.pt): evaluate "
                         f"the run's final/policy, or convert it with the zero_to_fp32.py "
                         f"DeepSpeed wrote beside it")
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise UsageError(f"{flag}: {model} is no model directory (no config.json, "
                         f"adapter_config.json or engine.pt)")
    if not has_tokenizer(path):
        raise UsageError(f"{flag}: {model} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
                         f"save it beside the model (tokenizer.save_pretrained), or evaluate the "
                         f"run's final/policy, which has one")
    return load_policy(str(path))


def decoding_dirs(model: str):
    """Where the decoding config of ``model`` may be: the directory itself, and for a
    checkpoint its run's ``final/policy`` (the settings the run trained and evaluated with)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return []
    engine = engine_dir(path)
    if engine is None:
        return [path]
    ckpt = engine.parent if engine.name == "policy" else engine
    return [path, ckpt.parent.parent / "final" / "policy"]


def run_config(run_dir: Path) -> dict:
    """The options a run wrote to its ``config.yaml`` ({} where there is none)."""
    import yaml

    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def run_base(run_dir: Path, flag: str) -> str:
    """The base model a run trained: ``model`` of its config.yaml, else (the embedded default)
    its warmed-up ``base``."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UsageError(f"{flag}: a training checkpoint loads onto the base model its run's "
                         f"config.yaml names, and {cfg_path} is missing; evaluate "
                         f"{run_dir / 'final' / 'policy'} instead")
    cfg = run_config(run_dir)
    return str(cfg["model"]) if cfg.get("model") else str(run_dir / "base")


def load_checkpoint_policy(engine: Path, flag: str = "--model") -> Tuple[object, object]:
    """The policy of a checkpoint's ``engine.pt`` on its run's base (LoRA: the adapter rebuilt
    from the run's options, then merged)."""
    import torch

    from .atomic import safe_load
    from .modeling import PolicyLogprobs, load_policy

    ckpt = engine.parent if engine.name == "policy" else engine
    run_dir = ckpt.parent.parent  # <run>/checkpoints/step-N
    base = run_base(run_dir, flag)
    tok, model = load_policy(base)
    cfg = run_config(run_dir)
    if cfg.get("lora_r"):
        from . import lora
        model = lora.add_policy_adapter(model, lora.lora_config(
            cfg["lora_r"], cfg.get("lora_alpha", 32.0), cfg.get("lora_dropout", 0.05),
            cfg.get("lora_target_modules", "all-linear")))
    wrapped = PolicyLogprobs(model)
    state = safe_load(engine / "engine.pt")["module"]
    unknown = sorted(set(state) - set(wrapped.state_dict()))
    if unknown:
        raise UsageError(f"{flag}: {engine / 'engine.pt'} holds tensors that {base} has not "
                         f"(e.g. {unknown[:2]}): not a checkpoint of a run on that base")
    with torch.no_grad():
        wrapped.load_state_dict(state, strict=False)
    if cfg.get("lora_r"):
        model = model.merge_and_unload()
    log.info("%s: the trained weights of %s on %s", flag, engine / "engine.pt", base)
    return tok, model.eval()

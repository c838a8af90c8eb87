"""Training engines: DeepSpeed, or the same interface on plain PyTorch.

The loop only calls ``engine.module``, ``engine.backward(loss)``, ``engine.step()``,
``engine.get_lr()``, ``engine.save_checkpoint(dir)`` and ``engine.load_checkpoint(dir)``.
``step()`` is called after every micro-batch and updates the weights at gradient-accumulation
boundaries, and ``backward`` divides the loss by the accumulation steps, as DeepSpeed does.
A boundary whose gradient is not finite updates nothing (``last_step_skipped``): the plain
engine checks the gradient norm, DeepSpeed its own overflow check (on for bf16 here).
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .atomic import safe_load

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    total_steps: int = 1000
    grad_accum: int = 1
    micro_batch: int = 8


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))


def has_adapters(model: torch.nn.Module) -> bool:
    """A module whose trained tensors are LoRA adapters (and heads) on a frozen base, saved
    and loaded in peft's format by its ``save_adapters(path)`` / ``load_adapters(path)``."""
    return bool(getattr(model, "has_adapters", False))


def trainable_parameters(model: torch.nn.Module):
    """The parameters an engine trains: the module's own choice (a LoRA policy whose base is
    shared with the value model's adapter trains its adapter alone), else what needs a
    gradient."""
    if hasattr(model, "trainable_parameters"):
        return list(model.trainable_parameters())
    return [p for p in model.parameters() if p.requires_grad]


class TorchEngine:
    """The subset of DeepSpeed's engine the trainer uses, on plain PyTorch (AdamW)."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig):
        self.module, self.cfg = model, cfg
        self.params = params = trainable_parameters(model)
        for p in params:  # gradients left by whatever trained the model before: not ours
            p.grad = None
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.total_steps))
        self.micro_steps = 0
        self.global_steps = 0
        self.skipped_steps = 0
        self.last_step_skipped = False
        self.last_grad_norm = float("nan")  # the last optimizer step's, before clipping

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.cfg.grad_accum:
            return
        clip = self.cfg.grad_clip if self.cfg.grad_clip and self.cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.last_grad_norm = float(norm)  # before clipping: what the curves show
        self.last_step_skipped = not bool(torch.isfinite(norm))
        if self.last_step_skipped:  # a non-finite gradient never reaches the weights
            self.skipped_steps += 1
        else:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def save_pretrained(self, path) -> None:
        self.module.save_pretrained(path)

    def _trained_state(self) -> Dict[str, torch.Tensor]:
        """The module's state, or with frozen weights (LoRA) the trained tensors alone: a
        checkpoint holds what training changed, not a copy of the base model."""
        trained = {id(p) for p in self.params}
        named = list(self.module.named_parameters())
        if all(id(p) in trained for _, p in named):
            return self.module.state_dict()
        return {n: p.detach() for n, p in named if id(p) in trained}

    def save_checkpoint(self, path) -> None:
        """``engine.pt`` (optimizer, scheduler, counters) and the trained weights: in it, or
        with LoRA adapters beside it in peft's format (the module's ``save_adapters``, the
        files of ``final/``), their one copy."""
        Path(path).mkdir(parents=True, exist_ok=True)
        state = {"optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps,
                 "global_steps": self.global_steps, "skipped_steps": self.skipped_steps}
        if has_adapters(self.module):
            self.module.save_adapters(path)
        else:
            state["module"] = self._trained_state()
        torch.save(state, Path(path) / "engine.pt")

    def load_checkpoint(self, path) -> None:
        state = safe_load(Path(path) / "engine.pt")
        if "module" not in state and has_adapters(self.module):
            self.module.load_adapters(path)
        else:
            self._load_module(path, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps, self.global_steps = state["micro_steps"], state["global_steps"]
        self.skipped_steps = state.get("skipped_steps", 0)

    def _load_module(self, path, state) -> None:
        """The trained tensors from ``engine.pt`` (a full model's, or an adapter checkpoint
        written before adapters were saved in peft's format)."""
        from .errors import CheckpointError
        if "module" not in state:
            raise CheckpointError(f"{Path(path)}: a LoRA checkpoint (its adapters in peft's "
                                  f"format), but this run trains the full model")
        expected = self._trained_state().keys()
        if set(state["module"]) != set(expected):
            missing = sorted(set(expected) - set(state["module"]))[:3]
            extra = sorted(set(state["module"]) - set(expected))[:3]
            raise CheckpointError(f"{Path(path) / 'engine.pt'}: holds other tensors than this "
                                  f"run trains (missing {missing}, unexpected {extra}): a "
                                  f"checkpoint of a run with other LoRA or model options")
        self.module.load_state_dict(state["module"], strict=False)


def deepspeed_config(cfg: OptimConfig, zero_stage: int, precision: str = "fp32",
                     offload: str = "none") -> Dict:
    """The trainer's DeepSpeed config for one model: ZeRO 0-3, ``precision`` ``bf16``,
    ``fp16`` (dynamic loss scaling) or ``fp32``, ``offload`` ``none``, ``optimizer`` (the
    optimizer states in CPU memory) or ``all`` (the parameters too; ZeRO-3)."""
    zero: Dict = {"stage": zero_stage}
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    bf16 = precision == "bf16"
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        # skip a step whose gradient is not finite (DeepSpeed checks fp32 and fp16 itself)
        "bf16": {"enabled": bf16, **({"check_grad_overflow": True} if bf16 else {})},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},  # 0: dynamic
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay,
            # torch's AdamW: DeepSpeed's fused CPU/GPU Adam would be compiled at start-up
            # (a user's config may ask for it: "torch_adam": false).
            "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            # DeepSpeed needs >= 1 warm-up step; without warm-up that step starts at full lr.
            "total_num_steps": max(cfg.total_steps, cfg.warmup_steps + 1),
            "warmup_num_steps": max(1, cfg.warmup_steps), "cos_min_ratio": 0.1,
            "warmup_min_ratio": 0.0 if cfg.warmup_steps > 0 else 1.0}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def merge_config(ours: Dict, theirs: Dict, path: str = "") -> Tuple[Dict, List[str]]:
    """``theirs`` (a user's DeepSpeed JSON) over ``ours``, key by key into nested sections:
    their values win, ``"auto"`` (transformers' convention) keeps ours. Also returns one line
    per value of theirs that replaced or added to ours, for the log."""
    merged, changes = dict(ours), []
    for key, value in theirs.items():
        where = f"{path}{key}"
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(ours.get(key), dict):
            merged[key], sub = merge_config(ours[key], value, where + ".")
            changes += sub
        elif key not in ours:
            merged[key] = value
            changes.append(f"{where}: {json.dumps(value)} (added)")
        elif ours[key] != value:
            merged[key] = value
            changes.append(f"{where}: {json.dumps(ours[key])} -> {json.dumps(value)}")
    return merged, changes


def read_user_config(path: str) -> Dict:
    """A user's DeepSpeed JSON, or a UsageError naming the file and what is wrong."""
    from .errors import UsageError
    try:
        config = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"--deepspeed: cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--deepspeed: {path} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--deepspeed: expected a JSON object in {path}, got "
                         f"{type(config).__name__}")
    return config


def import_deepspeed():
    """``deepspeed``, set up for this machine. Without a GPU, its shared-memory all-reduce op
    is not built (``DQO_DEEPSPEED_CPU_SHM=1`` keeps it): DeepSpeed compiles it with torch's C++
    extension headers when its process group starts, ~30 s of a quiet machine's CPU and over 15
    minutes of a busy one, every time its cache is cold, only to speed up all-reduces between
    CPU ranks, which gloo does without it."""
    import importlib

    import deepspeed

    if not torch.cuda.is_available() and os.environ.get("DQO_DEEPSPEED_CPU_SHM", "0") != "1":
        # by module name: the attribute deepspeed.comm.torch is the torch package itself
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


class DeepSpeedEngine:
    """DeepSpeed's engine behind the same interface as :class:`TorchEngine`."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, zero_stage: int = 2,
                 precision: Optional[str] = None, offload: str = "none",
                 user_config: Optional[str] = None):
        deepspeed = import_deepspeed()

        if precision is None:
            precision = "bf16" if torch.cuda.is_available() else "fp32"
        self.config = deepspeed_config(cfg, zero_stage, precision, offload)
        if user_config:
            self.config, changes = merge_config(self.config, read_user_config(user_config))
            if rank() == 0:
                log.info("DeepSpeed config: %s merged over the trainer's: %s", user_config,
                         "; ".join(changes) or "no change")
        params = trainable_parameters(model)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                               config=self.config)
        self.module = self.engine.module
        # ZeRO's optimizers skip a step whose gradient norm is not finite (fp32; bf16 with
        # check_grad_overflow); without ZeRO only fp16's loss scaler would
        self.skips_non_finite = zero_stage > 0
        self.last_step_skipped = False
        self.last_grad_norm = float("nan")  # the last optimizer step's, before clipping

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        before = self.engine.skipped_steps
        self.engine.step()
        self.last_step_skipped = self.engine.skipped_steps > before
        norm = self.engine.get_global_grad_norm()  # None until an optimizer step computed one
        self.last_grad_norm = float("nan") if norm is None else float(norm)

    @property
    def global_steps(self):
        return self.engine.global_steps

    def get_lr(self):
        return self.engine.get_lr()

    def train(self):
        self.engine.train()

    def eval(self):
        self.engine.eval()

    def save_pretrained(self, path) -> None:
        """The full model in HF format; rank 0 writes. Collective: under ZeRO-3 every rank
        must call it. The partitioned parameters are gathered one layer at a time into rank 0's
        CPU memory (never the whole model on every rank's GPU)."""
        if self.config["zero_optimization"].get("stage", 0) != 3:
            if rank() == 0:
                self.module.save_pretrained(path)
            return
        state = self.engine._zero3_consolidated_16bit_state_dict()  # rank 0's CPU; else None
        if rank() == 0:
            self.module.save_pretrained(path, state_dict=state)

    @property
    def _frozen(self) -> bool:
        """Frozen weights (LoRA's base): checkpoints leave them out."""
        return any(not p.requires_grad for p in self.module.parameters())

    def save_checkpoint(self, path) -> None:
        """DeepSpeed's checkpoint (what resume reads), and with LoRA the adapters in peft's
        format beside it too, for use without DeepSpeed: a second copy of the adapters only,
        small beside their optimizer state. Collective."""
        import deepspeed

        path = Path(path)
        self.engine.save_checkpoint(str(path.parent), tag=path.name,
                                    exclude_frozen_parameters=self._frozen)
        if has_adapters(self.module):
            gather = self.config["zero_optimization"]["stage"] == 3
            with deepspeed.zero.GatheredParameters(trainable_parameters(self.module),
                                                   enabled=gather):
                if rank() == 0:
                    self.module.save_adapters(path)

    def load_checkpoint(self, path) -> None:
        path = Path(path)
        self.engine.load_checkpoint(str(path.parent), tag=path.name,
                                    load_module_strict=not self._frozen)


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def join_launcher_group(kind: str) -> None:
    """Under a multi-process launcher (torchrun, deepspeed), join its process group now, so
    that work before the engines exist (the reference log-prob pass) can be shared across
    ranks. DeepSpeed reuses the group when it builds the engines."""
    if resolve_engine_kind(kind) == "deepspeed" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import_deepspeed().init_distributed()


def leave_process_group() -> None:
    """Meet every rank, then close the process group. Without it the first rank to exit
    closes its gloo connections while another rank's gloo threads still use them, and that
    rank aborts at interpreter shutdown ("terminate called without an active exception"; seen
    in 1 of about 10 two-rank CPU runs)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        forget_deepspeed_groups()


def forget_deepspeed_groups() -> None:
    """DeepSpeed keeps a clone of the world group it made (``deepspeed.utils.groups``); once
    the process group is gone that clone is stale, and the next DeepSpeed engine of the process
    (a second run from Python: a notebook, a sweep) fails with "Group ... is not registered".
    Forget it, so that the next engine clones the new world."""
    import sys
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups._WORLD_GROUP = None


def init_distributed_env() -> None:
    """Let DeepSpeed run in one process without a launcher (RANK etc. unset)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True


def resolve_engine_kind(kind: str) -> str:
    """``"auto"``: DeepSpeed on GPU (when installed), plain PyTorch on a CPU-only machine."""
    if kind == "auto":
        return "deepspeed" if torch.cuda.is_available() and deepspeed_available() else "torch"
    if kind not in ("deepspeed", "torch"):
        raise ValueError(f"engine: expected 'auto', 'deepspeed' or 'torch', got {kind!r}")
    return kind


def make_engine(model, cfg: OptimConfig, kind: str = "auto", zero_stage: int = 2,
                **deepspeed_options):
    """``kind``: "deepspeed", "torch" or "auto" (see :func:`resolve_engine_kind`);
    ``deepspeed_options``: :class:`DeepSpeedEngine`'s ``precision``, ``offload`` and
    ``user_config``."""
    kind = resolve_engine_kind(kind)
    if kind == "deepspeed":
        init_distributed_env()
        return DeepSpeedEngine(model, cfg, zero_stage=zero_stage, **deepspeed_options)
    if deepspeed_options.get("user_config") or deepspeed_options.get("offload", "none") != "none":
        from .errors import UsageError
        raise UsageError("--deepspeed/--offload: need the DeepSpeed engine, and --engine auto "
                         "chose plain PyTorch (no GPU or no deepspeed); use --engine deepspeed")
    return TorchEngine(model, cfg)

"""A memory plan before any work: what a DQO run holds per GPU, from the model's config alone.

    python -m dqo.memory --model Qwen/Qwen2.5-7B-Instruct --gpus 8 --zero-stage 3
    python -m dqo.memory --model ./local-qwen --lora-r 16 --value-backbone shared --gpu-memory 80

The parameters are counted exactly on the meta device (no weights are loaded or downloaded
when ``--model`` is a local directory; a Hub id fetches its ``config.json`` only). Then, per GPU:

- **training state** (bytes a parameter; ``w`` = weight bytes, 2 in bf16, 4 in fp32):
  full fine-tuning keeps the weights (w), their gradients (w) and AdamW's state (two fp32
  moments, plus an fp32 master copy when the weights are bf16: 12 bytes; 8 in fp32), 16 bytes a
  parameter either way. ZeRO-1 partitions the optimizer state over the GPUs, ZeRO-2 the
  gradients too, ZeRO-3 the weights too. With LoRA the base is frozen (w bytes a parameter,
  partitioned only under ZeRO-3) and only the adapters (``r * (d_in + d_out)`` per adapted
  linear layer) carry gradients and optimizer state.
- **the value model**: ``separate`` is a second backbone (the policy without its lm_head) with
  the same treatment; ``shared`` (with LoRA) is one more adapter and a scalar head on the same
  frozen base.
- **activations** of one micro-batch, both models' forwards alive together as in a DQO step:
  per decoder layer and token about ``7 h + 2 kv + 4 i`` values are kept for the backward
  (norm inputs and outputs, q, k, v, the attention output, the gated MLP's four ``i``-wide
  tensors; fused attention keeps no ``s x s`` scores). With activation checkpointing only each
  layer's input (``h``) is kept, plus one layer's intermediates during its recomputation.
- The log-prob head is fused (no ``[tokens x vocab]`` logits held for the backward), so it
  adds one ``[tokens, h]`` fp32 copy of the hidden states and its own logits chunk: as many
  vocabulary columns as fit its budget (512 MiB on a GPU, 64 MiB on the CPU), the whole
  ``[tokens x vocab]`` block when that is smaller.

The reference log-probs are computed once before training and cached, so the reference
policy holds no memory during it. Not counted: the CUDA context and allocator fragmentation
(keep 10-20% free), DeepSpeed's communication buffers, generation's KV cache.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

GIB = 1024 ** 3
LORA_ALL_LINEAR = "all-linear"


@dataclass
class ModelShape:
    """What the plan needs of a causal LM: parameter counts and the layer dimensions."""

    params: int  # the whole policy
    backbone_params: int  # without the lm_head (the value model's backbone)
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int  # num_key_value_heads * head_dim
    vocab: int
    linear_shapes: List[Tuple[str, int, int]] = field(default_factory=list)  # (name, in, out)

    def lora_params(self, r: int, targets: str = LORA_ALL_LINEAR) -> int:
        """Adapter parameters of rank ``r`` on the decoder's linear layers named by
        ``targets`` (``all-linear``, or comma-separated suffixes such as ``q_proj,v_proj``)."""
        names = None if targets == LORA_ALL_LINEAR else {t.strip() for t in targets.split(",")}
        return sum(r * (i + o) for n, i, o in self.linear_shapes
                   if names is None or n.rsplit(".", 1)[-1] in names)


def shape_of(config) -> ModelShape:
    """Exact parameter counts of ``config``'s causal LM, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    backbone = getattr(model, model.base_model_prefix)
    linears = [(n, m.in_features, m.out_features) for n, m in backbone.named_modules()
               if isinstance(m, torch.nn.Linear)]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        backbone_params=sum(p.numel() for p in backbone.parameters()),
        hidden=config.hidden_size, layers=config.num_hidden_layers,
        intermediate=config.intermediate_size, kv_dim=kv * head_dim,
        vocab=config.vocab_size, linear_shapes=linears)


@dataclass
class MemoryPlan:
    rows: List[Tuple[str, float]]  # (what, bytes per GPU)
    gpu_memory: Optional[float] = None  # bytes, when given

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)

    @property
    def fits(self) -> Optional[bool]:
        # 10% kept for the CUDA context, allocator fragmentation and communication buffers
        return None if self.gpu_memory is None else self.total <= 0.9 * self.gpu_memory

    def table(self) -> str:
        width = max(len(w) for w, _ in self.rows) + 2
        lines = [f"  {what:<{width}s} {b / GIB:9.2f} GiB" for what, b in self.rows]
        lines.append(f"  {'total per GPU':<{width}s} {self.total / GIB:9.2f} GiB")
        if self.gpu_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {self.gpu_memory / GIB:.0f} GiB (90% usable)")
        return "\n".join(lines)


def _state_bytes(trainable: float, frozen: float, *, weight_bytes: int, gpus: int,
                 zero_stage: int) -> Tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per GPU for ``trainable`` and ``frozen``
    parameters under the ZeRO stage."""
    opt_bytes = 12 if weight_bytes == 2 else 8  # fp32 master copy + two moments, or moments
    weights = (trainable + frozen) * weight_bytes
    grads = trainable * weight_bytes
    opt = trainable * opt_bytes
    if zero_stage >= 1:
        opt /= gpus
    if zero_stage >= 2:
        grads /= gpus
    if zero_stage >= 3:
        weights /= gpus
    return weights, grads, opt


def layer_values(s: ModelShape) -> int:
    """Values a token that one decoder layer keeps for its backward."""
    return 7 * s.hidden + 2 * s.kv_dim + 4 * s.intermediate


def activation_bytes(s: ModelShape, tokens: int, *, weight_bytes: int,
                     checkpointing: bool) -> float:
    """One model's activations kept for the backward over ``tokens`` tokens: every layer's
    intermediates, or with checkpointing each layer's input alone."""
    kept = s.layers * s.hidden if checkpointing else s.layers * layer_values(s)
    return tokens * kept * weight_bytes


def head_bytes(s: ModelShape, tokens: int) -> float:
    """The fused log-prob head: the fp32 hidden rows it keeps for the backward."""
    return tokens * s.hidden * 4


def head_chunk_bytes(s: ModelShape, tokens: int, *, weight_bytes: int, device: str) -> float:
    """The fused head's logits chunk: its budget on ``device`` (``cuda`` or ``cpu``,
    :data:`dqo_kernels.logprobs.core.LINEAR_CHUNK_BYTES`), or all the logits when fewer."""
    from dqo_kernels.logprobs.core import LINEAR_CHUNK_BYTES

    return min(tokens * s.vocab * weight_bytes, LINEAR_CHUNK_BYTES[device])


def memory_plan(shape: ModelShape, *, gpus: int = 1, zero_stage: int = 2,
                micro_batch: int = 1, seq_len: int = 1024, weight_bytes: int = 2,
                lora_r: int = 0, lora_targets: str = LORA_ALL_LINEAR,
                value_backbone: str = "separate", checkpointing: bool = True,
                gpu_memory_gib: Optional[float] = None, device: str = "cuda") -> MemoryPlan:
    """The per-GPU memory of a DQO step (see the module docstring for what is counted);
    ``device="cpu"``: the same step on the CPU (the head's smaller chunk budget there)."""
    if value_backbone not in ("separate", "shared"):
        raise ValueError(f"value_backbone: expected 'separate' or 'shared', got "
                         f"{value_backbone!r}")
    if value_backbone == "shared" and lora_r == 0:
        raise ValueError("value_backbone: 'shared' needs LoRA (lora_r > 0): a fully trained "
                         "policy cannot share its weights with the value model")
    stage = dict(weight_bytes=weight_bytes, gpus=gpus, zero_stage=zero_stage)
    rows: List[Tuple[str, float]] = []
    head = shape.hidden + 1
    if lora_r:
        adapters = shape.lora_params(lora_r, lora_targets)
        w, g, o = _state_bytes(adapters, shape.params, **stage)
        rows += [("policy: frozen base weights + LoRA adapters", w),
                 (f"policy: adapter gradients + AdamW (r={lora_r})", g + o)]
        if value_backbone == "shared":
            _, g, o = _state_bytes(adapters + head, 0, **stage)
            rows.append(("value: its adapter + head on the shared base (state)",
                         (adapters + head) * weight_bytes + g + o))
        else:
            w, g, o = _state_bytes(adapters + head, shape.backbone_params, **stage)
            rows += [("value: a separate frozen backbone + adapter + head", w),
                     ("value: adapter gradients + AdamW", g + o)]
    else:
        w, g, o = _state_bytes(shape.params, 0, **stage)
        rows += [("policy: weights", w), ("policy: gradients", g), ("policy: AdamW state", o)]
        w, g, o = _state_bytes(shape.backbone_params + head, 0, **stage)
        rows += [("value: weights (a separate backbone + head)", w),
                 ("value: gradients + AdamW state", g + o)]
    tokens = micro_batch * seq_len
    act = activation_bytes(shape, tokens, weight_bytes=weight_bytes,
                           checkpointing=checkpointing)
    how = "with checkpointing" if checkpointing else "no checkpointing"
    rows.append((f"activations, policy + value ({tokens} tokens, {how})", 2 * act))
    if checkpointing:  # one layer recomputed at a time in the backward
        rows.append(("a layer's recomputed intermediates (transient)",
                     tokens * layer_values(shape) * weight_bytes))
    rows.append(("log-prob head: fp32 hidden rows + a logits chunk (transient)",
                 head_bytes(shape, tokens)
                 + head_chunk_bytes(shape, tokens, weight_bytes=weight_bytes, device=device)))
    return MemoryPlan(rows, None if gpu_memory_gib is None else gpu_memory_gib * GIB)


def load_config(model: str):
    """A model's config from its directory's ``config.json`` (or a Hub id's), no weights."""
    from transformers import AutoConfig

    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        return AutoConfig.for_model(**json.loads(path.read_text()))
    return AutoConfig.from_pretrained(model)


def main(argv=None) -> None:
    from .cli import run

    run(_main, argv, prog="python -m dqo.memory")


def print_plan(model: str, options, *, gpus: int, zero_stage: int, micro_batch: int,
               seq_len: int, weight_bytes: int, note: str = "") -> MemoryPlan:
    """The plan of ``model`` under ``options`` (a :class:`dqo.configs.MemoryConfig`), printed
    with a line saying what it assumes."""
    shape = shape_of(load_config(model))
    plan = memory_plan(shape, gpus=gpus, zero_stage=zero_stage, micro_batch=micro_batch,
                       seq_len=seq_len, weight_bytes=weight_bytes, **options.plan_options())
    print(f"memory plan of {model}: {shape.params / 1e9:.2f}B parameters "
          f"({shape.backbone_params / 1e9:.2f}B without the lm_head); {gpus} GPU(s), "
          f"{'ZeRO-%d' % zero_stage if zero_stage else 'no ZeRO'}, micro-batch {micro_batch} x "
          f"{seq_len} tokens{note}, {'bf16' if weight_bytes == 2 else 'fp32'}")
    print(plan.table())
    return plan


def _main(argv=None) -> None:
    from .cli import parse_config
    from .configs import PLAN_SECTIONS, MemoryPlanConfig

    a = parse_config(MemoryPlanConfig, PLAN_SECTIONS, argv, prog="python -m dqo.memory",
                     description=__doc__)
    print_plan(a.model, a, gpus=a.gpus, zero_stage=a.zero_stage, micro_batch=a.micro_batch,
               seq_len=a.seq_len, weight_bytes=4 if a.fp32 else 2)


if __name__ == "__main__":
    main()

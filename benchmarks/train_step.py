"""The DQO training step with each memory feature off and on: tokens/s and peak memory.

    python benchmarks/train_step.py                       # CPU, fp32, both vocabularies
    python benchmarks/train_step.py --quick               # one small configuration each

A Qwen2-shaped model small enough for a CPU (8 layers, hidden 512, GQA 8/2 heads; vocabulary
32k and 152k), policy + value model, DQO rows whose prompts are ~40% of the tokens and whose
response lengths spread like GSM8K samples. One optimizer step of the trainer (``dqo.algos``'
DQO step on the trainer's engines) is timed, median of several after a warm-up; the peak
memory is the process's high-water mark in a fresh process per configuration, less the same
process's resident memory before the models were built. The configurations:

- ``baseline``: full fine-tuning, no checkpointing, the head on every position (the code before
  the action-only head, restored here for the comparison);
- ``+head``: the log-prob head on action rows only (today's default);
- ``+ckpt``: and activation checkpointing of both models;
- ``+lora``: and LoRA r=16 on every linear layer (value model: a separate copy);
- ``+shared``: and the value model as a second adapter on the policy's frozen base.

``--padding`` measures instead how much of a step is padding, and what it costs: a step of
``--batch`` rows in micro-batches of ``--micro-batch``, in the data's order (``padded``), grouped
by length (``+group``, ``--group-by-length``), or with each micro-batch's real tokens packed into
one row (``+packing``, ``--packing``), with the ``+head`` model. ``tokens/s`` counts real tokens.

Results go to ``benchmarks/results/train-step-<tag>.json`` and ``.md`` (``--padding``:
``train-step-padding-<tag>``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = ("baseline", "+head", "+ckpt", "+lora", "+shared")
PADDING_CONFIGS = ("padded", "+group", "+packing")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def rows_like_gsm8k(n: int, vocab: int, seed: int = 0):
    """Token rows: a prompt ~40% of the tokens, a response of GSM8K-like length (lognormal
    around 150 tokens, 40-400)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        resp = int(torch.empty(1).log_normal_(5.0, 0.45, generator=g).clamp(40, 400))
        prompt = max(8, int(resp * 2 / 3))  # 40% of the row's tokens
        ids = torch.randint(3, vocab, (prompt + resp,), generator=g).tolist()
        out.append((ids[:prompt], ids[prompt:]))
    return out


def qwen2_model(vocab: int):
    """The benchmark's Qwen2-shaped policy (seeded): 8 layers, hidden 512, GQA 8/2 heads."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=512, intermediate_size=1376,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                      tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def gsm8k_examples(n: int, vocab: int):
    """DQO examples of :func:`rows_like_gsm8k`'s rows: the outcome reward on the last token."""
    from dqo.data import Example
    return [Example(p, r, [0.0] * (len(r) - 1) + [1.0], ref_logp=[-5.0] * len(r),
                    behavior_logp=[-5.0] * len(r)) for p, r in rows_like_gsm8k(n, vocab)]


def dqo_engines(policy_module, value, micro: int, grad_accum: int):
    from dqo.engine import OptimConfig, TorchEngine
    common = dict(grad_clip=1.0, total_steps=100, grad_accum=grad_accum, micro_batch=micro)
    engines = {"policy": TorchEngine(policy_module, OptimConfig(lr=1e-5, **common)),
               "value": TorchEngine(value, OptimConfig(lr=1e-4, **common))}
    for e in engines.values():
        e.train()
    return engines


def median_step_s(step, steps: int) -> float:
    """Median seconds of ``steps`` calls of ``step`` after one that warms up."""
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one(config: str, vocab: int, batch: int, steps: int) -> dict:
    """Time and peak of one configuration, in this (fresh) process."""
    import transformers  # noqa: F401  (in the baseline resident memory, as before the models)

    import dqo.modeling as modeling
    from dqo.algos.dqo import DQO
    from dqo.data import collate
    from dqo_kernels import action_targets, linear_logprobs, to_actions

    base_rss = rss_mib()
    policy = qwen2_model(vocab)
    if config == "baseline":  # the head on every position, as before the action-only head
        def all_rows(hidden, weight, input_ids, mask, **kw):
            return to_actions(linear_logprobs(hidden[:, :-1], weight,
                                              action_targets(input_ids, mask), **kw))
        modeling.action_logprobs = all_rows
    lora = config in ("+lora", "+shared")
    if lora:
        from dqo.lora import add_policy_adapter, lora_config
        policy = add_policy_adapter(policy, lora_config(16, 32, 0.0, "all-linear"))
    if config == "+shared":
        value = modeling.SharedValueModel(policy, lora_config(16, 32, 0.0, "all-linear"))
    else:
        value = modeling.ValueModel.from_policy(policy)
        if lora:
            import peft

            from dqo.lora import lora_config
            cfg_v = lora_config(16, 32, 0.0, "all-linear")
            cfg_v.task_type = None  # a backbone without an LM head
            value.backbone = peft.get_peft_model(value.backbone, cfg_v)
    if config not in ("baseline", "+head"):
        modeling.enable_checkpointing(policy)
        if config != "+shared":
            modeling.enable_checkpointing(value.backbone)
    engines = dqo_engines(modeling.PolicyLogprobs(policy), value, batch, 1)
    b = collate(gsm8k_examples(batch, vocab), pad_id=0)
    n_tokens = b.action_mask.sum().float()
    algo = DQO()
    step_s = median_step_s(lambda: algo.step(engines, b, n_tokens), steps)
    state = sum(p.numel() for e in engines.values() for p in e.params)
    return dict(config=config, vocab=vocab, batch=batch, tokens=int(b.attention_mask.sum()),
                action_tokens=int(n_tokens), prompt_share=1 - float(n_tokens) / float(
                    b.attention_mask.sum()),
                step_s=step_s, trainable_params=state,
                tokens_per_s=float(b.attention_mask.sum()) / step_s,
                peak_mib=hwm_mib() - base_rss)


def padding_one(config: str, vocab: int, batch: int, micro: int, steps: int) -> dict:
    """One optimizer step of ``batch`` rows in micro-batches, padded, grouped or packed."""
    import dqo.modeling as modeling
    from dqo.algos.dqo import DQO
    from dqo.data import collate
    from dqo.loop import padded_share, step_token_count

    policy = qwen2_model(vocab)
    value = modeling.ValueModel.from_policy(policy)
    packing = config == "+packing"
    value.packing = packing
    engines = dqo_engines(modeling.PolicyLogprobs(policy, packing=packing), value, micro,
                          batch // micro)
    exs = gsm8k_examples(batch, vocab)
    if config == "+group":  # as the loop's --group-by-length
        exs.sort(key=len)
    batches = [collate(exs[i:i + micro], pad_id=0) for i in range(0, batch, micro)]
    n_tokens = step_token_count(batches, batch // micro)
    algo = DQO()

    def step():
        for b in batches:
            algo.step(engines, b, n_tokens)

    step_s = median_step_s(step, steps)
    real = sum(int(b.attention_mask.sum()) for b in batches)
    return dict(config=config, vocab=vocab, batch=batch, micro_batch=micro, tokens=real,
                padded_share=0.0 if packing else padded_share(batches),
                layout_padded_share=padded_share(batches),
                step_s=step_s, tokens_per_s=real / step_s)


def against_base(results, base_config: str):
    """(row, its vocabulary's ``base_config`` row) for each result; None for a failed one."""
    base = {}
    for r in results:
        if "error" in r:
            yield r, None
            continue
        if r["config"] == base_config:
            base[r["vocab"]] = r
        yield r, base.get(r["vocab"], r)


def render_padding(results) -> str:
    lines = ["| vocab | config | padded share | tokens/s | x padded | padded x 1/(1 - share) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r, b in against_base(results, "padded"):
        if b is None:
            lines.append(f"| {r['vocab']} | {r['config']} | error | | | |")
            continue
        ideal = b["tokens_per_s"] / (1 - b["padded_share"])
        lines.append(f"| {r['vocab']} | {r['config']} | {r['padded_share']:.1%} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / b['tokens_per_s']:.2f} | "
                     f"{ideal:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="vocabulary 32k only, 2 steps")
    p.add_argument("--batch", type=int, default=8, help="rows a step")
    p.add_argument("--steps", type=int, default=3, help="timed steps a configuration")
    p.add_argument("--tag", default=time.strftime("cpu-%Y-%m-%d"))
    p.add_argument("--padding", action="store_true",
                   help="the padding configurations (padded, +group, +packing) instead")
    p.add_argument("--micro-batch", type=int, default=4, help="rows a micro-batch (--padding)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # CONFIG,VOCAB: run in this process
    a = p.parse_args(argv)
    if a.one:
        config, vocab = a.one.split(",")
        if config in PADDING_CONFIGS:
            print(json.dumps(padding_one(config, int(vocab), a.batch, a.micro_batch, a.steps)))
        else:
            print(json.dumps(one(config, int(vocab), a.batch, a.steps)))
        return
    vocabs = (32000,) if a.quick or a.padding else (32000, 151936)
    results = []
    for vocab in vocabs:
        for config in PADDING_CONFIGS if a.padding else CONFIGS:
            res = subprocess.run([sys.executable, __file__, "--one", f"{config},{vocab}",
                                  "--batch", str(a.batch), "--micro-batch", str(a.micro_batch),
                                  "--steps", str(2 if a.quick else a.steps)],
                                 capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(HERE.parent)})
            if res.returncode:
                results.append(dict(config=config, vocab=vocab, error=res.stderr[-500:]))
            else:
                results.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    out = HERE / "results" / f"train-step-{'padding-' if a.padding else ''}{a.tag}"
    command = " ".join(["python benchmarks/train_step.py", *(argv if argv is not None
                                                             else sys.argv[1:])])
    out.with_suffix(".json").write_text(json.dumps(dict(
        command=command, threads=__import__("torch").get_num_threads(), results=results),
        indent=1) + "\n")
    table = render_padding(results) if a.padding else render(results)
    out.with_suffix(".md").write_text(table)
    print(table)


def render(results) -> str:
    lines = ["| vocab | config | tokens/s | x baseline | peak MiB | x baseline | trainable |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r, b in against_base(results, "baseline"):
        if b is None:
            lines.append(f"| {r['vocab']} | {r['config']} | error | | | | |")
            continue
        lines.append(f"| {r['vocab']} | {r['config']} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / b['tokens_per_s']:.2f} | {r['peak_mib']:.0f} | "
                     f"{r['peak_mib'] / b['peak_mib']:.2f} | {r['trainable_params'] / 1e6:.1f}M |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""A DQO run's whole-process CPU memory peak beside its memory plan, measured in a process of
its own (run by tests/trainer/test_memory.py; ``python tests/trainer/memory_probe.py
'{"lora_r": 8}'`` prints one JSON line).

The peak is ``ru_maxrss`` when training ends (before ``final/`` is written) less the resident
memory at the baseline: the libraries imported and warmed up by one step of a tiny model (the
CPU's analogue of the CUDA context, which the plan leaves out), nothing of the run built yet.
So it counts what the run allocates: the models, the reference pass, two training steps
(AdamW's state exists from the first), as the plan does (fp32 weights on CPU, the torch engine:
no ZeRO)."""
import gc
import json
import resource
import sys


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(options: dict) -> dict:
    import torch
    import transformers  # noqa: F401  (imported before the baseline)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dqo import loop
    from dqo import memory as M
    from dqo.configs import TrainConfig
    from dqo.data.schema import Example
    from dqo.reference_logps import compute_ref_logps
    from dqo.runs import prepare_models
    from dqo.tokenizer import char_tokenizer

    torch.set_num_threads(1)
    tok = char_tokenizer()
    micro, seq = options.pop("micro_batch", 4), options.pop("seq_len", 256)

    def qwen2(vocab, hidden=256, inter=688, layers=4):
        return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                           num_hidden_layers=layers, num_attention_heads=8,
                           num_key_value_heads=2, tie_word_embeddings=False,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    cfg = qwen2(options.pop("vocab", 16384))
    args = TrainConfig(**{"engine": "torch", "batch_size": micro, "micro_batch": micro,
                          "max_steps": 2, "progress": False, "threads": 1,
                          "lora_dropout": 0.0, "gradient_checkpointing": False,
                          "out": options.pop("out"), **options})
    g = torch.Generator().manual_seed(0)
    prompt = seq // 4
    examples = [Example(prompt_ids=torch.randint(3, len(tok), (prompt,), generator=g).tolist(),
                        response_ids=torch.randint(3, len(tok), (seq - prompt,),
                                                   generator=g).tolist(),
                        rewards=[0.0] * (seq - prompt - 1) + [float(i % 2)])
                for i in range(2 * micro)]
    peaks = []
    real_save_final = loop.save_final

    def save_final(*a, **k):
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return real_save_final(*a, **k)

    loop.save_final = save_final

    def run(cfg, args, examples):
        torch.manual_seed(0)
        policy = Qwen2ForCausalLM(cfg)
        compute_ref_logps(policy, examples, tok.pad_token_id)
        policy, value = prepare_models(args, policy)
        loop.train(args, tok, policy, value, examples)

    warm_cfg = qwen2(512, hidden=32, inter=64, layers=1)
    warm_args = TrainConfig(**{**args.__dict__, "out": args.out + "-warm-up", "max_steps": 1})
    run(warm_cfg, warm_args, [Example(e.prompt_ids[:8], e.response_ids[:8], e.rewards[-8:])
                              for e in examples])
    gc.collect()
    base = rss_bytes()
    run(cfg, args, examples)
    peak = peaks[-1] - base
    plan = M.memory_plan(M.shape_of(cfg), micro_batch=micro, seq_len=seq, weight_bytes=4,
                         zero_stage=0, device="cpu", **args.plan_options())
    return {"measured": peak, "planned": plan.total, "rows": plan.rows}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))

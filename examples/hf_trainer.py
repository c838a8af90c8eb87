"""DQO in a ``transformers.Trainer``: ``dqo.hf.DQOTrainer`` with the fused loss, a collator that
keeps the reward and log-prob columns, and exact token-mean under gradient accumulation. No
download: a tiny model from a config and random rows; put your model and data in their place.

    python examples/hf_trainer.py [OUT_DIR]
"""
import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from dqo.hf import DQOCollator, DQOTrainer, PolicyWithValue
from dqo.modeling import ValueModel, policy_logprobs


def rows(n=16, seed=0):
    """Offline data: prompt + response ids, and the outcome reward of each response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = int(torch.randint(3, 7, (1,), generator=g)), int(torch.randint(4, 12, (1,),
                                                                               generator=g))
        out.append(dict(input_ids=torch.randint(1, 128, (p + r,), generator=g).tolist(),
                        prompt_length=p, reward=float(i % 3 == 0)))
    return out


def with_ref_logp(policy, data, collator):
    """The reference log-probs of every response token (the policy before training)."""
    with torch.no_grad():
        for row in data:
            n = len(row["input_ids"]) - row["prompt_length"]
            b = collator([dict(row, ref_logp=[0.0] * n)])
            logp = policy_logprobs(policy, b["input_ids"], b["attention_mask"], b["action_mask"])
            row["ref_logp"] = logp[b["action_mask"]].tolist()
    return data


def main(out_dir=None):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         pad_token_id=0)
    policy = LlamaForCausalLM(config)
    collator = DQOCollator(pad_token_id=0)
    data = with_ref_logp(policy, rows(), collator)
    args = TrainingArguments(output_dir=out_dir or tempfile.mkdtemp(), max_steps=3,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=1e-4, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True)
    trainer = DQOTrainer(model=PolicyWithValue(policy, ValueModel.from_policy(policy)),
                         args=args, train_dataset=data, data_collator=collator, beta=0.1)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

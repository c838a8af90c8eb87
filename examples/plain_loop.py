"""DQO in a plain PyTorch loop: a transformers causal LM, a value head beside it, and the fused
ops (log-probs straight from the lm_head input, then the DQO loss). No download: a tiny model
from a config and a random batch; put your model and your data in their place.

    python examples/plain_loop.py
"""
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dqo_kernels import action_logprobs, fused_dqo_loss, response_mask, to_actions

torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
policy = LlamaForCausalLM(config)
reference = copy.deepcopy(policy).requires_grad_(False)  # pi_ref: the policy at the start
value_backbone, value_head = copy.deepcopy(policy.model), torch.nn.Linear(64, 1)
params = [*policy.parameters(), *value_backbone.parameters(), *value_head.parameters()]
opt = torch.optim.AdamW(params, lr=1e-4)

# 4 responses after 5-token prompts, right-padded; reward 1 on the last token of the right ones
B, T = 4, 24
input_ids = torch.randint(0, 128, (B, T))
lengths = torch.tensor([24, 20, 16, 12])
attention_mask = (torch.arange(T) < lengths[:, None]).long()
mask = response_mask(attention_mask, prompt_lengths=torch.full((B,), 5))  # [B, T] actions
rewards = torch.zeros(B, T)
rewards[torch.arange(B), lengths - 1] = torch.tensor([1.0, 0.0, 1.0, 0.0])


def logprobs(model):  # [B, T] log pi(a_t | s_t) on the actions: no [B, T, V] logits
    hidden = model.model(input_ids, attention_mask=attention_mask).last_hidden_state
    return action_logprobs(hidden, model.lm_head.weight, input_ids, mask)


with torch.no_grad():
    ref_logp = logprobs(reference)  # in a real run: computed once over the data, offline
for step in range(5):
    hidden = value_backbone(input_ids, attention_mask=attention_mask).last_hidden_state
    values = to_actions(value_head(hidden[:, :-1]).squeeze(-1))  # V(s_t) on position t
    out = fused_dqo_loss(logprobs(policy), ref_logp, values, rewards, mask, beta=0.1, lam=0.95)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    print(f"step {step}: loss {out.loss.item():.4f}  kl {out.metrics['kl'].item():+.5f}  "
          f"value explained var {out.metrics['value_explained_var'].item():+.3f}")

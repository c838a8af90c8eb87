"""--packing and --group-by-length: the models run on the real tokens only (packed into one
row), or micro-batches of similar lengths, with the values and gradients of the padded batch."""
import json

import pytest
import torch
from test_loop import small_setup, train_args

from dqo import algos
from dqo.data import collate
from dqo.loop import padded_share, train
from dqo.modeling import ValueModel, policy_logprobs


def ragged_batch(tok, policy, padding, n=6):
    torch.manual_seed(3)
    exs = small_setup(tok, policy, n=8)[:n]
    return collate(exs, tok.pad_token_id, padding=padding)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_packed_forward_equals_padded(tok, policy, padding):
    b = ragged_batch(tok, policy, padding)
    assert padded_share([b]) > 0.05  # the batch is ragged: packing has padding to drop
    value = ValueModel.from_policy(policy)
    torch.nn.init.normal_(value.head.weight)
    outs = {}
    for packing in (False, True):
        policy.zero_grad()
        value.zero_grad()
        value.packing = packing
        logp = policy_logprobs(policy, b.input_ids, b.attention_mask, b.action_mask,
                               packing=packing)
        values, after = value(b.input_ids, b.attention_mask, with_after=True)
        (logp.sum() + (values * b.action_mask).sum()).backward()
        grads = [p.grad.clone() for p in list(policy.parameters()) + list(value.parameters())
                 if p.grad is not None]
        # off the real tokens the two differ (padding's states are never computed when
        # packed), and no loss reads them: values on actions, ``after`` on real tokens
        outs[packing] = (logp.detach(), values.detach() * b.action_mask,
                         after.detach() * b.attention_mask, grads)
    for a, c in zip(outs[False][:3], outs[True][:3]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    assert len(outs[False][3]) == len(outs[True][3])
    for a, c in zip(outs[False][3], outs[True][3]):
        torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-5)


def test_packed_forward_with_soft_capped_logits():
    """Gemma-2 style models go through their logits: the packed path reads them per sequence."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0,
        attn_implementation="eager")).eval()  # Gemma-2 has no sdpa path
    ids = torch.randint(1, 40, (3, 9))
    attn = torch.ones(3, 9, dtype=torch.long)
    attn[0, 6:] = 0
    attn[2, 4:] = 0
    act = attn.bool() & (torch.arange(9) >= 2)
    with torch.no_grad():
        a = policy_logprobs(model, ids, attn, act)
        b = policy_logprobs(model, ids, attn, act, packing=True)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (b[~act] == 0).all()


def test_group_by_length_keeps_the_step_and_packing_the_losses(tok, policy, tmp_path):
    exs = small_setup(tok, policy)
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    rows = {}
    for name, kw in (("plain", {}), ("grouped", dict(group_by_length=True)),
                     ("packed", dict(packing=True))):
        policy.load_state_dict(state)
        torch.manual_seed(0)
        args = train_args(tmp_path / name, max_steps=3)
        for k, v in kw.items():
            setattr(args, k, v)
        train(args, tok, policy, ValueModel.from_policy(policy), exs)
        rows[name] = [json.loads(x) for x in open(tmp_path / name / "run" / "metrics.jsonl")]
    plain, grouped, packed = rows["plain"], rows["grouped"], rows["packed"]
    # the first step starts from the same weights: the same rows, so the same loss, whatever
    # the micro-batches (token-mean over the step) and whether padding is computed
    for other in (grouped, packed):
        assert other[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-4)
        assert other[0]["num_tokens"] == plain[0]["num_tokens"]
    assert all(r["padded_share"] == 0.0 for r in packed)
    assert sum(r["padded_share"] for r in grouped) < sum(r["padded_share"] for r in plain)


def test_length_of_pairs_is_the_longest_row(tok, policy):
    exs = small_setup(tok, policy, n=8)[:2]
    assert algos.base.Algorithm.length(exs[0]) == len(exs[0])
    assert algos.base.Algorithm.length((exs[0], exs[1])) == max(len(exs[0]), len(exs[1]))


def test_an_attention_that_mixes_packed_sequences_is_refused(tok, policy):
    """check_packing compares the packed and padded forward once: an attention that ignored
    the restarting positions (simulated: the packed forward reads across rows) is an error."""
    from dqo.errors import UsageError
    from dqo.modeling import PolicyLogprobs, check_packing
    b = ragged_batch(tok, policy, "right")
    module = PolicyLogprobs(policy, packing=True)
    check_packing(module, module, b.input_ids, b.attention_mask, b.action_mask)  # sdpa: fine

    def mixing(ids, attn, act):
        logp = module(ids, attn, act)
        return logp + module.packing * logp.roll(1, dims=0)

    with pytest.raises(UsageError, match="--packing: this model's attention"):
        check_packing(module, mixing, b.input_ids, b.attention_mask, b.action_mask)
    assert module.packing  # restored


@pytest.mark.parametrize("algo", ["dpo", "kto", "dro"])
def test_packing_gives_every_algorithm_its_padded_first_step(tok, policy, tmp_path, algo):
    """Packing is a layout of the forward only: the pairwise and sequence-level losses see the
    padded batch's log-probs and values, so step 1 (same weights) has the padded loss."""
    exs = small_setup(tok, policy)
    for i, e in enumerate(exs):  # labels for the pairs (DPO) and desirable/undesirable (KTO)
        e.labelled_correct = bool(i % 2)
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    first = {}
    for packing in (False, True):
        policy.load_state_dict(state)
        torch.manual_seed(0)
        args = train_args(tmp_path / str(packing), algo=algo, max_steps=1, packing=packing,
                          batch_size=4, micro_batch=2)
        value = ValueModel.from_policy(policy) if algos.REGISTRY[algo].needs_value else None
        train(args, tok, policy, value, exs)
        first[packing] = json.loads(
            (tmp_path / str(packing) / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first[True]["loss"] == pytest.approx(first[False]["loss"], rel=1e-4, abs=1e-6)

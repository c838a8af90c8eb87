"""dqo.generation: behaviour log-probs recorded while sampling, the chat template, process
rewards; the value model's alignment with the policy's log-probs."""

import pytest
import torch

from dqo import data as D
from dqo.decoding import DecodingConfig, format_prompt
from dqo.generation import (
    PROCESS_REWARD_TOTAL,
    exact_process_scores,
    generate,
    label_samples,
    with_step_rewards,
)
from dqo.modeling import ValueModel, policy_logprobs
from dqo.tasks import arithmetic, get_verifier
from dqo.tokenizer import char_tokenizer


def dec(max_new_tokens: int) -> DecodingConfig:
    return DecodingConfig(max_new_tokens=max_new_tokens)


def test_sampled_behavior_logp_equals_training_logprobs(tok, policy):
    """The log-probs recorded while sampling (left-padded generate) are the ones the trainer
    computes for the same tokens (right- or left-padded batches): alignment and positions."""
    probs = arithmetic.make_problems(4, 0)
    torch.manual_seed(1)
    samples = generate(policy, tok, [p.prompt for p in probs], n=2, decoding=dec(12))
    rows = label_samples([p.prompt for p in probs], [p.answer for p in probs], samples,
                         get_verifier("arithmetic"))
    assert any(not r["finished"] for r in rows)  # a random model: some hit the limit
    for padding in ("right", "left"):
        exs = [D.tokenize_row(D.check_row(r, "x"), tok) for r in rows]
        assert [e.response_ids for e in exs] == [r["response_ids"] for r in rows]  # no EOS added
        b = D.collate(exs, tok.pad_token_id, padding=padding)
        with torch.no_grad():
            lp = policy_logprobs(policy, b.input_ids, b.attention_mask, b.action_mask)
        m = b.action_mask  # every action was sampled: every behaviour log-prob is a real one
        torch.testing.assert_close(lp[m], b.behavior_logp[m], rtol=1e-4, atol=1e-4)


def test_value_model_alignment(tok, policy):
    value = ValueModel.from_policy(policy)
    torch.nn.init.normal_(value.head.weight)
    ids = torch.tensor([tok("Q: 1+2=?\n1+2=3")["input_ids"]])
    attn = torch.ones_like(ids)
    v = value(ids, attn)
    assert v.shape == ids.shape and v[0, 0] == 0
    with torch.no_grad():
        h = value.backbone(input_ids=ids, attention_mask=attn).last_hidden_state
    torch.testing.assert_close(v[0, 1:], value.head(h[0, :-1]).squeeze(-1))


def test_exact_process_scores():
    p = arithmetic.Problem(7, (("+", 3), ("*", 2)))
    labels = lambda pr, r: arithmetic.step_labels(arithmetic.parse_prompt(pr), r)  # noqa: E731
    rows = [dict(prompt=p.prompt, response="7+3=10\n10*2=21\n#### 21", reward=0.0),
            dict(prompt=p.prompt, response=p.solution, reward=1.0)]
    out = exact_process_scores(rows, labels, total=0.6)
    assert out[0]["step_rewards"] == pytest.approx([0.2, 0.0, 0.0])  # 0.6 / 3 steps
    assert "steps" not in out[1]
    # a blank line is no step: it earns nothing and does not count in K
    blank = dict(prompt=p.prompt, response="7+3=10\n\n10*2=21\n#### 21", reward=0.0)
    out = exact_process_scores([blank], labels, total=0.6)
    assert out[0]["steps"] == blank["response"].split("\n")
    assert out[0]["step_rewards"] == pytest.approx([0.2, 0.0, 0.0, 0.0])


def test_process_rewards_never_reach_a_correct_answers_reward():
    """However long a failed response and however many of its steps are right, its step
    rewards sum to less than ``total`` < 1 (they used to reach 1.2 on 13 lines)."""
    long = "\n".join(["1+1=2", ""] * 12 + ["#### 3"])  # 13 steps, blank lines between
    row = dict(prompt="Q", response=long, reward=0.0)
    for k in (0, 5, 12):
        r = with_step_rewards(row, k)
        assert len(r["step_rewards"]) == len(long.split("\n"))
        assert sum(r["step_rewards"]) == pytest.approx(PROCESS_REWARD_TOTAL * k / 13)
        assert sum(r["step_rewards"]) < PROCESS_REWARD_TOTAL < 1.0
    with pytest.raises(ValueError, match=r"total: expected a value in \[0, 1\)"):
        with_step_rewards(row, 1, total=1.0)


def test_chat_template_wraps_prompts_in_data_and_sampling(policy):
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}Q{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}#{% endif %}")
    assert format_prompt(tok, "1+2=?") == "Q1+2=?#"
    ex = D.tokenize_row(D.check_row({"prompt": "1+2=?", "response": "3", "reward": 1}, "x"), tok)
    assert tok.decode(ex.prompt_ids) == "Q1+2=?#"
    assert ex.response_ids == tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # sampling conditions on the same wrapped prompt: greedy continuation of it == generate
    (s,), = generate(policy, tok, ["1+2=?"], greedy=True, decoding=dec(3))
    ids = torch.tensor([tok("Q1+2=?#", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        manual = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=3,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert s.ids == [t for t in manual[0, ids.shape[1]:].tolist()][:len(s.ids)]


@pytest.mark.parametrize("peft_wrapped", [False, True])
def test_behaviour_logprobs_read_step_by_step_keep_no_logits(tok, policy, peft_wrapped):
    """Sampling reads each step's log-prob as it goes: generate keeps no logits (memory flat in
    the response length), and the log-probs are the ones generate's kept logits would give,
    through a peft wrapper too (the hook sits on the transformers model it wraps)."""
    from dqo.generation.hf import StepLogprobs
    from dqo_kernels import token_logprobs
    decoding = DecodingConfig(max_new_tokens=10, temperature=0.8).with_stop_ids(tok, policy)
    assert not decoding.generation_config(tok).output_logits
    model = policy
    if peft_wrapped:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(policy, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ids = torch.tensor([tok("1+2=", add_special_tokens=False)["input_ids"]] * 3)
    cfg = decoding.generation_config(tok)
    cfg.output_logits = True  # the old way, as the oracle
    torch.manual_seed(0)
    reader = StepLogprobs(model, 0.8)
    with torch.no_grad():
        res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=cfg)
    new = res.sequences[:, ids.shape[1]:]
    got = reader.finish(new)
    kept = torch.stack([token_logprobs(step.float(), new[:, j], temperature=0.8)
                        for j, step in enumerate(res.logits)], 1)
    assert got.shape == new.shape
    torch.testing.assert_close(got, kept, rtol=0, atol=0)
    assert reader.last is None and not reader.handle.hooks_dict_ref()  # nothing left behind


def test_zero3_generation_keeps_the_ranks_in_step(tok, policy, monkeypatch):
    """Under ZeRO-3 every forward gathers weights collectively: generate must run with
    synced_gpus (else a rank whose batch ends first stops calling the forward, and the others
    hang); a plain model does not."""
    from dqo.generation import hf as G
    seen = []
    real = policy.generate

    def spy(*a, **k):
        seen.append(k.get("synced_gpus", False))
        return real(*a, **{key: v for key, v in k.items() if key != "synced_gpus"})

    monkeypatch.setattr(policy, "generate", spy)
    generate(policy, tok, ["1+2="], decoding=dec(3), greedy=True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert not G.zero3_partitioned(policy)
    first = next(policy.parameters())
    monkeypatch.setattr(first, "ds_id", 0, raising=False)
    assert G.zero3_partitioned(policy)
    generate(policy, tok, ["1+2="], decoding=dec(3), greedy=True)
    assert seen == [False, True]

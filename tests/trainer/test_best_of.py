"""Best-of-N reranking (dqo.reranking) and dqo.evaluate --best-of / --value."""
import json

import pytest
import torch
from hf_tiny import train_tiny_run

from dqo import reranking
from dqo.errors import UsageError
from dqo.generation.types import Sample
from dqo.modeling import ValueModel, policy_logprobs
from dqo.tasks import arithmetic


def test_picks_follow_their_rule():
    scores = [[0.1, 0.9, 0.9], [-1.0, -2.0]]
    assert reranking.picks("value", scores=scores) == [1, 0]  # ties: the first drawn
    answers = [["3", None, "4", "4", "3"], [None, None], ["7"]]
    assert reranking.picks("majority", answers=answers) == [0, 0, 0]
    answers = [["3", "4", "4"]]
    assert reranking.picks("majority", answers=answers) == [1]
    sizes = [5, 3, 8] * 20
    a = reranking.picks("random", sizes=sizes, seed=3)
    assert a == reranking.picks("random", sizes=sizes, seed=3)
    assert a != reranking.picks("random", sizes=sizes, seed=4)
    assert all(0 <= k < n for k, n in zip(a, sizes)) and len(set(a)) > 2
    with pytest.raises(ValueError, match="rule: expected one of"):
        reranking.picks("best")


def test_answers_vote_by_value_as_the_checker_reads_them():
    ex = reranking.answer_extractor("gsm8k")
    assert ex("so\n#### 3.50") == ex("#### 7/2") == ex("#### $3.5") != ex("#### 3")
    assert ex("no answer") is None
    assert reranking.answer_extractor("math")("hence \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert reranking.answer_extractor("gsm8k-flexible")("it is 1,000.") == "1000"
    assert reranking.answer_extractor(None)("a\nThe answer:  B \n\n") == "The answer: B"


def test_best_of_n_accuracies_from_the_same_samples():
    g = torch.Generator().manual_seed(0)
    right = [[bool(x) for x in torch.rand(6, generator=g) < 0.4] for _ in range(50)]
    perfect = [[float(r) for r in rr] for rr in right]  # a critic that knows the outcome
    inverse = [[-v for v in vs] for vs in perfect]
    answers = [["right" if r else f"w{k % 2}" for k, r in enumerate(rr)] for rr in right]
    res = reranking.best_of_n(right, rules=("value", "q", "majority", "random"), values=perfect,
                              returns=inverse, answers=answers, resamples=200)
    oracle = sum(any(r) for r in right) / len(right)
    assert res["oracle"]["acc"] == pytest.approx(oracle)
    assert res["value"]["acc"] == pytest.approx(oracle)  # it picks a right one where one exists
    assert res["q"]["acc"] == pytest.approx(sum(all(r) for r in right) / len(right))
    assert res["mean"]["acc"] == pytest.approx(sum(map(sum, right)) / (6 * len(right)))
    want = [float(sum(rr) >= max(sum(not r and k % 2 == j for k, r in enumerate(rr))
                                 for j in (0, 1)) and any(rr)) for rr in right]
    # majority: "right" wins unless a wrong answer is more common (ties: the first drawn)
    assert 0 < res["majority"]["acc"] <= oracle and res["majority"]["acc"] <= sum(want) / 50 + 0.1
    for name, fig in res.items():
        lo, hi = fig["ci"]
        assert lo <= fig["acc"] <= hi, name
        assert len(fig["items"]) == len(right)
    assert res["value"]["minus_mean"] == pytest.approx(oracle - res["mean"]["acc"])
    assert res["value"]["minus_mean_ci"][0] > 0 and "minus_mean" in res["random"]
    with pytest.raises(ValueError, match="'value' needs values"):
        reranking.best_of_n(right, rules=("value",))
    with pytest.raises(ValueError, match="expected at least one sample"):
        reranking.best_of_n([[True], []], rules=("random",))


def _samples(tok, problems):
    """Two samples a problem: a finished right one and a cut one, different lengths."""
    eos = tok.eos_token_id
    out = []
    for p in problems:
        right = p.solution
        ids = tok(right, add_special_tokens=False)["input_ids"] + [eos]
        cut = tok("1+1=2\n2", add_special_tokens=False)["input_ids"]
        out.append([Sample(right, ids, [0.0] * len(ids), True),
                    Sample("1+1=2\n2", cut, [0.0] * len(cut), False)])
    return out


def test_final_values_and_implied_returns_match_one_sequence_at_a_time(tok, policy):
    from dqo.decoding import encode_prompt
    from dqo.modeling import build_policy, tiny_config
    torch.manual_seed(1)
    reference = build_policy(tiny_config(tok, hidden_size=32, layers=2, heads=2))
    value = ValueModel.from_policy(policy)
    torch.nn.init.normal_(value.head.weight, std=0.5)
    problems = arithmetic.make_problems(3, 2)
    prompts = [p.prompt for p in problems]
    samples = _samples(tok, problems)
    v = reranking.final_values(value, tok, prompts, samples, batch_size=4)
    q = reranking.implied_returns(policy, reference, tok, prompts, samples, beta=0.5,
                                  batch_size=4)
    for prompt, ss, vs, qs in zip(prompts, samples, v, q):
        for s, got_v, got_q in zip(ss, vs, qs):
            p = encode_prompt(tok, prompt)
            ids = torch.tensor([p + s.ids])
            attn = torch.ones_like(ids)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(p):] = True
            with torch.no_grad():
                values, after = value(ids, attn, with_after=True)
                lr = policy_logprobs(policy, ids, attn, mask) - policy_logprobs(
                    reference, ids, attn, mask)
            # finished: the state its stop token is chosen in; cut: the state after it
            want = float(values[0, -1]) if s.finished else float(after[0, -1])
            assert got_v == pytest.approx(want, abs=1e-5)
            assert got_q == pytest.approx(0.5 * float(lr.sum()), abs=1e-4)


@pytest.fixture(scope="module")
def trained_run(tok, tmp_path_factory):
    """A run with LoRA and the value model on the policy's base (an adapter of its own)."""
    pytest.importorskip("peft")
    _, prompts, out = train_tiny_run(tok, tmp_path_factory.mktemp("run"), 6, "--lora-r", "2",
                                     "--value-backbone", "shared")
    return out, prompts


def test_evaluate_best_of_reranks_and_measures_the_critic(trained_run, capsys):
    from dqo import evaluate
    out, prompts = trained_run
    value_dir = out / "final" / "value"
    assert json.loads((value_dir / "value_model.json").read_text())["backbone"] == "shared"
    capsys.readouterr()
    evaluate.main(["--model", str(out / "final" / "policy"), "--data", str(prompts),
                   "--task", "arithmetic", "--samples", "2", "--max-new-tokens", "8",
                   "--best-of", "8", "--rerank", "value,q,majority,random",
                   "--value", str(value_dir)])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    crit = res["critic"]
    assert crit["n"] == 8
    assert set(crit["best_of"]) == {"value", "q", "majority", "random", "mean", "oracle"}
    for name, fig in crit["best_of"].items():
        assert 0 <= fig["ci"][0] <= fig["acc"] <= fig["ci"][1] <= 1, name
        assert fig["acc"] <= crit["best_of"]["oracle"]["acc"]
    proc = crit["process"]
    assert proc["problems"] == 6 and proc["responses"] == 48
    assert "outcome_auc" in proc  # NaN when every sample is wrong: a tiny random model


def test_shared_value_loads_as_trained(trained_run, tok):
    """ValueModel.from_pretrained on a shared-base value adapter gives the values the
    trained SharedValueModel gave (its base with the value adapter merged in)."""
    out, _ = trained_run
    value = ValueModel.from_pretrained(out / "final" / "value").eval()
    base = ValueModel.from_pretrained(out.parent / "base").eval()  # the base alone, a new head
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        got = value.backbone(input_ids=ids).last_hidden_state
        plain = base.backbone(input_ids=ids).last_hidden_state
    head = torch.load(out / "final" / "value" / "value_head.pt", weights_only=True)
    torch.testing.assert_close(value.head.weight, head["weight"])
    assert not torch.allclose(got, plain, atol=1e-6)  # the adapter is in (lr 1e-2, 2 steps)


def test_evaluate_options_say_what_is_missing(trained_run, tmp_path, capsys):
    from dqo import evaluate
    out, prompts = trained_run
    model = ["--model", str(out / "final" / "policy"), "--data", str(prompts), "--task",
             "arithmetic"]
    for extra, msg in ((["--best-of", "1"], "--best-of: expected 0"),
                       (["--best-of", "4", "--rerank", "value"], "needs --value"),
                       (["--best-of", "4", "--rerank", "best"], "--rerank: expected"),
                       (["--rerank", "random"], "expected --best-of")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(model + extra)
        assert e.value.code == 2 and msg in capsys.readouterr().err
    import shutil
    alone = tmp_path / "policy"
    shutil.copytree(out / "final" / "policy", alone)
    plain = ["--model", str(alone), "--data", str(prompts), "--task", "arithmetic",
             "--samples", "0", "--max-new-tokens", "4", "--best-of", "2"]
    with pytest.raises(UsageError, match="--reference: --rerank q needs"):
        evaluate._main(plain + ["--rerank", "q,random"])
    capsys.readouterr()
    evaluate._main(plain)  # by default, the rules the models given allow: no reference, no q
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res["critic"]["best_of"]) == {"majority", "random", "mean", "oracle"}
    with pytest.raises(UsageError, match="--value: "):
        evaluate._main(plain + ["--value", str(tmp_path / "missing")])
    with pytest.raises(UsageError, match="need --engine hf"):
        evaluate._main(plain + ["--engine", "vllm"])

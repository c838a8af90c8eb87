"""python -m dqo.score: a response step by step under the learned value (the paper's Table 2)."""
import json

import pytest
import torch

from dqo import score as score_cli
from dqo.data import check_row, tokenize_row
from dqo.errors import UsageError
from dqo.modeling import ValueModel, policy_logprobs
from dqo.scoring import score_response
from dqo.tasks import arithmetic


@pytest.fixture
def models(tok, policy, tmp_path):
    """A policy, a reference (another random model) and a value model with a random head,
    saved as a run would save them."""
    from dqo.modeling import build_policy, tiny_config
    torch.manual_seed(1)
    reference = build_policy(tiny_config(tok, hidden_size=32, layers=2, heads=2))
    value = ValueModel.from_policy(policy)
    torch.nn.init.normal_(value.head.weight, std=0.5)
    torch.nn.init.constant_(value.head.bias, 0.3)
    for name, model in (("policy", policy), ("reference", reference)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    value.save_pretrained(tmp_path / "value")
    return policy, reference, value


def example(tok, i=0, correct=False):
    problem = arithmetic.make_problems(3, 4)[i]
    text = problem.solution if correct else problem.solution.replace("=", "=1", 1)
    row = check_row(dict(prompt=problem.prompt, response=text, reward=float(correct)), "t")
    return problem, text, tokenize_row(row, tok)


@pytest.mark.parametrize("finished", [True, False])
def test_advantages_telescope_to_the_kl_regularised_return(tok, models, finished):
    """With gamma = 1 the steps' advantages add up to sum_t (r_t - beta l_t) + V_end - V(s_0):
    the per-step split loses nothing and double-counts nothing (V_end = 0 when finished)."""
    policy, reference, value = models
    problem, text, ex = example(tok)
    ids = ex.response_ids if finished else ex.response_ids[:-1]
    rewards = [0.0] * (len(ids) - 1) + [0.7]
    steps = score_response(policy, reference, value, tok, problem.prompt, ids, text=text,
                           rewards=rewards, finished=finished, beta=0.3)
    assert [s.text for s in steps] == text.split("\n")
    assert sum(s.tokens for s in steps) == len(ids)
    full = torch.tensor([ex.prompt_ids + list(ids)])
    attn, mask = torch.ones_like(full), torch.zeros_like(full, dtype=torch.bool)
    mask[0, len(ex.prompt_ids):] = True
    with torch.no_grad():
        lr = (policy_logprobs(policy, full, attn, mask)
              - policy_logprobs(reference, full, attn, mask))[0, len(ex.prompt_ids):]
        values, after = value(full, attn, with_after=True)
    v0 = float(values[0, len(ex.prompt_ids)])
    v_end = 0.0 if finished else float(after[0, -1])
    expected = sum(rewards) - 0.3 * float(lr.sum()) + v_end - v0
    assert sum(s.advantage for s in steps) == pytest.approx(expected, abs=1e-5)
    assert steps[0].value_before == pytest.approx(v0, abs=1e-6)
    assert steps[-1].value_after == pytest.approx(v_end, abs=1e-6)
    assert sum(s.likely_first_error for s in steps) == 1
    worst = min((s for s in steps if s.tokens and s.text.strip()), key=lambda s: s.drop)
    assert worst.likely_first_error
    # the critic's reading: V after minus V before, the last step read to V(s_T), never to the
    # terminal 0 that the outcome brings
    read_after = [s.value_after for s in steps[:-1]] + [
        float(values[0, -1]) if finished else v_end]
    for s, a in zip(steps, read_after):
        assert s.drop == pytest.approx(a - s.value_before, abs=1e-5)


def test_command_line_table_json_and_html(tok, models, tmp_path, capsys):
    problem, text, _ = example(tok, correct=False)
    common = ["--policy", str(tmp_path / "policy"), "--value", str(tmp_path / "value"),
              "--reference", str(tmp_path / "reference"), "--beta", "0.2"]
    score_cli.main([*common, "--prompt", problem.prompt, "--response", text,
                    "--html", str(tmp_path / "steps.html")])
    out = capsys.readouterr().out
    assert "likely first error" in out and "advantage" in out
    assert out.count("wrong") >= 1  # the synthetic task's exact labels: step 1 is wrong
    page = (tmp_path / "steps.html").read_text()
    assert page.count("<tr>") == len(text.split("\n")) + 1 and "&#9888;" in page
    rows = [check_row(dict(prompt=p.prompt, response=p.solution, reward=1.0), "r")
            for p in arithmetic.make_problems(3, 4)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "response", "reward")})
                            + "\n" for r in rows))
    score_cli.main([*common, "--data", str(data), "--limit", "2", "--json"])
    scored = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(scored) == 2 and all(s["outcome"] == 1.0 for s in scored)
    assert all(all(step["label"] for step in s["steps"]) for s in scored)  # right solutions


def test_options_say_what_is_missing(tmp_path):
    with pytest.raises(SystemExit):  # a UsageError at the command line: exit 2, one line
        score_cli.main(["--prompt", "x", "--response", "y"])
    from dqo.configs import ScoreConfig
    with pytest.raises(UsageError, match="--run: expected a run directory"):
        ScoreConfig(prompt="x", response="y")
    with pytest.raises(UsageError, match="--data: expected either"):
        ScoreConfig(run="r")
    with pytest.raises(UsageError, match="--response: expected"):
        ScoreConfig(run="r", prompt="x")


def test_a_trailing_blank_line_leaves_the_stop_token_with_the_last_step(tok, models):
    policy, reference, value = models
    problem, text, _ = example(tok, correct=True)
    text += "\n"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    steps = score_response(policy, reference, value, tok, problem.prompt, ids, text=text)
    assert steps[-1].text == "" and steps[-1].tokens == 0
    assert sum(s.tokens for s in steps) == len(ids)
    # the last line with text ends on the stop token: its V after is the terminal 0 and its
    # drop is read to the state the stop token is chosen in
    assert steps[-2].value_after == 0.0 and steps[-2].drop != -steps[-2].value_before


def test_html_tokens_colour_every_token_with_its_value(tok, models, tmp_path):
    policy, reference, value = models
    problem, text, ex = example(tok)
    steps = score_response(policy, reference, value, tok, problem.prompt, ex.response_ids,
                           text=text)
    for s in steps:
        assert len(s.token_values) == s.tokens
        if s.tokens:  # the tokens' changes add up to the step's drop
            assert sum(d for _, _, d in s.token_values) == pytest.approx(s.drop, abs=1e-5)
            assert s.token_values[-1][1] == pytest.approx(s.value_before + s.drop, abs=1e-5)
    from dqo.scoring import as_rows, html_page
    page = html_page([dict(prompt=problem.prompt, steps=as_rows(steps))], tokens=True)
    assert page.count("<span title='V ") == len(ex.response_ids)
    with pytest.raises(SystemExit):
        score_cli.main(["--policy", str(tmp_path / "policy"), "--value", str(tmp_path / "value"),
                        "--reference", str(tmp_path / "reference"), "--prompt", "Q",
                        "--response", "1", "--html-tokens"])

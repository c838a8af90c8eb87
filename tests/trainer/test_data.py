"""dqo.data: rows -> examples (rewards on the right tokens) -> batches; bad rows named."""
import json

import pytest
import torch

from dqo import data as D


def test_tokenize_places_rewards_on_last_response_token_and_step_ends(tok):
    row = D.check_row({"prompt": "Q: 1+2=?\n", "steps": ["1+2=3", "#### 3"],
                       "step_rewards": [0.25, 0.5], "reward": 1.0}, "x:1")
    ex = D.tokenize_row(row, tok)
    assert tok.decode(ex.prompt_ids) == "Q: 1+2=?\n"
    assert ex.response_ids[-1] == tok.eos_token_id
    assert len(ex.response_ids) == len("1+2=3\n#### 3") + 1
    expected = [0.0] * len(ex.response_ids)
    expected[len("1+2=3") - 1] = 0.25  # last token of step 1
    expected[len("1+2=3\n#### 3") - 1] = 0.5  # last token of step 2
    expected[-1] = 1.0  # outcome reward on EOS
    assert ex.rewards == expected


def test_step_rewards_with_empty_steps_and_sampled_ids(tok):
    steps = ["", "1+2=3", "", "#### 3"]
    ids = tok("\n1+2=3\n\n#### 3", add_special_tokens=False)["input_ids"]
    row = D.check_row({"prompt": "Q", "steps": steps, "step_rewards": [1.0, 2.0, 3.0, 4.0],
                       "reward": 10.0, "response_ids": ids}, "x:1")
    ex = D.tokenize_row(row, tok)
    r = ex.rewards
    # sampled ids without a stop token: a cut response, trained on exactly those ids
    assert ex.response_ids == ids and not ex.finished
    assert r[0] == 1.0  # the empty first step borrows the first token
    assert r[len("\n1+2=3") - 1] == 2.0
    assert r[len("\n1+2=3\n") - 1] == 3.0  # the empty third step borrows the newline before it
    assert r[-1] == 4.0 + 10.0  # the last step's end is the last token: outcome reward too
    assert sum(r) == 20.0


@pytest.mark.parametrize("padding", ["right", "left"])
def test_collate_masks_rewards_and_padding(tok, padding):
    rows = [{"prompt": "Q: 1+2=?\n", "response": "#### 3", "reward": 1.0},
            {"prompt": "Q: 12*3-4=?\n", "response": "12*3=36\n36-4=32\n#### 32", "reward": 0.0}]
    exs = [D.tokenize_row(D.check_row(r, "x"), tok) for r in rows]
    b = D.collate(exs, tok.pad_token_id, padding=padding)
    T = max(len(e) for e in exs)
    assert b.input_ids.shape == (2, T)
    for i, e in enumerate(exs):
        ids = b.input_ids[i][b.attention_mask[i].bool()].tolist()
        assert ids == e.prompt_ids + e.response_ids
        resp = b.input_ids[i][b.action_mask[i]].tolist()
        assert resp == e.response_ids
        last = torch.nonzero(b.action_mask[i])[-1].item()
        assert b.rewards[i, last] == rows[i]["reward"]
        assert b.rewards[i][~b.action_mask[i]].abs().sum() == 0
        if padding == "left":
            assert b.attention_mask[i, -1] == 1
        else:
            assert b.attention_mask[i, 0] == 1
    assert b.behavior_logp is None


def test_bad_rows_are_reported_with_line_numbers(tmp_path, caplog):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([
        json.dumps({"prompt": "Q: 1+1=?\n", "response": "#### 2", "reward": 1}),
        "{not json",
        json.dumps({"prompt": "Q", "response": "x"}),  # no reward
        json.dumps({"prompt": "Q", "response": "x", "reward": float("nan")}),
        json.dumps({"prompt": "Q", "steps": ["a", "b"], "step_rewards": [1], "reward": 0}),
        json.dumps({"prompt": "Q", "response": "ab", "reward": 0,
                    "response_ids": [4, 5], "behavior_logp": [-0.1]}),
        json.dumps({"prompt": "Q: 2+2=?\n", "steps": ["2+2=4", "#### 4"], "reward": 1}),
    ]) + "\n")
    rows, errors = D.read_jsonl(p)
    assert [r["_source"] for r in rows] == [f"{p}:1", f"{p}:7"]
    assert len(errors) == 5
    for line, msg in zip((2, 3, 4, 5, 6), ("invalid JSON", "missing required field 'reward'",
                                           "'reward' must be a finite number",
                                           "'step_rewards' must be 2 finite numbers",
                                           "'behavior_logp' has 1 entries")):
        assert any(e.startswith(f"{p}:{line}: ") and msg in e for e in errors), (line, errors)
    assert "5 of 7 rows skipped" in caplog.text
    with pytest.raises(D.DataError, match=rf"{p}:2: invalid JSON"):
        D.read_jsonl(p, strict=True)


def test_read_prompts_names_the_bad_line(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "1+1=?", "answer": "2"}\n\n{"prompt": "2+2=?", "answer": 4}\n')
    assert D.read_prompts(p) == (["1+1=?", "2+2=?"], ["2", "4"])
    p.write_text('{"prompt": "1+1=?", "answer": "2"}\n{"prompt": "x"}\n')
    with pytest.raises(D.DataError, match=rf"{p}:2: no answer column \(answer, solution\); "
                                          r"found \['prompt'\]; name it with --answer-column"):
        D.read_prompts(p)
    p.write_text('\n{"prompt": "1+1=?",\n')
    with pytest.raises(D.DataError, match=rf"{p}:2: invalid JSON"):
        D.read_prompts(p)


def test_behavior_logp_length_must_match_tokens(tok):
    row = D.check_row({"prompt": "Q", "response": "12", "reward": 0,
                       "behavior_logp": [-0.1]}, "f:3")
    with pytest.raises(D.DataError, match=r"f:3: 'behavior_logp' has 1 entries but the "
                                          r"response has 3 tokens"):
        D.tokenize_row(row, tok)

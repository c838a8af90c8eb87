"""The replication's --quick mode runs every method and writes its table, data and plot."""
import json

from dqo.experiments import replicate


def test_replicate_quick(tmp_path, capsys):
    replicate.main(["--quick", "--out", str(tmp_path)])
    table = (tmp_path / "replication.md").read_text()
    for m in replicate.METHODS:
        assert f"| {m.name} |" in table
    assert (tmp_path / "replication.png").stat().st_size > 10_000
    res = json.loads((tmp_path / "replication.json").read_text())
    assert {r["method"] for r in res["runs"]} == {"Base (SFT warm-up)"} | {
        m.name for m in replicate.METHODS}
    assert set(res["values"]) == {"DQO", "DQO + process scores (exact labels)"}
    assert "python -m dqo.experiments.replicate --quick" in table


class PairTokenizer:
    """Two characters a token, so that tokens and characters disagree."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        pieces = [text[i:i + 2] for i in range(0, len(text), 2)]
        return {"input_ids": [self.vocab.setdefault(p, len(self.vocab)) for p in pieces]}

    def decode(self, ids, skip_special_tokens=True):
        inv = {i: p for p, i in self.vocab.items()}
        return "".join(inv[i] for i in ids)


def test_step_values_follow_tokens_and_skip_blank_lines():
    import torch

    from dqo.tasks import arithmetic

    prob = arithmetic.Problem(7, (("+", 3), ("*", 2), ("-", 5)))
    text = "7+3=10\n\n10*2=21\n21-5=16\n#### 16"
    tok = PairTokenizer()
    n_prompt = len(tok(prob.prompt)["input_ids"])
    response_ids = tok(text)["input_ids"]

    def position_value(ids, mask):  # V = the position, so each row shows where it was read
        return torch.arange(ids.shape[1], dtype=torch.float32)[None]

    rows = replicate.step_values(position_value, tok, prob, text, response_ids)
    lines = text.split("\n")
    last_char = [sum(len(x) + 1 for x in lines[:i + 1]) - 2 for i in range(len(lines))]
    expect = [dict(step=1, correct=True, value=n_prompt + last_char[0] // 2 + 1),
              dict(step=2, correct=False, value=n_prompt + last_char[2] // 2 + 1),
              dict(step=3, correct=False, value=n_prompt + last_char[3] // 2 + 1)]
    # the "####" step ends on the last token: no state after it inside the sequence
    assert rows == expect


def test_paired_to_compares_on_the_same_base_and_seed():
    runs = [dict(method=m, base=b, seed=s, greedy=g) for m, b, s, g in (
        ("DQO", 0, 0, 0.5), ("DQO", 0, 1, 0.7), ("DQO", 1, 0, 0.2), ("DQO", 1, 1, 0.2),
        ("RS", 0, 0, 0.6), ("RS", 0, 1, 0.6), ("RS", 1, 0, 0.1), ("RS", 1, 1, 0.3))]
    runs.append(dict(method="KTO", base=0, seed=0, skipped="0 training items"))
    (rs,) = replicate.paired_to(runs)
    assert rs["method"] == "RS" and rs["bases"] == 2
    assert abs(rs["diff"] - 0.0) < 1e-12  # +0.1, -0.1, -0.1, +0.1
    assert rs["ahead"] == 0  # base 0: 0.6 vs 0.6, base 1: 0.2 vs 0.2, neither strictly ahead
    runs[4]["greedy"] = 0.9
    (rs,) = replicate.paired_to(runs)
    assert rs["ahead"] == 1 and abs(rs["diff"] - 0.075) < 1e-12

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

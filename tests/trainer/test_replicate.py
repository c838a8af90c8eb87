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
    assert "| method | greedy % | minus DQO | sampled % | minus DQO |" in table
    assert all(len(r["greedy_items"]) == 16 for r in res["runs"] if "greedy" in r)
    assert {x["method"] for x in res["sweep"] if x.get("chosen")} == {
        m.name for m in replicate.METHODS if m.tuned}


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


def test_compare_is_paired_on_problems_bases_and_seeds():
    items = {  # (method, base, seed) -> per-problem greedy correctness on 4 test problems
        ("DQO", 0, 0): [1, 0, 1, 0], ("DQO", 0, 1): [1, 1, 0, 0], ("DQO", 1, 0): [0, 0, 0, 1],
        ("RS", 0, 0): [1, 1, 1, 0], ("RS", 0, 1): [1, 1, 0, 0], ("RS", 1, 0): [1, 0, 0, 1],
        ("RS", 1, 1): [1, 1, 1, 1],  # no DQO run to pair with: left out of the difference
    }
    runs = [dict(method=m, base=b, seed=s, greedy=sum(v) / 4, greedy_items=[float(x) for x in v])
            for (m, b, s), v in items.items()]
    runs.append(dict(method="KTO", base=0, seed=0, skipped="0 training items"))
    rs = replicate.compare(runs, "RS", "DQO", "greedy", n=500)
    assert rs["acc"] == 11 / 16  # all four RS runs
    assert abs(rs["diff"] - (7 - 5) / 12) < 1e-12  # paired: the three (base, seed) both have
    lo, hi = rs["diff_ci"]
    assert lo <= rs["diff"] <= hi and lo < hi
    on_base_1 = replicate.compare(runs, "RS", "DQO", "greedy", n=500, base=1)
    assert on_base_1["diff"] == 1 / 4
    assert replicate.compare(runs, "KTO", "DQO", "greedy", n=500) == {}
    identical = replicate.compare(runs, "DQO", "DQO", "greedy", n=500)
    assert "diff" not in identical


def test_the_sweep_gives_every_tuned_method_the_same_budget():
    budget = replicate.Budget()
    sizes = {m.algo: len(replicate.grid(m.algo, budget)) for m in replicate.METHODS if m.tuned}
    assert set(sizes) == {"sft", "rs", "dpo", "kto", "dro", "dqo"}
    assert len(set(sizes.values())) == 1
    assert all("beta" in c for c in replicate.grid("kto", budget))
    assert all("max_steps" in c for c in replicate.grid("sft", budget))
    splits = replicate.Splits(replicate.replication_pipeline(), seed=0)
    assert not set(splits.val) & set(splits.test)  # chosen on problems never tested on
    default = replicate.Splits(replicate.DefaultPipeline(), seed=0)
    assert default.test == splits.test  # the validation split leaves the test set as it was

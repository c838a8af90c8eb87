"""The replication's protocol: --quick runs every method and writes its tables, data and plot;
the learning-rate grid widens until its choice is interior; intervals cover bases and
problems."""
import json

import pytest
import torch

from dqo.experiments import replicate
from dqo.stats import two_level_ci, two_level_groups_ci


def test_replicate_quick(tmp_path):
    replicate.main(["--quick", "--out", str(tmp_path)])
    table = (tmp_path / "replication.md").read_text()
    for m in replicate.METHODS:
        assert f"| {m.name} |" in table
    assert (tmp_path / "replication.png").stat().st_size > 10_000
    res = json.loads((tmp_path / "replication.json").read_text())
    assert {r["method"] for r in res["runs"]} == {"Base (SFT warm-up)"} | {
        m.name for m in replicate.METHODS}
    assert "python -m dqo.experiments.replicate --quick" in table
    assert "| method | greedy % | minus DQO | sampled % | minus DQO | selected steps |" in table
    assert all(len(r["greedy_items"]) == 16 for r in res["runs"] if "greedy" in r)
    # every trained run kept a validation-selected checkpoint
    trained = [r for r in res["runs"] if r["method"] != "Base (SFT warm-up)" and "greedy" in r]
    assert trained and all(r["selected_step"] >= 1 and r["val_curve"] for r in trained)
    tuned = {m.name for m in replicate.METHODS if m.tuned}
    assert set(res["chosen"]["0"]) == {m.name for m in replicate.METHODS}
    assert {x["method"] for x in res["sweep"]} == tuned
    assert all(len({x["config"]["lr"] for x in res["sweep"] if x["method"] == m}) >= 3
               for m in tuned)
    assert [c["method"] for c in res["critics"]] == list(replicate.CRITIC_METHODS)
    assert set(res["best_of"]) == {"value", "q", "majority", "random", "mean", "oracle"}
    assert "| value model | step AUC |" in table and "| rule | accuracy % |" in table
    assert not any("critic_groups" in r for r in res["runs"])
    # a rerun with --resume trains nothing again
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    replicate.main(["--quick", "--out", str(tmp_path), "--resume"])
    assert (tmp_path / "runs.jsonl").read_text().splitlines() == lines


def test_the_grid_widens_until_its_choice_is_interior():
    budget = replicate.Budget(lrs=(1.0, 3.0, 9.0), lr_factor=3.0, max_widen=2)
    score = {1.0: 0.1, 3.0: 0.2, 9.0: 0.3, 27.0: 0.5, 81.0: 0.4}
    done = {}
    while (lr := replicate.lr_grid(budget, done)) is not None:
        done[lr] = score[lr]
    assert sorted(done) == [1.0, 3.0, 9.0, 27.0, 81.0]
    assert replicate.chosen_lr(done) == (27.0, True)
    done = {1.0: 0.5, 3.0: 0.2, 9.0: 0.1}  # the low end wins, and keeps winning
    while (lr := replicate.lr_grid(budget, done)) is not None:
        done[lr] = 0.9 if lr < 1 else done[lr]
    assert replicate.chosen_lr(done) == (1 / 9, False)  # widening spent: said, not hidden
    assert replicate.lr_grid(budget, {1.0: 0.1, 3.0: 0.3, 9.0: 0.1}) is None
    assert replicate.chosen_lr({1.0: 0.3, 3.0: 0.3, 9.0: 0.1}) == (1.0, False)  # ties: smaller


def test_two_level_intervals_cover_the_spread_of_bases():
    g = torch.Generator().manual_seed(0)
    same = (torch.rand(3, 200, generator=g) < 0.5).double()
    shifted = same.clone()
    shifted[0] = (torch.rand(200, generator=g) < 0.1).double()  # one base far below the others
    lo, hi = two_level_ci(same, 1000)
    assert lo <= same.mean().item() <= hi
    lo2, hi2 = two_level_ci(shifted, 1000)
    assert lo2 <= shifted.mean().item() <= hi2
    assert hi2 - lo2 > 2 * (hi - lo)  # the bases' disagreement widens the interval
    table = [[[x] for x in row.tolist()] for row in shifted]
    lo3, hi3 = two_level_groups_ci(
        table, lambda cs: sum(c[0] for c in cs) / len(cs), 300)
    assert lo3 == pytest.approx(lo2, abs=0.05) and hi3 == pytest.approx(hi2, abs=0.05)


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
    assert rs["acc"] == pytest.approx((10 / 16 + 12 / 16) / 2)  # each base's seeds, then bases
    # paired on the three (base, seed) both have: base 0 +1/8, base 1 +1/4, mean of the bases
    assert rs["diff"] == pytest.approx((1 / 8 + 1 / 4) / 2)
    lo, hi = rs["diff_ci"]
    assert lo <= rs["diff"] <= hi and lo < hi
    on_base_1 = replicate.compare(runs, "RS", "DQO", "greedy", n=500, base=1)
    assert on_base_1["diff"] == 1 / 4
    assert replicate.compare(runs, "KTO", "DQO", "greedy", n=500) == {}
    identical = replicate.compare(runs, "DQO", "DQO", "greedy", n=500)
    assert "diff" not in identical


def test_splits_keep_validation_apart_from_the_test_problems():
    splits = replicate.Splits(replicate.replication_pipeline(), seed=0)
    assert not set(splits.val) & set(splits.test)  # chosen on problems never tested on
    default = replicate.Splits(replicate.DefaultPipeline(), seed=0)
    assert default.test == splits.test  # the validation split leaves the test set as it was

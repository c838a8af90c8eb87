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

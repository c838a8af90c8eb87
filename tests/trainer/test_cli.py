"""The command lines: python -m dqo.sample -> dqo.train -> dqo.evaluate, and dqo.train's options."""
import json
import math

from dqo import data as D
from dqo.decoding import DecodingConfig
from dqo.tasks import arithmetic
from dqo.train import parse_args


def test_parse_args_defaults_and_flags(tmp_path):
    a = parse_args([])
    assert a.data is None and a.lr == 2e-5 and a.out == "runs/default"
    (tmp_path / "d.jsonl").touch()
    b = parse_args(["--model", "org/model", "--data", str(tmp_path / "d.jsonl"), "--lam", "0.95",
                    "--no-is-policy", "--is-clip", "inf", "--max-steps", "10"])
    assert (b.model, b.lam, b.is_policy, b.is_clip, b.max_steps, b.lr) == (
        "org/model", 0.95, False, math.inf, 10, 5e-7)


def test_command_lines_sample_train_evaluate(tok, policy, tmp_path, capsys):
    """python -m dqo.sample -> python -m dqo.train --model --data -> python -m dqo.evaluate."""
    from dqo import evaluate, sample
    from dqo import train as train_cli

    model_dir = tmp_path / "base"
    policy.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    D.write_jsonl(prompts, [dict(prompt=p.prompt, answer=p.answer)
                            for p in arithmetic.make_problems(4, 9)])
    data = tmp_path / "data.jsonl"
    sample.main(["--model", str(model_dir), "--prompts", str(prompts), "--task", "arithmetic",
                 "--n", "2", "--max-new-tokens", "10", "--out", str(data),
                 "--process-scores", "mc", "--process-n", "2"])
    rows, errors = D.read_jsonl(data, strict=True)
    assert len(rows) == 8 and not errors
    assert all(len(r["behavior_logp"]) == len(r["response_ids"]) for r in rows)
    assert all(isinstance(r["finished"], bool) for r in rows)
    # the decoding settings are on record beside the data
    recorded = DecodingConfig.load(tmp_path / "data.decoding.json")
    assert (recorded.max_new_tokens, recorded.top_p, recorded.top_k) == (10, 0.9, 16)
    assert recorded.stop_ids == [tok.eos_token_id]

    out = tmp_path / "run"
    train_cli.main(["--model", str(model_dir), "--data", str(data), "--task", "arithmetic",
                    "--eval-data", str(prompts), "--eval-samples", "1",
                    "--max-steps", "2", "--batch-size", "4", "--micro-batch", "2",
                    "--engine", "torch", "--lr", "1e-4", "--out", str(out), "--no-progress"])
    assert "before DQO" in capsys.readouterr().out
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [0, 1, 2]  # step 0: the evaluation before training
    assert set(metrics[0]) == {"step", "eval_greedy", "eval_greedy_cut", "eval_sampled",
                               "eval_sampled_cut"}
    # ... read back by the trainer (its evaluation) and passed on with the final policy
    assert DecodingConfig.load(out / "final" / "policy" / "decoding.json") == recorded

    evaluate.main(["--model", str(out / "final" / "policy"), "--data", str(prompts),
                   "--task", "arithmetic", "--samples", "2"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 4 and 0 <= res["greedy"] <= 1 and 0 <= res["sampled"] <= 1
    assert 0 <= res["greedy_cut"] <= 1 and 0 <= res["sampled_cut"] <= 1
    assert res["decoding"]["max_new_tokens"] == 10 and res["decoding"]["top_k"] == 16

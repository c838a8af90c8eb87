"""Importance weights free of sampler noise: when --model sampled the data, the behaviour
log-probs are the reference forward's own, so the weights start at 1; recorded ones stay
available for data from another policy, and a first step whose weights are off says why."""
import json
import logging

from dqo import data as D
from dqo.decoding import DecodingConfig, model_id
from dqo.runs import behavior_source
from dqo.tasks import arithmetic


def test_behavior_source():
    assert behavior_source("reference", None, "m") == "reference"
    assert behavior_source("recorded", "m", "m") == "recorded"
    assert behavior_source("auto", "org/m", "org/m") == "reference"
    assert behavior_source("auto", "org/other", "org/m") == "recorded"
    assert behavior_source("auto", None, "org/m") == "recorded"  # no record: as before


def test_weights_start_at_one_with_the_reference_and_a_warning_without(tok, policy, tmp_path,
                                                                      caplog):
    from dqo import train as train_cli
    model_dir = tmp_path / "base"
    policy.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = []
    for i, p in enumerate(arithmetic.make_problems(8, 3)):
        ids = tok(f"#### {p.answer}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # what a noisy sampler might record: log-probs far from the training forward's
        rows.append(dict(prompt=p.prompt, response=f"#### {p.answer}", response_ids=ids,
                         behavior_logp=[0.0] * len(ids),
                         reward=float(i % 2)))
    data = tmp_path / "data.jsonl"
    D.write_jsonl(data, rows)
    DecodingConfig(sampled_by=model_id(str(model_dir))).save(tmp_path / "data.decoding.json")

    def first_step(out, *extra):
        train_cli.main(["--model", str(model_dir), "--data", str(data), "--max-steps", "1",
                        "--batch-size", "8", "--micro-batch", "8", "--engine", "torch",
                        "--threads", "1", "--out", str(out), "--no-progress", *extra])
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    with caplog.at_level(logging.WARNING):
        auto = first_step(tmp_path / "auto")  # the record names --model: the reference
    assert auto["is_weight_mean"] > 0.9999, auto["is_weight_mean"]
    assert "mean importance weight" not in caplog.text
    with caplog.at_level(logging.WARNING):
        recorded = first_step(tmp_path / "rec", "--behavior-logp", "recorded")
    assert recorded["is_weight_mean"] < 0.99
    assert "--behavior-logp reference" in caplog.text


def test_bf16_weights_are_exactly_one_at_step_0(tok, policy, tmp_path):
    """In bf16 a sampler's recorded log-probs differ from the training forward's by ~0.02 a
    token (KV cache, padding, rounding), which the importance weights would read as a policy
    change. With the reference forward's own log-probs as the behaviour's, computed in the
    training's precision, the first step's weights are 1 up to bf16's own forward noise."""
    import torch

    from dqo import train as train_cli
    model_dir = tmp_path / "base"
    policy.to(torch.bfloat16).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = []
    for i, p in enumerate(arithmetic.make_problems(8, 5)):
        ids = tok(f"#### {p.answer}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(dict(prompt=p.prompt, response=f"#### {p.answer}", response_ids=ids,
                         behavior_logp=[-0.5] * len(ids), reward=float(i % 2)))
    data = tmp_path / "data.jsonl"
    D.write_jsonl(data, rows)
    DecodingConfig(sampled_by=model_id(str(model_dir))).save(tmp_path / "data.decoding.json")
    out = tmp_path / "run"
    train_cli.main(["--model", str(model_dir), "--data", str(data), "--max-steps", "1",
                    "--batch-size", "8", "--micro-batch", "4", "--engine", "torch", "--bf16",
                    "--threads", "1", "--out", str(out), "--no-progress"])
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["is_weight_mean"] == 1.0 and first["is_weight_clip_frac"] == 0.0, first

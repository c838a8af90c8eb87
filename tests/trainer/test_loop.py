"""dqo: data, tasks, sampling, the training loop, checkpoints."""
import json
import math
from pathlib import Path

import pytest
import torch

from dqo import data as D
from dqo.checkpoint import latest_checkpoint
from dqo.configs import TrainConfig
from dqo.decoding import DecodingConfig, format_prompt
from dqo.generation import (
    PROCESS_REWARD_TOTAL,
    exact_process_scores,
    generate,
    label_samples,
    with_step_rewards,
)
from dqo.loop import train
from dqo.modeling import ValueModel, policy_logprobs
from dqo.pipeline import DefaultPipeline
from dqo.reference_logps import compute_ref_logps
from dqo.runs import run_default
from dqo.tasks import arithmetic, get_verifier
from dqo.tasks.verify import MathVerifier, extract_hash_answer, last_boxed, verify_gsm8k
from dqo.tokenizer import char_tokenizer
from dqo.train import parse_args


def dec(max_new_tokens: int) -> DecodingConfig:
    return DecodingConfig(max_new_tokens=max_new_tokens)


# ---- data ---------------------------------------------------------------------------------


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


# ---- tasks ----------------------------------------------------------------------------------


def test_arithmetic_task_and_exact_step_labels():
    p = arithmetic.Problem(7, (("+", 3), ("*", 2), ("-", 5)))
    assert p.prompt == "Q: 7+3*2-5=?\n" and p.answer == "15"
    assert arithmetic.parse_prompt(p.prompt) == p
    assert arithmetic.step_labels(p, p.solution) == [True] * 4
    wrong_mid = "7+3=10\n10*2=21\n21-5=16\n#### 16"
    assert arithmetic.step_labels(p, wrong_mid) == [True, False, False, False]
    assert not arithmetic.verify(wrong_mid, p.answer)
    lucky = "7+3=11\n11*2=20\n20-5=15\n#### 15"  # right answer, wrong reasoning
    assert arithmetic.verify(lucky, p.answer)
    assert arithmetic.step_labels(p, lucky) == [False] * 4
    # one label per line: a blank line keeps the state's label and skips no operation
    assert arithmetic.step_labels(p, "7+3=10\n\n10*2=20\n20-5=15\n#### 15\n") == [True] * 6
    assert arithmetic.step_labels(p, "7+3=10\n10*2=21\n\n#### 21") == [True, False, False,
                                                                          False]
    assert len(set(arithmetic.make_problems(50, 1))) == 50
    assert arithmetic.make_problems(5, 3) == arithmetic.make_problems(5, 3)


@pytest.mark.parametrize("response,answer,ok", [
    ("so 1,000 apples\n#### 1,000", "1000", True),
    ("#### $18.00", "18", True),
    ("#### -3", "-3", True),
    ("#### 3", "-3", False),
    ("The answer is 42", "42", False),  # no marker
    ("#### 5\nwait, #### 7", "7", True),  # the last marker counts
    ("#### 0.5", "1/2", True),
])
def test_gsm8k_verifier(response, answer, ok):
    assert verify_gsm8k(response, answer) is ok


def test_answer_extraction():
    assert extract_hash_answer("x\n####  12 apples") == "12"
    assert last_boxed(r"so \boxed{1} then \boxed{\frac{a}{b_{2}}}.") == r"\frac{a}{b_{2}}"
    assert last_boxed("no box") is None


def test_math_verifier_off_the_main_thread():
    import threading
    verifier = MathVerifier(timeout=60)
    result = {}
    t = threading.Thread(target=lambda: result.update(ok=verifier(
        [r"thus \boxed{\frac{1}{2}}", r"\boxed{0.5}", r"\boxed{3}", "no answer"],
        ["0.5", r"\frac12", "4", "1"])))
    t.start()
    t.join(120)
    verifier.close()
    assert result["ok"] == [True, True, False, False]


# ---- sampling and models ----------------------------------------------------------------------


def test_sampled_behavior_logp_equals_training_logprobs(tok, policy):
    """The log-probs recorded while sampling (left-padded generate) are the ones the trainer
    computes for the same tokens (right- or left-padded batches): alignment and positions."""
    probs = arithmetic.make_problems(4, 0)
    torch.manual_seed(1)
    samples = generate(policy, tok, [p.prompt for p in probs], n=2, decoding=dec(12))
    rows = label_samples([p.prompt for p in probs], [p.answer for p in probs], samples,
                         get_verifier("arithmetic"))
    assert any(not r["finished"] for r in rows)  # a random model: some hit the limit
    for padding in ("right", "left"):
        exs = [D.tokenize_row(D.check_row(r, "x"), tok) for r in rows]
        assert [e.response_ids for e in exs] == [r["response_ids"] for r in rows]  # no EOS added
        b = D.collate(exs, tok.pad_token_id, padding=padding)
        with torch.no_grad():
            lp = policy_logprobs(policy, b.input_ids, b.attention_mask, b.action_mask)
        m = b.action_mask  # every action was sampled: every behaviour log-prob is a real one
        torch.testing.assert_close(lp[m], b.behavior_logp[m], rtol=1e-4, atol=1e-4)


def test_value_model_alignment(tok, policy):
    value = ValueModel.from_policy(policy)
    torch.nn.init.normal_(value.head.weight)
    ids = torch.tensor([tok("Q: 1+2=?\n1+2=3")["input_ids"]])
    attn = torch.ones_like(ids)
    v = value(ids, attn)
    assert v.shape == ids.shape and v[0, 0] == 0
    with torch.no_grad():
        h = value.backbone(input_ids=ids, attention_mask=attn).last_hidden_state
    torch.testing.assert_close(v[0, 1:], value.head(h[0, :-1]).squeeze(-1))


def test_exact_process_scores():
    p = arithmetic.Problem(7, (("+", 3), ("*", 2)))
    labels = lambda pr, r: arithmetic.step_labels(arithmetic.parse_prompt(pr), r)  # noqa: E731
    rows = [dict(prompt=p.prompt, response="7+3=10\n10*2=21\n#### 21", reward=0.0),
            dict(prompt=p.prompt, response=p.solution, reward=1.0)]
    out = exact_process_scores(rows, labels, total=0.6)
    assert out[0]["step_rewards"] == pytest.approx([0.2, 0.0, 0.0])  # 0.6 / 3 steps
    assert "steps" not in out[1]
    # a blank line is no step: it earns nothing and does not count in K
    blank = dict(prompt=p.prompt, response="7+3=10\n\n10*2=21\n#### 21", reward=0.0)
    out = exact_process_scores([blank], labels, total=0.6)
    assert out[0]["steps"] == blank["response"].split("\n")
    assert out[0]["step_rewards"] == pytest.approx([0.2, 0.0, 0.0, 0.0])


def test_process_rewards_never_reach_a_correct_answers_reward():
    """However long a failed response and however many of its steps are right, its step
    rewards sum to less than ``total`` < 1 (they used to reach 1.2 on 13 lines)."""
    long = "\n".join(["1+1=2", ""] * 12 + ["#### 3"])  # 13 steps, blank lines between
    row = dict(prompt="Q", response=long, reward=0.0)
    for k in (0, 5, 12):
        r = with_step_rewards(row, k)
        assert len(r["step_rewards"]) == len(long.split("\n"))
        assert sum(r["step_rewards"]) == pytest.approx(PROCESS_REWARD_TOTAL * k / 13)
        assert sum(r["step_rewards"]) < PROCESS_REWARD_TOTAL < 1.0
    with pytest.raises(ValueError, match=r"total: expected a value in \[0, 1\)"):
        with_step_rewards(row, 1, total=1.0)


# ---- the training loop ------------------------------------------------------------------------


def small_setup(tok, policy, n=32):
    probs = arithmetic.make_problems(n // 2, 5)
    torch.manual_seed(2)
    samples = generate(policy, tok, [p.prompt for p in probs], n=2, decoding=dec(16))
    rows = label_samples([p.prompt for p in probs], [p.answer for p in probs], samples,
                         get_verifier("arithmetic"))
    for i, r in enumerate(rows):  # make rewards informative for the tiny random model
        r["reward"] = float(i % 3 == 0)
    exs = [D.tokenize_row(D.check_row(r, "x"), tok) for r in rows]
    compute_ref_logps(policy, exs, tok.pad_token_id)
    return exs


def train_args(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), lr=1e-3, value_lr=1e-2, batch_size=8, micro_batch=4,
                epochs=1, engine="torch", progress=False, save_every=0)
    return TrainConfig(**{**base, **kw})


def test_trainer_steps_lower_the_loss(tok, policy, tmp_path):
    exs = small_setup(tok, policy)
    fixed = exs[:8]
    args = train_args(tmp_path, max_steps=12)
    train(args, tok, policy, ValueModel.from_policy(policy), fixed * 4)
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 12
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    assert (tmp_path / "run" / "final" / "policy" / "config.json").is_file()
    assert (tmp_path / "run" / "final" / "value" / "value_head.pt").is_file()


def test_checkpoint_kill_and_resume_is_exact(tok, policy, tmp_path, monkeypatch):
    exs = small_setup(tok, policy)
    state0 = {k: v.clone() for k, v in policy.state_dict().items()}

    def fresh():
        policy.load_state_dict(state0)
        torch.manual_seed(0)
        return policy, ValueModel.from_policy(policy)

    p, v = fresh()
    train(train_args(tmp_path / "a", max_steps=6), tok, p, v, exs)
    straight = {k: t.clone() for k, t in p.state_dict().items()}
    straight_v = {k: t.clone() for k, t in v.state_dict().items()}

    from dqo.algos.dqo import DQO
    real_step, calls = DQO.step, []

    def dies_in_step_5(*a, **k):  # 2 micro-batches a step: the 9th call is inside step 5
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    p, v = fresh()
    monkeypatch.setattr(DQO, "step", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(train_args(tmp_path / "b", max_steps=6, save_every=2), tok, p, v, exs)
    monkeypatch.setattr(DQO, "step", real_step)
    assert latest_checkpoint(tmp_path / "b" / "run").name == "step-0000004"
    with open(tmp_path / "b" / "run" / "metrics.jsonl", "a") as f:  # a row the kill left behind
        f.write(json.dumps({"step": 5, "loss": 0.0}) + "\n")
    p, v = fresh()  # a new process: fresh weights, then --resume
    train(train_args(tmp_path / "b", max_steps=6, save_every=2, resume=True), tok, p, v,
              exs)
    for k, t in p.state_dict().items():
        assert torch.equal(t, straight[k]), k
    for k, t in v.state_dict().items():
        assert torch.equal(t, straight_v[k]), k
    steps = [json.loads(x)["step"] for x in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    ckpts = sorted(x.name for x in (tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-0000004", "step-0000006"]  # keep=2, no temp dirs left


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_engine_trains_on_cpu(tok, policy, tmp_path, stage, monkeypatch):
    """ZeRO-2 and ZeRO-3 (partitioned parameters: the lm_head weight read by the fused op must
    be gathered) train, and match the plain-PyTorch engine's first losses."""
    pytest.importorskip("deepspeed")
    import dqo.engine as E

    real_config = E.deepspeed_config

    def partition_everything(*a, **k):  # else ZeRO-3 keeps a tiny model's params whole
        cfg = real_config(*a, **k)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return cfg

    monkeypatch.setattr(E, "deepspeed_config", partition_everything)
    exs = small_setup(tok, policy)
    state0 = {k: v.clone() for k, v in policy.state_dict().items()}
    losses = {}
    for engine in ("torch", "deepspeed"):
        policy.load_state_dict(state0)
        torch.manual_seed(0)
        args = train_args(tmp_path / engine, engine=engine, zero_stage=stage, max_steps=3,
                          save_every=3)
        train(args, tok, policy, ValueModel.from_policy(policy), exs)
        rows = [json.loads(x) for x in open(tmp_path / engine / "run" / "metrics.jsonl")]
        assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
        losses[engine] = [r["loss"] for r in rows]
    assert latest_checkpoint(tmp_path / "deepspeed" / "run").name == "step-0000003"
    # Step 1 sees the same weights; later steps differ only by the lr schedules' shapes.
    assert losses["deepspeed"][0] == pytest.approx(losses["torch"][0], rel=1e-5)


def test_parse_args_defaults_and_flags(tmp_path):
    a = parse_args([])
    assert a.data is None and a.lr == 2e-5 and a.out == "runs/default"
    (tmp_path / "d.jsonl").touch()
    b = parse_args(["--model", "org/model", "--data", str(tmp_path / "d.jsonl"), "--lam", "0.95",
                    "--no-is-policy", "--is-clip", "inf", "--max-steps", "10"])
    assert (b.model, b.lam, b.is_policy, b.is_clip, b.max_steps, b.lr) == (
        "org/model", 0.95, False, math.inf, 10, 5e-7)


def test_default_pipeline_smoke(tmp_path):
    """Every stage of `python -m dqo.train` with no arguments, at toy sizes."""
    pipe = DefaultPipeline(n_sft=64, n_offline=8, n_test=8, samples_per_prompt=2,
                           sft_max_steps=3, max_new_tokens=12)
    args = TrainConfig(**{**parse_args([]).__dict__, "out": str(tmp_path / "d"), "progress": False,
                        "batch_size": 8, "micro_batch": 8, "epochs": 1, "eval_samples": 1})
    args.save_every = 1
    res = run_default(args, pipe)
    assert set(res) == {"before", "after"}
    assert 0 <= res["after"]["greedy"] <= 1 and 0 <= res["after"]["sampled"] <= 1
    assert (tmp_path / "d" / "offline.jsonl").is_file()
    assert (tmp_path / "d" / "final" / "policy" / "config.json").is_file()
    assert (tmp_path / "d" / "curves.png").stat().st_size > 10_000  # dqo.plot, at the end
    # --resume reuses every stage: same base, same offline data, training already complete
    data_before = (tmp_path / "d" / "offline.jsonl").read_text()
    metrics_before = (tmp_path / "d" / "metrics.jsonl").read_text()
    args.resume = True
    res2 = run_default(args, pipe)
    assert (tmp_path / "d" / "offline.jsonl").read_text() == data_before
    assert (tmp_path / "d" / "metrics.jsonl").read_text() == metrics_before
    assert res2["after"]["greedy"] == res["after"]["greedy"]


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
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # ... read back by the trainer (its evaluation) and passed on with the final policy
    assert DecodingConfig.load(out / "final" / "policy" / "decoding.json") == recorded

    evaluate.main(["--model", str(out / "final" / "policy"), "--data", str(prompts),
                   "--task", "arithmetic", "--samples", "2"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 4 and 0 <= res["greedy"] <= 1 and 0 <= res["sampled"] <= 1
    assert 0 <= res["greedy_cut"] <= 1 and 0 <= res["sampled_cut"] <= 1
    assert res["decoding"]["max_new_tokens"] == 10 and res["decoding"]["top_k"] == 16


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_two_ranks_equal_one_rank_with_the_global_batch(tok, policy, tmp_path):
    """Two DeepSpeed ranks (torchrun, gloo, CPU) with 4 examples each train exactly like one
    rank with the 8-example global batch: the data shards, the all-reduced token count and
    DeepSpeed's averaging compose into the same token-mean gradient."""
    pytest.importorskip("deepspeed")
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    model_dir = tmp_path / "base"
    policy.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = []
    for p in arithmetic.make_problems(8, 4):
        for j, resp in enumerate((p.solution, p.solution.replace("####", "#### 1"))):
            rows.append(dict(prompt=p.prompt, response=resp, reward=float(j == 0)))
    data = tmp_path / "data.jsonl"
    D.write_jsonl(data, rows)
    common = ["-m", "dqo.train", "--model", str(model_dir), "--data", str(data),
              "--engine", "deepspeed", "--zero-stage", "2", "--max-steps", "2",
              "--lr", "1e-3", "--value-lr", "1e-2", "--no-progress"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                         env.get("PYTHONPATH", "")])
    one = subprocess.run([sys.executable, *common, "--batch-size", "8", "--micro-batch", "4",
                          "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), *common, "--batch-size", "4",
                          "--micro-batch", "2", "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    for part in ("policy", "value"):
        a = load_file(tmp_path / "one" / "final" / part / "model.safetensors")
        b = load_file(tmp_path / "two" / "final" / part / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    m1 = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    m2 = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(m1) == len(m2) == 2
    # the reference log-probs were computed half on each rank and gathered in example order
    assert "reference log-probs: 16 of 16 examples on rank 0" in one.stderr
    for r in (0, 1):
        assert f"reference log-probs: 8 of 16 examples on rank {r}" in two.stderr, two.stderr
    (c1,), (c2,) = [list((tmp_path / run / "cache").glob("ref_logps-*.pt")) for run in ("one",
                                                                                      "two")]
    r1, r2 = torch.load(c1, weights_only=True), torch.load(c2, weights_only=True)
    assert len(r1) == len(r2) == 16
    for a, b in zip(r1, r2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chat_template_wraps_prompts_in_data_and_sampling(policy):
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}Q{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}#{% endif %}")
    assert format_prompt(tok, "1+2=?") == "Q1+2=?#"
    ex = D.tokenize_row(D.check_row({"prompt": "1+2=?", "response": "3", "reward": 1}, "x"), tok)
    assert tok.decode(ex.prompt_ids) == "Q1+2=?#"
    assert ex.response_ids == tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # sampling conditions on the same wrapped prompt: greedy continuation of it == generate
    (s,), = generate(policy, tok, ["1+2=?"], greedy=True, decoding=dec(3))
    ids = torch.tensor([tok("Q1+2=?#", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        manual = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=3,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert s.ids == [t for t in manual[0, ids.shape[1]:].tolist()][:len(s.ids)]


def test_atomic_write_survives_concurrent_writers_and_failures(tmp_path):
    """Every rank of a data-parallel job writes the same reference-log-prob cache file: the
    writers must not trip over each other's temporary files, and a failed write leaves the
    old file and no debris."""
    import threading

    from dqo.atomic import atomic_write

    path = tmp_path / "cache" / "same.pt"
    errors = []

    def writer(i):
        try:
            for _ in range(50):
                atomic_write(path, lambda f: torch.save(torch.full((64,), float(i)), f),
                             binary=True)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    final = torch.load(path)
    assert final.unique().numel() == 1 and int(final[0]) in range(4)

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken, binary=True)
    assert torch.equal(torch.load(path), final)
    assert sorted(p.name for p in path.parent.iterdir()) == ["same.pt"]

"""dqo.loop and dqo.runs: the training loop, checkpoints, the DeepSpeed engine, data
parallelism, the embedded default at toy sizes."""
import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from dqo import data as D
from dqo.checkpoint import latest_checkpoint
from dqo.configs import TrainConfig
from dqo.decoding import DecodingConfig
from dqo.generation import (
    generate,
    label_samples,
)
from dqo.loop import train
from dqo.modeling import ValueModel
from dqo.pipeline import DefaultPipeline
from dqo.reference_logps import compute_ref_logps
from dqo.runs import run_default
from dqo.tasks import arithmetic, get_verifier
from dqo.train import parse_args


def dec(max_new_tokens: int) -> DecodingConfig:
    return DecodingConfig(max_new_tokens=max_new_tokens)


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


def test_checkpoint_kill_and_resume_is_exact(tok, policy, tmp_path):
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

    p, v = fresh()
    # 2 micro-batches a step: the 9th call is inside step 5
    with killed_at_call(9), pytest.raises(KeyboardInterrupt):
        train(train_args(tmp_path / "b", max_steps=6, save_every=2), tok, p, v, exs)
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


@contextlib.contextmanager
def killed_at_call(n: int):
    """DQO.step raises KeyboardInterrupt at its n-th call (a kill inside a training step),
    and is itself again afterwards."""
    from dqo.algos.dqo import DQO
    real_step, calls = DQO.step, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    DQO.step = dying
    try:
        yield
    finally:
        DQO.step = real_step


def partition_every_parameter(monkeypatch) -> None:
    """ZeRO-3 keeps a tiny model's parameters whole (below its persistence threshold): make
    the trainer's DeepSpeed config partition every one, as a large model's are."""
    import dqo.engine as E
    real_config = E.deepspeed_config

    def partition_everything(*a, **k):
        cfg = real_config(*a, **k)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return cfg

    monkeypatch.setattr(E, "deepspeed_config", partition_everything)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_engine_trains_on_cpu(tok, policy, tmp_path, stage, monkeypatch):
    """ZeRO-2 and ZeRO-3 (partitioned parameters: the lm_head weight read by the fused op must
    be gathered) train, and match the plain-PyTorch engine's first losses."""
    pytest.importorskip("deepspeed")
    partition_every_parameter(monkeypatch)
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
    assert "reference log-probs: 8 of 16 examples on rank 0" in two.stderr, two.stderr
    # every line once: the other ranks log warnings only
    assert "examples on rank 1" not in two.stderr
    assert two.stderr.count("engines: DeepSpeed ZeRO-2") == 1
    (c1,), (c2,) = [list((tmp_path / run / "cache").glob("ref_logps-*.pt")) for run in ("one",
                                                                                      "two")]
    r1, r2 = torch.load(c1, weights_only=True), torch.load(c2, weights_only=True)
    assert len(r1) == len(r2) == 16
    for a, b in zip(r1, r2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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


def test_default_pipeline_greedy_only(tmp_path, capsys):
    """--eval-samples 0 (greedy evaluation only) used to crash with KeyError: 'sampled'."""
    pipe = DefaultPipeline(n_sft=32, n_offline=4, n_test=4, samples_per_prompt=2,
                           sft_max_steps=2, max_new_tokens=8)
    args = TrainConfig(**{**parse_args([]).__dict__, "out": str(tmp_path / "d"), "progress": False,
                        "batch_size": 8, "micro_batch": 8, "epochs": 1, "eval_samples": 0,
                        "save_every": 0})
    res = run_default(args, pipe)
    assert "sampled" not in res["before"] and 0 <= res["after"]["greedy"] <= 1

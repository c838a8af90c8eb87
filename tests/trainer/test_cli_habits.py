"""The command lines fit the habits of TRL users (issue 22 item 4): a plain checkpoint as the
critic, dqo.evaluate on any checkpoint the trainer wrote, a missing optional package as one line
naming its pip extra, progress bars, logs from rank 0 only."""
import json
import logging
import sys

import pytest
import torch
from hf_tiny import save_model, train_tiny_run

from dqo import data as D
from dqo.errors import UsageError
from dqo.modeling import ValueModel, build_policy, tiny_config


def test_value_model_takes_a_plain_checkpoint(tok, tmp_path):
    from dqo.runs import load_value_model
    critic = save_model(tok, tmp_path / "critic", hidden_size=16, layers=1, heads=1)
    policy = build_policy(tiny_config(tok, hidden_size=32, layers=2, heads=2))
    value = load_value_model(str(critic), policy, torch.float32)  # before: no value_head.pt
    assert value.config.hidden_size == 16 and float(value.head.weight.abs().sum()) == 0
    out = value(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long))
    assert out.shape == (1, 3)
    value.save_pretrained(tmp_path / "saved")  # and its own format still loads its head
    with torch.no_grad():
        value.head.bias.fill_(0.5)
    value.save_pretrained(tmp_path / "saved")
    assert float(ValueModel.from_pretrained(tmp_path / "saved").head.bias) == 0.5
    policy.config.vocab_size += 1
    with pytest.raises(UsageError, match="--value-model: .* vocabulary of"):
        load_value_model(str(critic), policy, torch.float32)


@pytest.mark.parametrize("lora", [False, True])
def test_evaluate_loads_any_checkpoint_the_trainer_wrote(tok, tmp_path, capsys, lora):
    if lora:
        pytest.importorskip("peft")
    from dqo import evaluate
    base, prompts, out = train_tiny_run(tok, tmp_path, 4, "--save-every", "2",
                                        *(["--lora-r", "2"] if lora else []))
    capsys.readouterr()
    ckpt = out / "checkpoints" / "step-0000002"
    results = []
    for model in (out / "final" / "policy", ckpt, ckpt / "policy", base):
        evaluate.main(["--model", str(model), "--data", str(prompts), "--task", "arithmetic",
                       "--samples", "0", "--max-new-tokens", "6"])
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    # the checkpoint is the final policy (the same weights, the same greedy answers), and the
    # trained policy is not the base (what a checkpoint loaded without its weights would be)
    from dqo.restore import load_trained_policy
    _, final = load_trained_policy(str(out / "final" / "policy"))
    _, from_ckpt = load_trained_policy(str(ckpt))
    _, untrained = load_trained_policy(str(base))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        want = final(ids).logits
        torch.testing.assert_close(from_ckpt(ids).logits, want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(untrained(ids).logits, want, atol=1e-4)
    assert results[0]["greedy"] == results[1]["greedy"] == results[2]["greedy"]


def test_evaluate_says_what_a_directory_lacks(tok, tmp_path, capsys):
    from dqo import evaluate
    prompts = tmp_path / "prompts.jsonl"
    D.write_jsonl(prompts, [dict(prompt="1+1=?", answer="2")])
    bare = tmp_path / "bare"
    build_policy(tiny_config(tok, hidden_size=16, layers=1, heads=1)).save_pretrained(bare)
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000001" / "policy"
    ckpt.mkdir(parents=True)
    torch.save({"module": {}}, ckpt / "engine.pt")
    for model, says in ((bare, "holds no tokenizer"), (ckpt.parent, "config.yaml is missing")):
        with pytest.raises(SystemExit) as exit:
            evaluate.main(["--model", str(model), "--data", str(prompts), "--task", "arithmetic"])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and says in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("module,argv,extra", [
    ("vllm", ["sample", "--engine", "vllm"], "vllm"),
    ("peft", ["train", "--lora-r", "4"], "lora"),
    ("wandb", ["train", "--report-to", "wandb"], "tracking"),
    ("tensorboard", ["train", "--report-to", "tensorboard"], "tracking")])
def test_a_missing_optional_package_is_one_line_naming_its_extra(tok, tmp_path, capsys,
                                                                 monkeypatch, module, argv,
                                                                 extra):
    from dqo import sample
    from dqo import train as train_cli
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    base = save_model(tok, tmp_path / "base", hidden_size=16, layers=1, heads=1)
    prompts = tmp_path / "prompts.jsonl"
    D.write_jsonl(prompts, [dict(prompt="1+1=?", answer="2")])
    data = tmp_path / "data.jsonl"
    D.write_jsonl(data, [dict(prompt="1+1=?", response="#### 2", reward=1.0)])
    command, *flags = argv
    with pytest.raises(SystemExit) as exit:
        if command == "sample":
            sample.main(["--model", str(base), "--prompts", str(prompts), "--task",
                         "arithmetic", "--out", str(tmp_path / "d.jsonl"), *flags])
        else:
            train_cli.main(["--model", str(base), "--data", str(data), "--task", "arithmetic",
                            "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    assert f"pip install 'dqo-kernels[{extra}]'" in err and flags[0] in err


def test_progress_bars_on_the_reference_pass_and_evaluation(tok, policy, monkeypatch):
    import tqdm.auto

    from dqo.decoding import DecodingConfig
    from dqo.evaluation import accuracy
    from dqo.reference_logps import compute_ref_logps
    bars = []
    verify = lambda texts, refs: [True] * len(texts)  # noqa: E731

    class Spy(list):
        def __init__(self, iterable, desc=None, **kw):
            super().__init__(iterable)
            bars.append(desc)

    monkeypatch.setattr(tqdm.auto, "tqdm", Spy)
    exs = [D.tokenize_row(D.check_row(dict(prompt="1+1=?", response="#### 2", reward=1.0),
                                      "x"), tok)]
    compute_ref_logps(policy, exs, tok.pad_token_id)
    accuracy(policy, tok, ["1+1=?"], ["2"], verify, samples=0,
             decoding=DecodingConfig(max_new_tokens=2))
    assert bars == []  # --no-progress
    compute_ref_logps(policy, exs, tok.pad_token_id, progress=True)
    accuracy(policy, tok, ["1+1=?"], ["2"], verify, samples=0,
             decoding=DecodingConfig(max_new_tokens=2), progress=True)
    assert bars == ["reference log-probs", "sampling"]


def test_logs_come_from_rank_0_only(monkeypatch):
    from dqo.cli import configure_logging
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # put back after the test
    monkeypatch.setenv("RANK", "1")
    configure_logging()
    assert root.level == logging.WARNING
    monkeypatch.setenv("RANK", "0")
    configure_logging()
    assert root.level == logging.INFO


def test_a_launcher_with_the_single_process_engine_is_refused(tmp_path, monkeypatch, capsys):
    from dqo import train as train_cli
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun --nproc-per-node 2 ... --engine torch
    with pytest.raises(SystemExit) as exit:
        train_cli.main(["--engine", "torch", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--engine deepspeed" in err and "WORLD_SIZE" in err


def test_the_deepspeed_launchers_local_rank_is_accepted():
    from dqo.train import parse_args
    # deepspeed --module dqo.train ... appends it to each process's arguments
    assert parse_args(["--local_rank=1", "--max-steps", "2"]).max_steps == 2
    assert parse_args(["--max-steps", "2", "--local-rank", "0"]).max_steps == 2

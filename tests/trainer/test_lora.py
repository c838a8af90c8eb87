"""LoRA through peft: the policy's adapter and, with a shared base, the value model's adapter
and head on the same frozen weights; checkpoints of the adapters alone; resume; loading."""
import json

import pytest
import torch
from test_loop import killed_at_call

from dqo import data as D
from dqo.modeling import (
    PolicyLogprobs,
    SharedValueModel,
    ValueModel,
    build_policy,
    enable_checkpointing,
    load_policy,
)
from dqo.tasks import arithmetic

peft = pytest.importorskip("peft")

from dqo.configs import TrainConfig  # noqa: E402
from dqo.loop import train  # noqa: E402
from dqo.lora import (  # noqa: E402
    POLICY_ADAPTER,
    VALUE_ADAPTER,
    adapter_parameters,
    add_backbone_adapter,
    add_policy_adapter,
    lora_config,
)


def load_file(path):
    from safetensors.torch import load_file
    return load_file(path)


def examples(tok, policy, n=16):
    from dqo.reference_logps import compute_ref_logps
    probs = arithmetic.make_problems(n, 3)
    rows = [dict(prompt=p.prompt, response=f"#### {p.answer if i % 2 else 0}",
                 reward=float(i % 2)) for i, p in enumerate(probs)]
    exs = [D.tokenize_row(D.check_row(r, "x"), tok) for r in rows]
    compute_ref_logps(policy, exs, tok.pad_token_id)  # the base = the policy with a new adapter
    return exs


def lora_models(tok, base_dir, shared=True, seed=0, separate_value=False):
    torch.manual_seed(seed)
    base = build_policy(path=str(base_dir))
    value = ValueModel.from_policy(base) if separate_value else None
    policy = add_policy_adapter(base, lora_config(4, 8, 0.0, "all-linear"))
    if separate_value:
        value.backbone = add_backbone_adapter(value.backbone, lora_config(4, 8, 0.0, "all-linear"))
    elif shared:
        value = SharedValueModel(policy, lora_config(4, 8, 0.0, "all-linear"))
    if value is not None:
        torch.nn.init.normal_(value.head.weight, std=0.1)
    return policy, value


@pytest.fixture
def base_dir(tok, policy, tmp_path):
    policy.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def args(tmp_path, **kw):
    return TrainConfig(**{**dict(out=str(tmp_path / "run"), lr=1e-2, value_lr=1e-2,
                                 batch_size=8, micro_batch=4, engine="torch", progress=False),
                          **kw})


def test_shared_base_trains_two_adapters_and_leaves_the_base_alone(tok, base_dir, tmp_path):
    policy, value = lora_models(tok, base_dir)
    exs = examples(tok, policy)
    frozen = {n: p.clone() for n, p in policy.named_parameters() if "lora_" not in n}
    adapters = {a: [p.clone() for p in adapter_parameters(policy, a)]
                for a in (POLICY_ADAPTER, VALUE_ADAPTER)}
    assert {id(p) for p in PolicyLogprobs(policy).trainable_parameters()} == {
        id(p) for p in adapter_parameters(policy, POLICY_ADAPTER)}
    assert {id(p) for p in value.parameters()} == {
        id(p) for p in adapter_parameters(policy, VALUE_ADAPTER)} | {
        id(value.head.weight), id(value.head.bias)}
    train(args(tmp_path, max_steps=3), tok, policy, value, exs)
    for n, p in policy.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]), n  # one frozen base for both models
    for a, before in adapters.items():
        assert any(not torch.equal(p, q) for p, q in zip(adapter_parameters(policy, a), before))
    final = tmp_path / "run" / "final"
    assert (final / "policy" / "adapter_config.json").is_file()
    assert not (final / "policy" / "model.safetensors").exists()  # the adapter, not the base
    assert json.loads((final / "value" / "value_model.json").read_text())["backbone"] == "shared"
    value_adapter = json.loads((final / "value" / "adapter_config.json").read_text())
    assert value_adapter["base_model_name_or_path"] == str(base_dir)  # on the policy's base
    tok2, loaded = load_policy(str(final / "policy"))  # dqo.evaluate's loader: base + adapter
    ids = torch.tensor([exs[0].prompt_ids + exs[0].response_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, policy(ids).logits, rtol=1e-4, atol=1e-4)


def test_checkpointing_with_two_adapters_gives_the_same_update(tok, base_dir, tmp_path):
    """Each layer is recomputed with the adapter it ran with, whatever the backward order."""
    results = []
    for gc in (False, True):
        policy, value = lora_models(tok, base_dir)
        exs = examples(tok, policy)
        if gc:
            enable_checkpointing(policy)
        train(args(tmp_path / str(gc), max_steps=2), tok, policy, value, exs)
        results.append([p.detach().clone() for p in policy.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("separate", [False, True], ids=["shared", "separate"])
def test_resume_restores_the_adapters_exactly(tok, base_dir, tmp_path, separate):
    """Checkpoints hold the adapters in peft's format (and the value head), their one copy;
    resume reads them back bit for bit, whichever backbone the value model has."""
    policy, value = lora_models(tok, base_dir, separate_value=separate)
    exs = examples(tok, policy)
    train(args(tmp_path / "a", max_steps=4), tok, policy, value, exs)
    straight = [p.detach().clone() for p in policy.parameters()] + [
        p.detach().clone() for p in value.parameters()]

    policy, value = lora_models(tok, base_dir, separate_value=separate)
    # 2 micro-batches a step: the 5th call is in step 3
    with killed_at_call(5), pytest.raises(KeyboardInterrupt):
        train(args(tmp_path / "b", max_steps=4, save_every=2), tok, policy, value, exs)
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "step-0000002"
    for name in ("policy", "value"):  # adapters in peft's format (and the head), no base
        assert "module" not in torch.load(ckpt / name / "engine.pt", weights_only=True)
        saved = load_file(ckpt / name / "adapter_model.safetensors")
        assert saved and all("lora_" in k for k in saved)
    assert (ckpt / "value" / "value_head.pt").is_file()
    # a new process: fresh adapters, then resume
    policy, value = lora_models(tok, base_dir, separate_value=separate)
    train(args(tmp_path / "b", max_steps=4, save_every=2, resume=True), tok, policy, value, exs)
    resumed = [p.detach() for p in policy.parameters()] + [p.detach() for p in value.parameters()]
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def write_qwen_run_files(tok, tmp_path):
    """A tiny random Qwen2 for ``tok`` in ``tmp_path/qwen`` (seeded), 8 rows of half-right
    data in ``data.jsonl`` and 4 of its prompts with answers in ``test.jsonl``; returns the
    8 problems."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        max_position_embeddings=128)).save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    probs = arithmetic.make_problems(8, 3)
    D.write_jsonl(tmp_path / "data.jsonl", [
        dict(prompt=p.prompt, response=f"#### {p.answer if i % 2 else 0}", reward=float(i % 2))
        for i, p in enumerate(probs)])
    D.write_jsonl(tmp_path / "test.jsonl", [dict(prompt=p.prompt, answer=p.answer)
                                            for p in probs[:4]])
    return probs


@pytest.mark.parametrize("padding_flags", [(), ("--packing", "--group-by-length")],
                         ids=["padded", "packed"])
def test_command_line_lora_shared_base_checkpointing_resume_and_evaluate(tok, tmp_path,
                                                                         capsys, padding_flags):
    """python -m dqo.train on a local tiny Qwen2 with LoRA, the shared-base value model and
    checkpointing (and packed, length-grouped micro-batches); its adapters saved, resumed, and
    read back by dqo.evaluate."""
    from dqo import evaluate
    from dqo import train as train_cli
    write_qwen_run_files(tok, tmp_path)
    def argv(out, *extra):
        return ["--model", str(tmp_path / "qwen"), "--data", str(tmp_path / "data.jsonl"),
                "--task", "arithmetic", "--lora-r", "4", "--value-backbone", "shared",
                "--gradient-checkpointing", "--engine", "torch", "--threads", "1",
                "--batch-size", "4", "--micro-batch", "2", "--max-steps", "3",
                "--save-every", "1", "--lr", "1e-3",
                "--out", str(out), "--no-progress", *padding_flags, *extra]

    train_cli.main(argv(tmp_path / "straight"))
    out = tmp_path / "run"
    with killed_at_call(5), pytest.raises(SystemExit) as e:  # Ctrl-C: exit code 130
        train_cli.main(argv(out))
    assert e.value.code == 130
    ckpt = out / "checkpoints" / "step-0000002"
    saved = load_file(ckpt / "policy" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # the adapter, not the base
    # the checkpoint's adapter loads with peft alone, on the base its config names
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen")
    at_2 = peft.PeftModel.from_pretrained(base, ckpt / "policy")
    lora_a = next(k for k in saved if "lora_A" in k)
    torch.testing.assert_close(at_2.state_dict()[lora_a.replace(".weight", ".default.weight")],
                               saved[lora_a], rtol=0, atol=0)
    ckpt_tok, _ = load_policy(str(ckpt / "policy"))  # no tokenizer there: the base's
    assert ckpt_tok.get_vocab() == AutoTokenizer.from_pretrained(tmp_path / "qwen").get_vocab()
    train_cli.main(argv(out, "--resume"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    adapter = "final/policy/adapter_model.safetensors"
    a, b = load_file(tmp_path / "straight" / adapter), load_file(out / adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    evaluate.main(["--model", str(out / "final" / "policy"), "--data",
                   str(tmp_path / "test.jsonl"), "--task", "arithmetic", "--samples", "0",
                   "--max-new-tokens", "4"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 4 and 0 <= res["greedy"] <= 1
    assert not (out / "final" / "policy-merged").exists()  # only on request


def same_greedy_evaluation(adapter_dir, merged_dir, test_data, capsys):
    """dqo.evaluate on the adapter and on the merged model: the same greedy results, and the
    same greedy texts from the same prompts."""
    from dqo import evaluate
    from dqo.decoding import DecodingConfig
    from dqo.generation import generate
    results = []
    for model in (adapter_dir, merged_dir):
        capsys.readouterr()
        evaluate.main(["--model", str(model), "--data", str(test_data), "--task",
                       "arithmetic", "--samples", "0", "--max-new-tokens", "6"])
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        results.append({k: v for k, v in res.items() if k != "model"})
    assert results[0] == results[1]
    prompts = [json.loads(x)["prompt"] for x in test_data.read_text().splitlines()]
    texts = []
    for model in (adapter_dir, merged_dir):
        tok, m = load_policy(str(model))
        texts.append([s.text for ss in generate(m, tok, prompts, n=1, greedy=True,
                                                decoding=DecodingConfig(max_new_tokens=6))
                      for s in ss])
    assert texts[0] == texts[1]


def test_save_merged_writes_a_plain_model_that_evaluates_as_the_adapter(tok, tmp_path, capsys):
    """--save-merged: final/policy-merged loads with transformers alone (no adapter
    files), gives the adapter's logits, and dqo.evaluate's greedy results."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dqo import train as train_cli
    probs = write_qwen_run_files(tok, tmp_path)
    out = tmp_path / "run"
    train_cli.main(["--model", str(tmp_path / "qwen"), "--data", str(tmp_path / "data.jsonl"),
                    "--lora-r", "4", "--engine", "torch", "--threads", "1", "--batch-size", "4",
                    "--micro-batch", "4", "--max-steps", "2", "--lr", "1e-2", "--save-merged",
                    "--out", str(out), "--no-progress"])
    merged = out / "final" / "policy-merged"
    assert not (merged / "adapter_config.json").exists()
    assert (merged / "decoding.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert AutoTokenizer.from_pretrained(merged).get_vocab() == AutoTokenizer.from_pretrained(
        out / "final" / "policy").get_vocab()
    _, with_adapter = load_policy(str(out / "final" / "policy"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen")
    ids = tok(probs[0].prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = plain(ids).logits
        torch.testing.assert_close(logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)
        assert (logits - base(ids).logits).abs().max() > 1e-3  # the adapter trained
    same_greedy_evaluation(out / "final" / "policy", merged, tmp_path / "test.jsonl", capsys)


def test_save_merged_needs_lora():
    from dqo.errors import UsageError
    with pytest.raises(UsageError, match="--save-merged: needs --lora-r"):
        TrainConfig(save_merged=True).check()


def test_embedded_default_with_lora_on_a_shared_base(tmp_path):
    """The embedded default's pipeline with LoRA, the shared base and checkpointing; its
    final/policy adapter names the warmed-up base on disk, so it loads on its own."""
    from dqo.pipeline import DefaultPipeline
    from dqo.runs import run_default
    from dqo.train import parse_args
    pipe = DefaultPipeline(n_sft=32, n_offline=4, n_test=4, samples_per_prompt=2,
                           sft_max_steps=2, max_new_tokens=8)
    args = TrainConfig(**{**parse_args([]).__dict__, "out": str(tmp_path / "d"),
                          "progress": False, "batch_size": 8, "micro_batch": 8, "epochs": 1,
                          "eval_samples": 0, "save_every": 0, "lora_r": 4,
                          "value_backbone": "shared", "gradient_checkpointing": True})
    res = run_default(args, pipe)
    assert 0 <= res["after"]["greedy"] <= 1
    final = tmp_path / "d" / "final" / "policy"
    assert json.loads((final / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str((tmp_path / "d" / "base").resolve())
    _, loaded = load_policy(str(final))
    assert loaded.config.vocab_size > 0


def test_a_checkpoint_of_another_rank_is_a_clear_error(tok, base_dir, tmp_path):
    from dqo.engine import OptimConfig, TorchEngine
    from dqo.errors import CheckpointError
    engine = TorchEngine(PolicyLogprobs(lora_models(tok, base_dir, shared=False)[0]),
                         OptimConfig())
    engine.save_checkpoint(tmp_path / "ckpt")
    other = add_policy_adapter(build_policy(path=str(base_dir)),
                               lora_config(8, 8, 0.0, "all-linear"))
    with pytest.raises(CheckpointError, match="--lora-r"):
        TorchEngine(PolicyLogprobs(other), OptimConfig()).load_checkpoint(tmp_path / "ckpt")
    fewer = add_policy_adapter(build_policy(path=str(base_dir)), lora_config(4, 8, 0.0, "q_proj"))
    with pytest.raises(CheckpointError, match="--lora-target-modules"):
        TorchEngine(PolicyLogprobs(fewer), OptimConfig()).load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_with_deepspeed_trains_saves_and_resumes(tok, base_dir, tmp_path, stage):
    """--lora-r with --engine deepspeed (CPU, gloo, one process): the adapters train, each
    checkpoint carries the policy adapter in peft's format beside DeepSpeed's files, and a run
    killed in step 3 resumes to the same adapters as a straight run."""
    pytest.importorskip("deepspeed")
    kw = dict(engine="deepspeed", zero_stage=stage, max_steps=4, save_every=2)
    policy, value = lora_models(tok, base_dir, separate_value=True)
    exs = examples(tok, policy)
    before = [p.detach().clone() for p in adapter_parameters(policy, POLICY_ADAPTER)]
    train(args(tmp_path / "a", **kw), tok, policy, value, exs)
    straight = [p.detach().clone() for p in adapter_parameters(policy, POLICY_ADAPTER)]
    assert any(not torch.equal(p, q) for p, q in zip(before, straight))

    policy, value = lora_models(tok, base_dir, separate_value=True)
    with killed_at_call(5), pytest.raises(KeyboardInterrupt):
        train(args(tmp_path / "b", **kw), tok, policy, value, exs)
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "step-0000002" / "policy"
    at_2 = load_file(ckpt / "adapter_model.safetensors")
    assert at_2 and all("lora_" in k for k in at_2)
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4
    policy, value = lora_models(tok, base_dir, separate_value=True)
    train(args(tmp_path / "b", resume=True, **kw), tok, policy, value, exs)
    for a, b in zip(straight, adapter_parameters(policy, POLICY_ADAPTER)):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
    final = load_file(tmp_path / "b" / "run" / "final" / "policy" / "adapter_model.safetensors")
    assert final.keys() == at_2.keys()


def test_shared_value_backbone_with_deepspeed_is_a_usage_error(tok, base_dir):
    from dqo.errors import UsageError
    from dqo.runs import prepare_models
    a = TrainConfig(lora_r=4, value_backbone="shared", engine="deepspeed")
    with pytest.raises(UsageError, match="--value-backbone shared: runs on --engine torch"):
        prepare_models(a, build_policy(path=str(base_dir)))

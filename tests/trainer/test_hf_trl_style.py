"""dqo.hf.DQOTrainer used the way TRL's KTOTrainer is: a model path, a DQOConfig, a dataset of
prompts and completions (text or conversations) with labels, peft_config; checkpoints that the
standard loaders read and that resume; the DQO metrics in the Trainer's log."""
import math

import pytest
import torch
from hf_tiny import save_tiny_chat_model

from dqo.errors import DataError, UsageError

pytest.importorskip("accelerate")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated",
                                        "ignore:`is_gradient_checkpointing` is deprecated",
                                        "ignore:'pin_memory' argument")

METRICS = ("kl", "log_ratio_mean", "is_ess", "is_weight_clip_frac", "value_explained_var",
           "policy_loss", "value_loss")


def conversations():
    ask = lambda q: [{"role": "user", "content": q}]  # noqa: E731
    say = lambda a: [{"role": "assistant", "content": a}]  # noqa: E731
    system = [{"role": "system", "content": "Answer briefly."}]
    return datasets.Dataset.from_list([
        {"prompt": system + ask("What is 2 + 3?"), "completion": say("It is 5."), "label": True},
        {"prompt": ask("What is 2 + 3?"), "completion": say("It is 6."), "label": False},
        {"prompt": ask("What is 7 * 6?"), "completion": say("The answer is 42."), "label": True},
        {"prompt": ask("What is 7 * 6?"), "completion": say("It is 44."), "label": False},
    ])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tied-embedding chat model on disk."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")


def tokenizer(model):
    """The model's own tokenizer (a BPE trained anew may merge ties in another order)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model)


def config(out, **kw):
    from dqo.hf import DQOConfig
    base = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=2,
                learning_rate=1e-2, value_learning_rate=3e-2, logging_steps=1,
                save_strategy="steps", save_steps=1, report_to=[], seed=0, use_cpu=True,
                lr_scheduler_type="constant", is_clip=2.0)
    return DQOConfig(**{**base, **kw})


def lora():
    from peft import LoraConfig
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


def trainer(model, out, dataset=None, peft=False, **kw):
    from dqo.hf import DQOTrainer
    torch.manual_seed(0)
    return DQOTrainer(model=str(model), args=config(out, **kw),
                      train_dataset=conversations() if dataset is None else dataset,
                      peft_config=lora() if peft else None)


def weights(t):
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0, msg=lambda m: k + m)


def test_peft_policy_tied_embeddings_checkpoints_load_resume_and_log_metrics(tiny, tmp_path):
    pytest.importorskip("peft")
    from peft import AutoPeftModelForCausalLM

    from dqo.modeling import ValueModel
    t = trainer(tiny, tmp_path / "a", peft=True, gradient_checkpointing=True)
    t.train()
    policy = t.model.policy
    assert policy.get_base_model().model.gradient_checkpointing
    assert t.model.value.backbone.gradient_checkpointing
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "tokenizer.json").is_file()
    assert not (ckpt / "model.safetensors").exists()  # the adapter, not the whole model
    card = (ckpt / "README.md").read_text()
    assert "DQO" in card and "| `beta` | 0.1 |" in card and "library_name: peft" in card
    loaded = AutoPeftModelForCausalLM.from_pretrained(ckpt)
    assert loaded.config.tie_word_embeddings
    lora_b = [v for k, v in loaded.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # the trained adapter
    # the value model: a copy of the base with an adapter of its own (as --lora-r gives it)
    value = t.model.value
    assert (ckpt / "value" / "adapter_config.json").is_file()
    trained = [n for n, p in value.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n or n.startswith("head.") for n in trained)
    final = ValueModel.from_pretrained(tmp_path / "a" / "checkpoint-3" / "value").eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(final(ids, torch.ones_like(ids)),
                               value.eval()(ids, torch.ones_like(ids)))

    logs = [h for h in t.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert all(k in h for k in METRICS), h
        assert h["kl"] >= 0 and 0 <= h["is_weight_clip_frac"] <= 1 and 0 < h["is_ess"] <= 1
    assert logs[-1]["kl"] > 0  # the policy moved away from the reference (adapter off)

    straight = weights(t)
    resumed = trainer(tiny, tmp_path / "b", peft=True, gradient_checkpointing=True)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert_same(straight, weights(resumed))


def test_full_model_checkpoints_load_with_from_pretrained_and_resume(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    t = trainer(tiny, tmp_path / "a")
    t.train()
    # the value model's parameters learn at value_learning_rate, the policy's at learning_rate
    value = {id(p) for p in t.model.value.parameters()}
    rates = {g["lr"] for g in t.optimizer.param_groups if id(g["params"][0]) in value}
    assert rates == {3e-2}
    ckpt = tmp_path / "a" / "checkpoint-2"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert loaded.config.tie_word_embeddings
    assert "library_name: transformers" in (ckpt / "README.md").read_text()
    assert all(k in h for h in t.state.log_history if "loss" in h for k in METRICS)
    straight = weights(t)
    resumed = trainer(tiny, tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert_same(straight, weights(resumed))


def test_conversations_go_through_the_chat_template_system_turns_kept(tiny, tmp_path):
    from dqo.decoding import encode_prompt
    tok = tokenizer(tiny)
    t = trainer(tiny, tmp_path, max_steps=1)
    row = t.train_dataset[0]
    prompt = tok.decode(row["input_ids"][:row["prompt_length"]])
    assert prompt == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n"
                      "What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    response = row["input_ids"][row["prompt_length"]:]
    assert tok.decode(response) == "It is 5.<|im_end|>"  # the completion, ended by its turn
    assert row["rewards"][-1] == 1.0 and t.train_dataset[1]["rewards"][-1] == 0.0
    assert row["finished"] and len(row["ref_logp"]) == len(response)
    # the same prompt as text: a user turn (sampling's encode_prompt, the same ids)
    text = datasets.Dataset.from_list([dict(prompt="What is 2 + 3?", completion="It is 5.",
                                            reward=0.5)])
    t = trainer(tiny, tmp_path, dataset=text, max_steps=1, system_prompt="Answer briefly.")
    row = t.train_dataset[0]
    assert row["input_ids"][:row["prompt_length"]] == encode_prompt(
        tok, "What is 2 + 3?", system_prompt="Answer briefly.")
    assert row["input_ids"][:row["prompt_length"]] == t.processing_class.apply_chat_template(
        conversations()[0]["prompt"], add_generation_prompt=True, tokenize=True,
        return_dict=False)
    assert row["rewards"][-1] == 0.5


def test_text_prompts_without_a_chat_template(tiny, tmp_path):
    from dqo.decoding import encode_prompt
    from dqo.hf import DQOTrainer
    tok = tokenizer(tiny)
    tok.chat_template = None
    data = [dict(prompt="What is 2 + 3?", completion="It is 5.", label=True),
            dict(prompt="What is 7 * 6?", completion="It is 1.", label=False)]
    t = DQOTrainer(str(tiny), args=config(tmp_path, max_steps=1, prompt_template="paper-gsm8k"),
                   train_dataset=data, processing_class=tok)
    row = t.train_dataset[0]
    assert row["input_ids"][:row["prompt_length"]] == encode_prompt(
        tok, "What is 2 + 3?\nPlease reason step by step, and produce a final answer following "
        "4 '#', like '#### 0'.")
    t.train()
    with pytest.raises(DataError, match=r"train_dataset\[0\]: prompt: a conversation .* needs a "
                                        "tokenizer with a chat template"):
        DQOTrainer(str(tiny), args=config(tmp_path), train_dataset=conversations(),
                   processing_class=tok)


def test_rows_dqo_sample_writes_are_kept_exactly(tiny, tmp_path):
    from dqo.hf import DQOTrainer
    tok = tokenizer(tiny)
    ids = tok("The answer is 5.", add_special_tokens=False)["input_ids"]
    rows = [dict(prompt="What is 2 + 3?", response="The answer is 5.",
                 response_ids=ids + [tok.eos_token_id], behavior_logp=[-0.5] * (len(ids) + 1),
                 finished=True, reward=1.0, correct=True, answer="5"),
            dict(prompt="What is 2 + 3?", response="The answer",  # cut at the length limit
                 response_ids=ids[:3], behavior_logp=[-0.25, -1.0, -2.0], finished=False,
                 reward=0.0, correct=False, answer="5")]
    t = DQOTrainer(str(tiny), args=config(tmp_path, max_steps=2), train_dataset=rows)
    for row, got in zip(rows, t.train_dataset):
        assert got["input_ids"][got["prompt_length"]:] == row["response_ids"]
        assert got["behavior_logp"] == row["behavior_logp"]
        assert got["finished"] == row["finished"]
    t.train()
    drop = DQOTrainer(str(tiny), args=config(tmp_path, truncated="drop"), train_dataset=rows)
    assert len(drop.train_dataset) == 1


def test_value_model_from_a_path_of_another_size(tiny, tmp_path):
    from dqo.hf import DQOTrainer
    other = save_tiny_chat_model(tmp_path / "value", hidden_size=32, tied=False, seed=3)
    t = DQOTrainer(str(tiny), args=config(tmp_path / "out", max_steps=2),
                   train_dataset=conversations(), value_model=str(other))
    value = t.model.value
    assert value.backbone.config.hidden_size == 32 and t.model.policy.config.hidden_size == 16
    assert value.head.weight.abs().sum() == 0  # a fresh head
    t.train()
    assert value.head.weight.abs().sum() > 0
    # a checkpoint's value/ loads as the value model it saved
    again = DQOTrainer(str(tiny), args=config(tmp_path / "again", max_steps=1),
                       train_dataset=conversations(),
                       value_model=str(tmp_path / "out" / "checkpoint-2" / "value"))
    torch.testing.assert_close(again.model.value.head.weight, value.head.weight)


def test_reference_log_probs_per_step_are_the_adapter_free_base(tiny, tmp_path):
    """precompute_ref_log_probs=False: each step's reference is the policy with its adapter
    off, the same log-probs the precomputed pass gives, whatever the adapter has learnt."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from dqo.modeling import policy_logprobs
    pre = trainer(tiny, tmp_path / "pre", peft=True)
    live = trainer(tiny, tmp_path / "live", peft=True, precompute_ref_log_probs=False)
    assert "ref_logp" not in live.train_dataset[0]
    batch = pre.data_collator([pre.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        for n, p in live.model.policy.named_parameters():
            if "lora_B" in n:
                p.normal_()  # an adapter that changes the policy
    inputs = {k: v for k, v in batch.items() if k != "ref_logp"}
    got = live._reference_logp(inputs)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    want = policy_logprobs(base, batch["input_ids"], batch["attention_mask"],
                           batch["action_mask"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["ref_logp"], want, rtol=1e-5, atol=1e-5)
    live.train()
    assert all(k in h for h in live.state.log_history if "loss" in h for k in METRICS)


def test_eval_dataset_logs_eval_metrics(tiny, tmp_path):
    from dqo.hf import DQOTrainer
    t = DQOTrainer(str(tiny), args=config(tmp_path, max_steps=1, save_strategy="no",
                                          eval_strategy="steps", eval_steps=1),
                   train_dataset=conversations(), eval_dataset=conversations())
    t.train()
    ev = [h for h in t.state.log_history if "eval_loss" in h]
    assert ev and all(f"eval_{k}" in ev[0] for k in METRICS)


@pytest.mark.parametrize("bad, match", [
    (dict(beta=0), r"DQOConfig\.beta: expected a value in \(0, inf\), got 0"),
    (dict(loss_agg="mean"), r"DQOConfig\.loss_agg: expected one of token-mean"),
    (dict(value_learning_rate=-1.0), r"DQOConfig\.value_learning_rate: expected a value"),
    (dict(max_length=8, max_prompt_length=8), r"DQOConfig\.max_prompt_length: expected less"),
    (dict(truncated="cut"), r"DQOConfig\.truncated: expected one of bootstrap, drop, penalize"),
    (dict(prompt_template="missing.txt"), r"DQOConfig\.prompt_template: expected one of"),
])
def test_config_refuses_bad_values_naming_the_field(tmp_path, bad, match):
    with pytest.raises(UsageError, match=match):
        config(tmp_path, **bad)


def test_config_declares_every_loss_option_once():
    import dataclasses

    from dqo.configs import DQOLossConfig
    from dqo.hf import DQOConfig
    mine = {f.name: f for f in dataclasses.fields(DQOConfig)}
    for f in dataclasses.fields(DQOLossConfig):
        assert mine[f.name].metadata is f.metadata  # inherited, not redeclared


def test_bad_rows_name_their_index(tiny, tmp_path):
    from dqo.hf import DQOTrainer
    rows = [dict(prompt="What is 2 + 3?", completion="5", label=True),
            dict(prompt="What is 2 + 3?", completion="6", label="no")]
    with pytest.raises(DataError, match=r"train_dataset\[1\]: 'label' must be true or false"):
        DQOTrainer(str(tiny), args=config(tmp_path), train_dataset=rows)
    with pytest.raises(DataError, match=r"train_dataset\[0\]: expected 'label'"):
        DQOTrainer(str(tiny), args=config(tmp_path), train_dataset=[dict(prompt="a",
                                                                         completion="b")])


def test_metric_store_averages_the_interval():
    from dqo.hf.metrics import MetricStore, kl_estimate
    store = MetricStore()
    for kl, ev in ((0.1, 0.5), (0.3, math.nan)):
        store.add("train", {"kl": torch.tensor(kl), "ev": torch.tensor(ev)})
    assert store.pop("train") == pytest.approx({"kl": 0.2, "ev": 0.5})
    assert store.pop("train") == {}
    logp, ref = torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([[0.0, -2.0, -1.0]])
    mask = torch.tensor([[False, True, True]])
    want = ((math.exp(-1) - 1 + 1) + (math.exp(1) - 1 - 1)) / 2
    assert float(kl_estimate(logp, ref, mask)) == pytest.approx(want)


def test_config_parses_with_hf_argument_parser(tmp_path):
    """As TRL's scripts parse their configs: every DQO option a flag, checked when built."""
    from transformers import HfArgumentParser

    from dqo.hf import DQOConfig
    parser = HfArgumentParser(DQOConfig)
    args, = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--beta", "0.3", "--is_policy", "false",
        "--truncated", "drop", "--max_length", "64", "--value_learning_rate", "1e-4"])
    assert (args.beta, args.is_policy, args.truncated, args.max_length,
            args.value_learning_rate) == (0.3, False, "drop", 64, 1e-4)
    with pytest.raises(UsageError, match=r"DQOConfig\.beta: expected a value in \(0, inf\)"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--beta", "-1"])


def test_render_prompt_keeps_turns_and_wraps_the_last_user_turn(tiny):
    from dqo.prompts import render_prompt
    tok = tokenizer(tiny)
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    got = render_prompt(tok, chat, system_prompt="ignored: the chat has one",
                        template="{prompt}!")
    assert got == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
                   "<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc!<|im_end|>\n"
                   "<|im_start|>assistant\n")
    assert render_prompt(tok, "q", system_prompt="S") == render_prompt(tok, chat[:1] + [
        {"role": "user", "content": "q"}])
    tok.chat_template = None
    assert render_prompt(tok, "q", template="Q: {prompt}") == "Q: q"
    for bad in (chat, [{"role": "user"}]):
        with pytest.raises(UsageError, match="prompt: "):
            render_prompt(tok, bad)


def test_lengths_and_step_rewards(tiny, tmp_path):
    """max_prompt_length keeps a prompt's last tokens; max_length cuts the completion, which is
    then unfinished (its return bootstraps); step_rewards land on the ends of the lines."""
    from dqo.decoding import encode_prompt
    from dqo.hf import DQOTrainer
    tok = tokenizer(tiny)
    rows = [dict(prompt="What is 2 + 3?", completion="It is 5.\nThe answer is 5.",
                 step_rewards=[0.25, 0.5], reward=1.0)]
    t = DQOTrainer(str(tiny), args=config(tmp_path, max_prompt_length=6), train_dataset=rows)
    row = t.train_dataset[0]
    full = encode_prompt(tok, "What is 2 + 3?")
    assert row["prompt_length"] == 6 and row["input_ids"][:6] == full[-6:]
    response = row["input_ids"][6:]
    first_line = len(tok("It is 5.", add_special_tokens=False)["input_ids"])
    want = [0.0] * len(response)
    want[first_line - 1] += 0.25
    want[-2] += 0.5  # the last line ends before the end-of-turn token
    want[-1] += 1.0
    assert row["rewards"] == want and row["finished"]
    cut = DQOTrainer(str(tiny), args=config(tmp_path, max_length=len(full) + 3),
                     train_dataset=rows).train_dataset[0]
    assert len(cut["input_ids"]) == len(full) + 3 and not cut["finished"]


def test_a_peft_model_given_as_the_model(tiny, tmp_path):
    """A policy the user wrapped with peft: its adapter trains, the reference is its base, and
    the value model is a plain copy of its backbone with an adapter of its own (none of the
    policy's LoRA layers inside it)."""
    pytest.importorskip("peft")
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from dqo.hf import DQOTrainer
    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), lora())
    t = DQOTrainer(policy, args=config(tmp_path, max_steps=2), train_dataset=conversations(),
                   processing_class=tokenizer(tiny))
    value = t.model.value.backbone
    assert value.peft_config and value.base_model.model is not policy.get_base_model().model
    names = [n for n, _ in value.named_parameters()]
    assert sum(".lora_A." in n for n in names) == sum(
        ".lora_A." in n for n, _ in policy.named_parameters())  # one adapter, not two
    t.train()
    assert any(h.get("kl", 0) > 0 for h in t.state.log_history)


def test_options_belong_in_the_config(tiny, tmp_path):
    from dqo.hf import DQOTrainer
    with pytest.raises(TypeError, match=r"give the loss options .* in it.*\(beta, value_lr\)"):
        DQOTrainer(str(tiny), args=config(tmp_path), train_dataset=conversations(), beta=0.2,
                   value_lr=1e-3)

"""dqo.sample's rows feed dqo.hf.DQOTrainer through one function, dqo.data.trainer_rows: read,
tokenized and given their reference log-probs, they batch (DQOCollator) to the same tensors as
the trainer's own loop (dqo.data.collate)."""
import pytest
import torch

from dqo import data as D
from dqo.decoding import DecodingConfig
from dqo.generation import generate, label_samples
from dqo.hf import DQOCollator
from dqo.reference_logps import ref_logps
from dqo.tasks import arithmetic, get_verifier


@pytest.mark.parametrize("padding", ["right", "left"])
def test_sampled_rows_feed_the_trainer_as_the_loop_sees_them(tok, policy, tmp_path, padding):
    probs = arithmetic.make_problems(3, 0)
    torch.manual_seed(1)
    samples = generate(policy, tok, [p.prompt for p in probs], n=2,
                       decoding=DecodingConfig(max_new_tokens=12))
    rows = label_samples([p.prompt for p in probs], [p.answer for p in probs], samples,
                         get_verifier("arithmetic"))
    rows[0]["reward"] = 1.0
    rows.append(dict(prompt="1+2=?", steps=["1+2=3", "#### 3"], step_rewards=[0.25, 0.0],
                     reward=1.0))  # a hand-written row: text only, no behaviour log-probs
    path = tmp_path / "data.jsonl"
    D.write_jsonl(path, rows)

    read, errors = D.read_jsonl(path, strict=True)
    examples, _ = D.tokenize_rows(read, tok, strict=True)
    assert not errors and any(not e.finished for e in examples)
    ref = ref_logps(policy, examples, tok.pad_token_id)
    assert all(e.ref_logp is None for e in examples)  # nothing attached to the examples
    dataset = D.trainer_rows(examples, ref)
    assert len(dataset) == len(rows)
    got = DQOCollator(tok.pad_token_id, padding=padding)(dataset)

    for e, lp in zip(examples, ref):
        e.ref_logp = lp
    want = D.collate(examples, tok.pad_token_id, padding=padding)
    for key in ("input_ids", "attention_mask", "action_mask", "rewards", "ref_logp",
                "behavior_logp"):
        torch.testing.assert_close(got[key], getattr(want, key), msg=key)
    assert got["finished"].tolist() == (~want.unfinished).tolist()
    assert D.trainer_rows(examples) == dataset  # the examples' own ref_logp, once attached


def test_trainer_rows_need_the_reference_log_probs(tok):
    ex = D.tokenize_row(D.check_row(dict(prompt="1+2=?", response="3", reward=1.0), "x:1"), tok)
    with pytest.raises(ValueError, match="x:1: needs the reference log-prob of each of its 2"):
        D.trainer_rows([ex])
    with pytest.raises(ValueError, match="1 lists for 2 examples"):
        D.trainer_rows([ex, ex], [[0.0, 0.0]])


def _tied_trainer(out, max_steps, adapter=None, **kw):
    pytest.importorskip("accelerate")
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainingArguments

    from dqo.hf import DQOCollator, DQOTrainer, PolicyWithValue
    from dqo.modeling import ValueModel
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=0))
    value = ValueModel.from_policy(policy)
    if adapter is not None:  # a peft policy, its value model a copy of the base
        import peft
        torch.manual_seed(1)
        policy = peft.get_peft_model(policy, adapter)
    model = PolicyWithValue(policy, value)
    torch.nn.init.normal_(model.value.head.weight, std=0.1)
    rows = [dict(input_ids=[5, 6, 7, 8, 9][:n], prompt_length=2, reward=float(n % 2),
                 ref_logp=[-4.0] * (n - 2)) for n in (3, 4, 5, 5, 4, 3, 5, 4)]
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, report_to=[],
                             save_strategy="steps", save_steps=1, use_cpu=True,
                             learning_rate=1e-2, per_device_train_batch_size=2, seed=0,
                             lr_scheduler_type="constant")
    return model, DQOTrainer(model=model, args=args, train_dataset=rows,
                             data_collator=DQOCollator(0), **kw)


def test_trainer_checkpoints_load_with_from_pretrained_and_resume(tmp_path):
    """Tied embeddings (Qwen2.5 <= 3B, Llama-3.2, Gemma) used to crash the first save; a
    checkpoint is now the policy in transformers' format, the value model beside it."""
    from transformers import AutoModelForCausalLM

    from dqo.modeling import ValueModel
    model, trainer = _tied_trainer(tmp_path / "a", 3)
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert loaded.config.tie_word_embeddings
    value = ValueModel.from_pretrained(ckpt / "value")
    assert value.head.weight.shape == (1, 16)
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    model, trainer = _tied_trainer(tmp_path / "b", 3)
    trainer.train(resume_from_checkpoint=str(ckpt))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, straight[k], rtol=0, atol=0, msg=lambda m: k + m)


def test_trainer_with_a_peft_policy_saves_and_resumes_its_adapter(tmp_path):
    pytest.importorskip("peft")
    from dqo.lora import lora_config

    def build(out):
        return _tied_trainer(out, 3, adapter=lora_config(4, 8, 0.0, "all-linear"))

    model, trainer = build(tmp_path / "a")
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "value" / "value_head.pt").is_file()
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    model, trainer = build(tmp_path / "b")
    trainer.train(resume_from_checkpoint=str(ckpt))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, straight[k], rtol=0, atol=0, msg=lambda m: k + m)

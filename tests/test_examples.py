"""The drop-in examples run as written (tiny models from configs, no download), and the
Trainer integration keeps token-mean exact under gradient accumulation."""
import runpy
from pathlib import Path

import pytest
import torch

from dqo_kernels import action_targets, response_mask, to_actions

ROOT = Path(__file__).resolve().parent.parent


def test_response_mask_left_and_right_padding():
    attn = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    mask = response_mask(attn, torch.tensor([2, 3, 6]))
    assert mask.tolist() == [[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1],
                             [0, 0, 0, 0, 0, 0, 1]]
    ids = torch.arange(21).view(3, 7)
    t = action_targets(ids, mask)
    assert t.shape == (3, 6) and t[0].tolist() == [-100, 2, 3, 4, -100, -100]
    assert to_actions(torch.ones(3, 6))[:, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match=r"prompt_lengths: expected shape \(3,\)"):
        response_mask(attn, torch.tensor([1, 2]))


def test_plain_loop_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "plain_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("step ") == 5 and "nan" not in out


def test_hf_trainer_example_runs(tmp_path):
    pytest.importorskip("accelerate")
    example = runpy.run_path(str(ROOT / "examples" / "hf_trainer.py"))
    trainer = example["main"](str(tmp_path))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(x == x for x in losses)


def test_trainer_token_mean_is_exact_under_gradient_accumulation(tmp_path):
    """One optimizer step over the same 8 rows: 8 x 1 and 4 x 2 accumulation steps give the
    same weights (the loss's num_tokens is the step's action-token count)."""
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from dqo.hf import DQOCollator, DQOTrainer, PolicyWithValue
    from dqo.modeling import ValueModel
    example = runpy.run_path(str(ROOT / "examples" / "hf_trainer.py"))
    results = []
    for per_device, accumulate in ((8, 1), (4, 2), (2, 4)):
        torch.manual_seed(0)
        from transformers import LlamaConfig, LlamaForCausalLM
        policy = LlamaForCausalLM(LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
        collator = DQOCollator(pad_token_id=0)
        data = example["with_ref_logp"](policy, example["rows"](n=8, seed=1), collator)
        for r in data:  # a behaviour policy unlike the reference: IS weights != 1
            r["behavior_logp"] = [x - 0.05 for x in r["ref_logp"]]
        args = TrainingArguments(output_dir=str(tmp_path / f"{per_device}"), max_steps=1,
                                 per_device_train_batch_size=per_device,
                                 gradient_accumulation_steps=accumulate, learning_rate=0.1,
                                 optim="sgd", report_to=[], save_strategy="no", use_cpu=True,
                                 lr_scheduler_type="constant", max_grad_norm=0.0)
        model = PolicyWithValue(policy, ValueModel.from_policy(policy))
        torch.nn.init.normal_(model.value.head.weight, std=0.1)
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        DQOTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                   beta=0.1, is_clip=2.0).train()
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert any(not torch.equal(results[0][k], v) for k, v in initial.items())  # it stepped
    for other in results[1:]:
        for k, v in results[0].items():
            torch.testing.assert_close(other[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: k + m)


def test_trl_style_example_runs(tmp_path):
    """examples/trl_style.py as written, on a tiny local chat model (tied embeddings): the
    DQO metrics reach the Trainer's log."""
    pytest.importorskip("peft")
    from hf_tiny import save_tiny_chat_model
    model = save_tiny_chat_model(tmp_path / "model")
    example = runpy.run_path(str(ROOT / "examples" / "trl_style.py"))
    trainer = example["main"](str(model), str(tmp_path / "out"), max_steps=2)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["kl"] >= 0 and "is_ess" in h for h in logs)

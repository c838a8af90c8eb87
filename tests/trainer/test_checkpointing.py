"""Activation (gradient) checkpointing of the policy and the value model: the same update,
with each decoder layer's activations recomputed in the backward."""
import pytest
import torch


def _step(gc: bool, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from dqo.hf import DQOCollator, DQOTrainer, PolicyWithValue
    from dqo.modeling import ValueModel
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    model = PolicyWithValue(policy, ValueModel.from_policy(policy))
    torch.nn.init.normal_(model.value.head.weight, std=0.1)
    rows = [dict(input_ids=[5, 6, 7, 8, 9][:n], prompt_length=2, reward=float(n % 2),
                 ref_logp=[-4.0] * (n - 2)) for n in (3, 4, 5, 5)]
    args = TrainingArguments(output_dir=str(tmp_path / str(gc)), max_steps=2, report_to=[],
                             save_strategy="no", use_cpu=True, learning_rate=1e-2,
                             gradient_checkpointing=gc, per_device_train_batch_size=2)
    DQOTrainer(model=model, args=args, train_dataset=rows,
               data_collator=DQOCollator(0)).train()
    flags = (policy.model.gradient_checkpointing, model.value.backbone.gradient_checkpointing)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, flags


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated")
def test_trainer_gradient_checkpointing_changes_nothing_but_memory(tmp_path):
    plain, flags = _step(False, tmp_path)
    assert flags == (False, False)
    checkpointed, flags = _step(True, tmp_path)
    assert flags == (True, True)  # both models, not just the policy
    for k, v in plain.items():
        torch.testing.assert_close(checkpointed[k], v, rtol=0, atol=0, msg=lambda m: k + m)

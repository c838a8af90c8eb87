"""DQO the way TRL's ``KTOTrainer`` is used: a model path, a conversational dataset of prompts,
completions and labels (desirable or not), a LoRA adapter and gradient checkpointing.

    python examples/trl_style.py [MODEL] [OUT_DIR]     # default: Qwen/Qwen2.5-0.5B-Instruct
"""
import sys

from datasets import Dataset
from peft import LoraConfig

from dqo.hf import DQOConfig, DQOTrainer


def main(model="Qwen/Qwen2.5-0.5B-Instruct", output_dir="runs/trl-style", max_steps=20):
    ask = lambda q: [{"role": "user", "content": q}]  # noqa: E731
    say = lambda a: [{"role": "assistant", "content": a}]  # noqa: E731
    train_dataset = Dataset.from_list([
        {"prompt": ask("What is 2 + 3?"), "completion": say("The answer is 5."), "label": True},
        {"prompt": ask("What is 2 + 3?"), "completion": say("The answer is 6."), "label": False},
        {"prompt": ask("What is 7 * 6?"), "completion": say("It is 42."), "label": True},
        {"prompt": ask("What is 7 * 6?"), "completion": say("It is 44."), "label": False},
    ])
    args = DQOConfig(output_dir=output_dir, beta=0.1, learning_rate=1e-5,
                     value_learning_rate=1e-4, per_device_train_batch_size=2,
                     max_steps=max_steps, gradient_checkpointing=True, logging_steps=1,
                     report_to=[])
    trainer = DQOTrainer(model=model, args=args, train_dataset=train_dataset,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainer.train()
    return trainer


if __name__ == "__main__":
    main(*sys.argv[1:3])

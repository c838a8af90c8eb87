"""The model card (``README.md``) of a ``DQOTrainer`` checkpoint: what trained the model and
with which hyper-parameters, so that a checkpoint on the Hub says how it was made."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..atomic import atomic_write

TRAINING_FIELDS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                   "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_steps", "seed")


def model_card(policy, args, loss_config, value_lr) -> str:
    peft = getattr(policy, "peft_config", None)
    base = getattr(policy, "name_or_path", "") or getattr(policy.config, "_name_or_path", "")
    rows = [(f.name, getattr(loss_config, f.name)) for f in fields(loss_config)]
    rows += [(k, getattr(args, k)) for k in TRAINING_FIELDS if hasattr(args, k)]
    rows.append(("value_learning_rate", value_lr if value_lr is not None else "learning_rate"))
    if peft:
        cfg = next(iter(peft.values()))
        rows += [("peft", type(cfg).__name__), ("r", getattr(cfg, "r", None))]
    table = "\n".join(f"| `{k}` | {v} |" for k, v in rows)
    front = [f"library_name: {'peft' if peft else 'transformers'}", "tags:", "- dqo",
             "- reinforcement-learning"]
    if base and not Path(base).exists():  # a Hub id, not a local path
        front.insert(0, f"base_model: {base}")
    return ("---\n" + "\n".join(front) + "\n---\n\n"
            f"# {Path(base).name or 'Model'} trained with DQO\n\n"
            "Trained with Direct Q-function Optimization (DQO: the policy as a soft Q-function "
            "with a learned value model, on offline responses and their rewards) by "
            "`dqo.hf.DQOTrainer` of dqo-kernels. The policy is this directory"
            + (" (a peft adapter)" if peft else "") + "; its value model is in `value/` "
            "(`dqo.modeling.ValueModel.from_pretrained`).\n\n"
            "| hyper-parameter | value |\n|---|---|\n" + table + "\n")


def write_model_card(output_dir, policy, args, loss_config, value_lr) -> None:
    text = model_card(policy, args, loss_config, value_lr)
    atomic_write(Path(output_dir) / "README.md", lambda f: f.write(text))

"""``DQOTrainer``: DQO in a ``transformers.Trainer``, used the way TRL's ``KTOTrainer`` is.

    trainer = DQOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=DQOConfig(output_dir="out"),
                         train_dataset=ds, peft_config=LoraConfig(r=16))
    trainer.train()

Exact token-mean under gradient accumulation and data parallelism: the collator's ``labels``
are the action tokens, so the Trainer's ``num_items_in_batch`` is the number of action tokens
of the whole optimizer step (every micro-batch, every rank with ``average_tokens_across_devices``,
its default); it is the loss's ``num_tokens``, and the Trainer neither divides the loss by the
accumulation steps (``model_accepts_loss_kwargs``) nor lets data parallelism average it away
(the loss is multiplied by the number of processes, as the Trainer's own ``compute_loss`` does).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import fields
from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer, TrainingArguments

from dqo_kernels import fused_dqo_loss

from .. import lora
from ..configs import VALUE_LR_RATIO, DQOLossConfig
from ..data import trainer_rows
from ..data.collate import trainer_row
from ..decoding import stop_token_ids
from ..errors import UsageError
from ..modeling import ValueModel, build_policy, policy_logprobs
from ..options import check_range
from ..reference_logps import ref_logps
from .card import write_model_card
from .config import DQOConfig, DQODataArgs
from .data import is_tokenized, tokenize_dataset
from .metrics import MetricStore, step_metrics
from .modules import DQOCollator, PolicyWithValue, load_value_model

LOSS_OPTIONS = tuple(f.name for f in fields(DQOLossConfig))


def backbone_config(peft_config):
    """A peft model's config for the value model's backbone: peft resolved its target modules
    to names under the causal LM (``model.layers.0.self_attn.q_proj``), which the backbone
    (``layers.0...``) matches by their last part."""
    cfg = copy.copy(peft_config)
    if cfg.target_modules is not None and not isinstance(cfg.target_modules, str):
        cfg.target_modules = sorted({t.split(".")[-1] for t in cfg.target_modules})
    return cfg


class DQOTrainer(Trainer):
    """A ``transformers.Trainer`` that trains a policy and its value model with the fused DQO
    loss.

    - ``model``: a causal LM or its path (loaded in fp32; ``bf16=True`` trains in mixed
      precision), or a :class:`PolicyWithValue`;
    - ``args``: a :class:`DQOConfig` (default: one with ``output_dir="<model name>-DQO"``); a
      plain ``TrainingArguments`` takes the loss options as keyword arguments (``beta=`` ...)
      or ``loss=DQOLossConfig(...)``, and ``value_lr=``;
    - ``train_dataset``/``eval_dataset``: a ``datasets.Dataset`` or a list of rows in TRL's
      unpaired format or ``dqo.sample``'s (:mod:`dqo.hf.data`), tokenized here with
      ``processing_class`` (default: the model's tokenizer), or rows already tokenized;
    - ``value_model``: a :class:`~dqo.modeling.ValueModel`, the path of one (``value/`` of a
      checkpoint) or of any transformers checkpoint (its backbone, a fresh scalar head), or None
      (a copy of the policy's backbone);
    - ``ref_model``: the reference policy; default: the policy as given (under ``peft_config``
      the policy with its adapter disabled: no second copy);
    - ``peft_config``: a peft config; the policy becomes ``get_peft_model(model, peft_config)``.

    The reference log-probs are computed once before training (``precompute_ref_log_probs``,
    batched, a progress bar) or in every step. Every log has the DQO metrics averaged over
    the interval (:mod:`dqo.hf.metrics`). A checkpoint is the policy in transformers' format
    (or peft's adapter) with the tokenizer and a model card, the value model in ``value/``;
    ``resume_from_checkpoint`` restores both models and their optimizer.
    """

    def __init__(self, model, args: Optional[TrainingArguments] = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, value_model=None, ref_model=None,
                 peft_config=None, data_collator=None, loss: Optional[DQOLossConfig] = None,
                 value_lr: Optional[float] = None, **kwargs):
        options = {k: kwargs.pop(k) for k in LOSS_OPTIONS if k in kwargs}
        if args is None:
            name = Path(model).name if isinstance(model, str) else "model"
            args = DQOConfig(output_dir=f"{name}-DQO", **options)
            options = {}
        if isinstance(args, DQOConfig):
            given = [*options, *(["loss"] if loss is not None else []),
                     *(["value_lr"] if value_lr is not None else [])]
            if given:
                raise TypeError(f"DQOTrainer: with a DQOConfig give the loss options and "
                                f"value_learning_rate in it, not as arguments "
                                f"({', '.join(given)})")
            self.loss_config, self.data_args = args.section(DQOLossConfig), args
            value_lr = args.value_learning_rate
        else:
            if loss is not None and options:
                raise TypeError(f"DQOTrainer: give loss= or the loss options "
                                f"({', '.join(options)}), not both")
            self.loss_config = loss if loss is not None else DQOLossConfig(**options)
            check_range("value_lr", value_lr, 0, float("inf"), low_open=True, high_open=True)
            self.data_args = DQODataArgs(value_learning_rate=value_lr)
        self.value_lr = value_lr
        args.remove_unused_columns = False  # the DQO columns are no model inputs

        if isinstance(model, PolicyWithValue):
            if value_model is not None or peft_config is not None:
                raise UsageError("DQOTrainer: a PolicyWithValue has its value model (and "
                                 "adapter) already; give value_model and peft_config with a "
                                 "plain policy")
            module = model
        else:
            module = self._build_models(model, value_model, peft_config)
        if processing_class is None:
            processing_class = self._tokenizer_of(model, module.policy)
        if processing_class is not None and processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        self.ref_model = ref_model
        self._metrics = MetricStore()

        raw = {"train_dataset": train_dataset, "eval_dataset": eval_dataset}
        examples = {k: self._tokenize(d, processing_class, module.policy, k)
                    for k, d in raw.items()}
        if data_collator is None:
            # any id pads: padded positions are masked out of attention, log-probs and loss
            pad = (processing_class.pad_token_id if processing_class is not None
                   else getattr(module.config, "pad_token_id", None))
            data_collator = DQOCollator(pad or 0)
        # the rows replace the raw datasets below, once the models are on their device
        super().__init__(model=module, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        # the loss is normalised by num_items_in_batch here: no 1 / accumulation steps
        self.model_accepts_loss_kwargs = True
        if self.ref_model is not None:
            self.ref_model.to(self.args.device).eval().requires_grad_(False)
        elif not self._peft and not self.data_args.precompute_ref_log_probs:
            # the policy moves from the first step on: the reference is a frozen copy of it
            self.ref_model = copy.deepcopy(self._policy).eval().requires_grad_(False)
        for key, ex in examples.items():
            if ex is not None:
                setattr(self, key, self._rows(ex, processing_class.pad_token_id))

    # ---- models and data ------------------------------------------------------------------

    @staticmethod
    def _build_models(model, value_model, peft_config) -> PolicyWithValue:
        policy = build_policy(path=model) if isinstance(model, str) else model
        if isinstance(value_model, ValueModel):
            value = value_model  # as it is, adapter or not: the caller's choice
        elif isinstance(value_model, str) or value_model is None:
            adapters = getattr(policy, "peft_config", None)  # a peft model given as the model
            if value_model:
                value = load_value_model(value_model)
            elif adapters:  # its backbone as it computes: the adapter merged into a copy
                value = ValueModel.from_policy(copy.deepcopy(policy).merge_and_unload())
            else:  # a copy of the base, taken before the policy gets its adapter
                value = ValueModel.from_policy(policy)
            adapter = peft_config or (backbone_config(next(iter(adapters.values())))
                                      if adapters else None)
            if adapter is not None and not getattr(value.backbone, "peft_config", None):
                # an adapter of its own, as the command line's --lora-r gives it: no optimizer
                # state for a whole second model
                value.backbone = lora.add_backbone_adapter(value.backbone, adapter)
        else:
            raise UsageError(f"value_model: expected a dqo.modeling.ValueModel, a path or None, "
                             f"got {type(value_model).__name__}")
        if peft_config is not None:
            if getattr(policy, "peft_config", None):
                raise UsageError("peft_config: the model already has an adapter; give a plain "
                                 "model with peft_config, or the peft model alone")
            policy = lora.require_peft().get_peft_model(policy, peft_config)
        return PolicyWithValue(policy, value)

    @staticmethod
    def _tokenizer_of(model, policy):
        from transformers import AutoTokenizer
        path = model if isinstance(model, str) else getattr(policy, "name_or_path", "")
        return AutoTokenizer.from_pretrained(path) if path else None

    def _tokenize(self, dataset, tokenizer, policy, name):
        """The dataset's examples, or None for rows already tokenized (used as they are)."""
        if dataset is None or is_tokenized(dataset):
            return None
        if tokenizer is None:
            raise UsageError(f"{name}: rows of text need processing_class (the tokenizer)")
        max_length = self.data_args.max_length or getattr(policy.config,
                                                          "max_position_embeddings", None)
        return tokenize_dataset(dataset, tokenizer, self.data_args, name=name,
                                stop_ids=stop_token_ids(tokenizer, policy),
                                max_length=max_length)

    @property
    def _policy(self):
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def _peft(self) -> bool:
        return bool(getattr(self._policy, "peft_config", None))

    def _reference(self):
        """(the reference model, the context its forward runs in)."""
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        if self._peft:
            return self._policy, self._policy.disable_adapter()
        return self._policy, contextlib.nullcontext()

    def _rows(self, examples, pad_id):
        """Trainer rows, with the reference log-probs when they are precomputed."""
        if not self.data_args.precompute_ref_log_probs:
            if len({e.behavior_logp is None for e in examples}) > 1:
                raise UsageError("precompute_ref_log_probs=False: some rows have "
                                 "behavior_logp and some not (they would default to the "
                                 "reference's); give it to all rows or precompute")
            return [trainer_row(e, with_ref=False) for e in examples]
        ref, context = self._reference()
        with context:
            lps = ref_logps(ref, examples, pad_id, progress=not self.args.disable_tqdm,
                            batch_size=self.data_args.precompute_ref_batch_size
                            or self.args.per_device_eval_batch_size)
        return trainer_rows(examples, lps)

    @torch.no_grad()
    def _reference_logp(self, inputs) -> torch.Tensor:
        ref, context = self._reference()
        was_training = ref.training
        ref.eval()  # no dropout in the reference
        try:
            with context:
                return policy_logprobs(ref, inputs["input_ids"], inputs["attention_mask"],
                                       inputs["action_mask"])
        finally:
            ref.train(was_training)

    # ---- optimization ---------------------------------------------------------------------

    def create_optimizer(self, *args, **kwargs):
        """The Trainer's optimizer, with the value model's parameters in groups of their
        own at ``value_lr``, by default ``learning_rate x VALUE_LR_RATIO`` as on the command
        line (a critic learns at a larger rate than the policy; docs/trainer.md)."""
        opt = super().create_optimizer(*args, **kwargs)
        value = getattr(self.model, "value", None)
        if value is None:
            if self.value_lr is None:
                return opt
            raise ValueError("value_lr: the model has no value model (expected a "
                             "PolicyWithValue)")
        value_lr = (self.value_lr if self.value_lr is not None
                    else self.args.learning_rate * VALUE_LR_RATIO)
        ids = {id(p) for p in value.parameters()}
        moved = []
        for g in opt.param_groups:
            mine = [p for p in g["params"] if id(p) in ids]
            if mine:
                g["params"] = [p for p in g["params"] if id(p) not in ids]
                moved.append({**{k: v for k, v in g.items() if k != "params"},
                              "params": mine, "lr": value_lr})
        opt.param_groups[:] = [g for g in opt.param_groups if g["params"]]
        for g in moved:
            opt.add_param_group(g)
        return opt

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mask = inputs["action_mask"]
        ref_logp = inputs.get("ref_logp")
        if ref_logp is None:
            ref_logp = self._reference_logp(inputs)
        logp, values, end_value = model(inputs["input_ids"], inputs["attention_mask"], mask)
        finished = inputs["finished"]
        bootstrap = None if bool(finished.all()) else torch.where(
            finished, torch.zeros_like(end_value), end_value.detach())
        out = fused_dqo_loss(
            logp, ref_logp, values, inputs["rewards"], mask,
            behavior_logp=inputs.get("behavior_logp"), bootstrap=bootstrap,
            num_tokens=None if num_items_in_batch is None else float(num_items_in_batch),
            **self.loss_config.loss_kwargs())
        self._metrics.add("train" if model.training else "eval",
                          step_metrics(out, logp, ref_logp, mask),
                          gather=self.accelerator.gather
                          if self.accelerator.num_processes > 1 else None)
        loss = out.loss
        if (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.accelerator.num_processes > 1):
            loss = loss * self.accelerator.num_processes  # DDP averages over ranks
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss of an evaluation batch (its token-mean) and nothing to compare: the DQO
        metrics of evaluation are logged with ``eval_`` in front."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs, start_time=None):
        """The Trainer's log with the DQO metrics of the interval averaged in."""
        if "loss" in logs:
            logs.update(self._metrics.pop("train"))
        elif any(k.startswith("eval_") for k in logs):
            logs.update({f"eval_{k}": v for k, v in self._metrics.pop("eval").items()})
        super().log(logs, start_time)

    # ---- checkpoints ----------------------------------------------------------------------

    def _save(self, output_dir=None, state_dict=None):
        """A checkpoint whose models load with ``from_pretrained``: the policy where the
        Trainer puts a model (config, weights or a peft adapter, the tokenizer beside them, a
        model card), the value model in ``value/``. The Trainer's own save of a
        non-transformers module writes one state dict, which fails on tied embeddings and that
        nothing can load."""
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, output_dir / "training_args.bin")
        write_model_card(output_dir, self._policy, self.args, self.loss_config, self.value_lr)

    def create_model_card(self, *_, **__):
        """The card :meth:`_save` writes (``push_to_hub`` asks for one): DQO and the
        hyper-parameters, in ``output_dir``."""
        if self.is_world_process_zero():
            write_model_card(self.args.output_dir, self._policy, self.args, self.loss_config,
                             self.value_lr)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        (model or self.model).load_weights(resume_from_checkpoint)

"""Every option of the library and its command lines, declared once (:mod:`dqo.options`).

Sections are small dataclasses; a command's config is composed of the sections it uses, by
inheritance, so that its fields stay flat (``cfg.lr``, as in TRL's configs) and each section
can still be taken out whole (``cfg.section(DQOLossConfig)``), and each section is one group
of ``--help``:

- :class:`TrainConfig` (``python -m dqo.train``): data and models, reward, algorithm, the DQO
  loss, optimization, evaluation decoding, run bookkeeping;
- :class:`SampleConfig` (``python -m dqo.sample``) and :class:`EvalConfig`
  (``python -m dqo.evaluate``) share the reward, column, generation and decoding sections.

``dqo.hf.DQOConfig`` inherits :class:`DQOLossConfig`'s fields, so the loss has the same
options, bounds and defaults wherever it is used.
"""
import math
from dataclasses import dataclass, fields
from typing import Dict, Optional, Tuple

from dqo_kernels import LOSS_AGGS

from .decoding import DecodingConfig
from .errors import UsageError
from .options import Options, flag, opt
from .tasks import TASKS
from .tracking import REPORT_TO

inf = math.inf
# The algorithms on the same offline samples (dqo.algos registers one class each).
ALGOS = ("dqo", "dro", "sft", "rs", "dpo", "kto")
# The value model's default learning rate over the policy's, measured on the embedded default
# (experiments/README.md, "The critic's learning rate").
VALUE_LR_RATIO = 10.0


@dataclass
class DQOLossConfig(Options):
    """The switches of ``fused_dqo_loss`` (docs/math.md §3-4)."""

    _argument_group_name = "DQO loss"
    beta: float = opt(0.1, "KL coefficient", gt=0, lt=inf)
    lam: float = opt(1.0, "lambda of the lambda-return", ge=0, le=1)
    gamma: float = opt(1.0, "discount", gt=0, le=1)
    is_clip: float = opt(1.0, "cap C of the cumulative importance ratio (inf: none)", ge=1,
                         le=inf)
    is_policy: bool = opt(True, "importance weights on the policy loss")
    is_value: bool = opt(True, "importance weights on the value loss")
    target_grad: bool = opt(False, "policy gradient also through the lambda-return target")
    loss_agg: str = opt("token-mean", "how token losses become the loss: the mean over the "
                        "step's action tokens, or over responses of their tokens' mean or sum",
                        choices=LOSS_AGGS)

    def loss_kwargs(self) -> Dict:
        """``fused_dqo_loss``'s keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(DQOLossConfig)}


@dataclass
class RewardConfig(Options):
    """What grades a response."""

    _argument_group_name = "reward"
    task: Optional[str] = opt(None, "a built-in verifier (reward 1 right, 0 wrong); dqo.train "
                              "evaluates with arithmetic when neither this nor --reward-fn is "
                              "given", choices=TASKS)
    reward_fn: Optional[str] = opt(None, "your reward function instead: path/to/file.py:function"
                                   " or package.module:function, called as f(prompts, "
                                   "completions, **columns) -> list[float] (TRL's signature; "
                                   "columns: the prompt rows' other fields)", metavar="SPEC")
    correct_threshold: float = opt(1.0, "a response is correct when its reward is at least this",
                                   gt=-inf, lt=inf)
    reward_timeout: float = opt(60.0, "seconds a call of --reward-fn may take before the run "
                                "stops with an error naming it (0: no limit)", ge=0, lt=inf)


@dataclass
class ColumnsConfig(Options):
    """Which columns of a prompts file hold the prompt and the answer, and the instruction
    around the prompt."""

    _argument_group_name = "prompts"
    prompt_column: Optional[str] = opt(None, "the prompt column; default: the first of prompt, "
                                       "question (GSM8K), problem (MATH)")
    prompt_template: Optional[str] = opt(
        None, "the instruction around each prompt: paper-gsm8k, paper-math, none, or a file with "
        "one {prompt}; default: the one recorded with the data (or model), else the task's "
        "(gsm8k: paper-gsm8k, math: paper-math, arithmetic and --reward-fn: none)",
        metavar="NAME|FILE")
    system_prompt: Optional[str] = opt(
        None, "a system turn in front of every prompt that has none (plain-string prompts; a "
        "conversation's own system turn is kept); needs a chat template; default: the one "
        "recorded with the data (or model)", metavar="TEXT")
    answer_column: Optional[str] = opt(None, "the answer column; default: answer, else solution "
                                       "(MATH); a worked answer (#### N, or a last \\boxed{N}) "
                                       "gives N")


@dataclass
class DecodingArgs(Options):
    """Overrides of single fields of the decoding config (None: the config's value). The
    bounds are the :class:`~dqo.decoding.DecodingConfig`'s own, checked by building one."""

    _argument_group_name = "decoding (default: the data's or model's decoding config, else "\
                           "the paper's settings)"
    temperature: Optional[float] = opt(None, "sampling temperature (paper: 1.0)")
    top_p: Optional[float] = opt(None, "nucleus sampling (paper: 0.9)")
    top_k: Optional[int] = opt(None, "top-k sampling, 0: off (paper: 16)")
    min_p: Optional[float] = opt(None, "min-p sampling: tokens below min-p x the top token's "
                                 "probability are cut, 0: off (paper's third setting: 0.01)")
    max_new_tokens: Optional[int] = opt(None, "length limit of a response (default: 512)")

    def check(self) -> None:
        super().check()
        self.decoding_config()

    def decoding_overrides(self) -> Dict:
        return {f.name: getattr(self, f.name) for f in fields(DecodingArgs)
                if getattr(self, f.name) is not None}

    def decoding_config(self, base: Optional[DecodingConfig] = None) -> DecodingConfig:
        """``base`` (default: the paper's settings) with the fields given here."""
        base = base or DecodingConfig()
        try:
            return DecodingConfig(**{**base.__dict__, **self.decoding_overrides()})
        except ValueError as exc:
            name, _, rest = str(exc).partition(":")
            raise UsageError(f"{flag(name)}:{rest}") from None


@dataclass
class TrainDataConfig(Options):
    _argument_group_name = "data and models"
    model: Optional[str] = opt(None, "HF path or Hub id of the base policy (also the reference);"
                               " omit for the embedded default")
    data: Optional[str] = opt(None, "offline data (docs/data-format.md): jsonl, json, parquet, "
                              "csv or a saved datasets directory; omit for the embedded default")
    eval_data: Optional[str] = opt(None, "prompts with answers to evaluate on, before and after")
    value_model: Optional[str] = opt(None, "HF path of the value backbone (default: a copy of "
                                     "the policy)")
    sft_data: Optional[str] = opt(None, "--algo sft: rows of prompt and solution (default: the "
                                  "solution field of --data's rows)")
    strict_data: bool = opt(False, "fail on the first bad row instead of skipping it")
    max_bad_rows: float = opt(0.1, "the share of rows that may be bad (skipped) before the run "
                              "stops", ge=0, le=1)
    max_length: Optional[int] = opt(None, "tokens of prompt + response; longer responses are cut"
                                    " to fit (unfinished); default: the model's context", ge=2)
    truncated: str = opt("bootstrap", "responses cut at a length limit: bootstrap their return "
                         "from V, drop them, or penalize (terminal, --truncated-reward on the "
                         "last token)", choices=("bootstrap", "drop", "penalize"))
    truncated_reward: float = opt(0.0, "--truncated penalize: the reward added to a cut "
                                  "response's last token", gt=-inf, lt=inf)
    padding: str = opt("right", "side the micro-batches are padded on", choices=("right", "left"))
    group_by_length: bool = opt(False, "order each optimizer step's rows by length before "
                                "splitting them into micro-batches: less padding; the step's rows "
                                "and its exact token-mean are unchanged, only which rows share a "
                                "micro-batch")
    packing: bool = opt(False, "run the models on each micro-batch's real tokens packed into one "
                        "row (restarting position ids): no compute on padding. Needs an "
                        "attention that keeps packed sequences apart (transformers' sdpa, eager "
                        "or flash_attention_2 on Llama-, Qwen2-, Gemma-style models)")
    behavior_logp: str = opt(
        "auto", "the behaviour log-probs of the importance weights: reference (the reference "
        "forward's own, as when --model sampled the data: no sampler noise from bf16, the KV "
        "cache or padding), recorded (the rows' behavior_logp, for data from another policy), or "
        "auto (reference when the data's decoding record names --model as its sampler)",
        choices=("auto", "reference", "recorded"))


@dataclass
class AlgoConfig(Options):
    _argument_group_name = "algorithm"
    algo: str = opt("dqo", "dqo, or a baseline on the same samples", choices=ALGOS)
    kto_desirable_weight: Optional[float] = opt(None, "KTO: weight of correct samples (default: "
                                                "the KTO paper's rule)", gt=0, lt=inf)
    kto_undesirable_weight: Optional[float] = opt(None, "KTO: weight of incorrect samples "
                                                  "(default: 1)", gt=0, lt=inf)


@dataclass
class OptimizationConfig(Options):
    _argument_group_name = "optimization"
    epochs: int = opt(1, "passes over the training items", ge=1)
    max_steps: Optional[int] = opt(None, "optimizer steps (default: epochs x steps per epoch)",
                                   ge=1)
    batch_size: int = opt(64, "examples per optimizer step and rank", ge=1)
    micro_batch: int = opt(16, "examples per forward", ge=1)
    lr: float = opt(5e-7, "learning rate of the policy", gt=0, lt=inf)
    value_lr: Optional[float] = opt(None, "learning rate of the value model (default: --lr x "
                                    "--value-lr-ratio)", gt=0, lt=inf)
    value_lr_ratio: float = opt(VALUE_LR_RATIO, "the value model's learning rate as a multiple"
                                " of --lr, when --value-lr is not given (a critic learns faster "
                                "than its policy; docs/trainer.md, the critic)", gt=0, lt=inf)
    value_init: str = opt("mean-return", "the value head's start: mean-return (V = the "
                          "training rows' mean discounted return everywhere) or zero",
                          choices=("mean-return", "zero"))
    warmup_steps: int = opt(0, "linear warm-up steps of the learning rates", ge=0)
    grad_clip: float = opt(1.0, "gradient norm clip (0: none)", ge=0, lt=inf)
    engine: str = opt("auto", "auto: DeepSpeed on GPU, plain PyTorch on a CPU-only machine",
                      choices=("auto", "deepspeed", "torch"))
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    deepspeed: Optional[str] = opt(None, "a DeepSpeed config JSON merged over the trainer's own "
                                   "(its keys win, 'auto' takes the trainer's value; the merge "
                                   "is logged); needs the DeepSpeed engine")
    offload: str = opt("none", "ZeRO-Offload to CPU memory: the optimizer states (optimizer), "
                       "and with --zero-stage 3 the parameters too (all)",
                       choices=("none", "optimizer", "all"))
    bf16: Optional[bool] = opt(None, "bf16 weights and DeepSpeed bf16 (default: on a GPU, off "
                               "on a CPU)")
    fp16: bool = opt(False, "fp16 weights with dynamic loss scaling, for GPUs without bf16 "
                     "(V100, T4)")
    seed: int = opt(0, "seed of the data order, sampling and initialisation")

    @property
    def value_learning_rate(self) -> float:
        """The value model's learning rate: ``--value-lr``, else ``--lr x --value-lr-ratio``."""
        return self.value_lr if self.value_lr is not None else self.lr * self.value_lr_ratio

    def check(self) -> None:
        super().check()
        if self.batch_size % self.micro_batch:
            raise UsageError(f"--batch-size: expected a multiple of --micro-batch "
                             f"({self.micro_batch}), got {self.batch_size}")
        if self.fp16 and self.bf16:
            raise UsageError("--fp16: expected at most one of --bf16 and --fp16, got both")
        if self.offload == "all" and self.zero_stage != 3:
            raise UsageError(f"--offload all: offloads parameters, which needs --zero-stage 3, "
                             f"got --zero-stage {self.zero_stage} (or use --offload optimizer)")
        if self.engine == "torch" and (self.deepspeed or self.offload != "none"):
            flag = "--deepspeed" if self.deepspeed else "--offload"
            raise UsageError(f"{flag}: needs the DeepSpeed engine, got --engine torch")

    def precision(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``: the weights' dtype and DeepSpeed's mixed precision."""
        import torch

        if self.fp16:
            if not torch.cuda.is_available():
                raise UsageError("--fp16: needs a GPU (fp16 training on a CPU has no loss "
                                 "scaling here); drop it")
            return "fp16"
        bf16 = torch.cuda.is_available() if self.bf16 is None else self.bf16
        return "bf16" if bf16 else "fp32"

    def deepspeed_options(self) -> Dict:
        """:func:`dqo.engine.make_engine`'s DeepSpeed keyword arguments."""
        return dict(zero_stage=self.zero_stage, precision=self.precision(),
                    offload=self.offload, user_config=self.deepspeed)


@dataclass
class MemoryConfig(Options):
    """What makes a 7B run fit, and what its memory plan depends on: activation
    checkpointing, LoRA, one shared base."""

    _argument_group_name = "memory"
    gradient_checkpointing: bool = opt(True, "recompute each decoder layer's activations in the "
                                       "backward (both models): about L x fewer activations "
                                       "kept for ~30%% more compute; the embedded default's "
                                       "tiny model turns it off")
    lora_r: int = opt(0, "LoRA rank (0: full fine-tuning); needs peft", ge=0)
    lora_target_modules: str = opt("all-linear", "the linear layers that get an adapter: "
                                   "all-linear (every one but the lm_head) or names such as "
                                   "q_proj,k_proj,v_proj,o_proj")
    value_backbone: str = opt("separate", "the value model on a copy of the backbone, or on the "
                              "policy's frozen base with an adapter of its own (with --lora-r; "
                              "one base in memory for policy, value and reference)",
                              choices=("separate", "shared"))
    gpu_memory: Optional[float] = opt(None, "GiB a GPU, for the memory plan to say whether the "
                                      "run fits", gt=0, lt=inf)

    def check(self) -> None:
        super().check()
        if self.value_backbone == "shared" and self.lora_r == 0:
            raise UsageError("--value-backbone shared: needs --lora-r > 0 (a fully trained "
                             "policy cannot share its weights with the value model)")

    def plan_options(self) -> Dict:
        """:func:`dqo.memory.memory_plan`'s keyword arguments that these options decide."""
        return dict(lora_r=self.lora_r, lora_targets=self.lora_target_modules,
                    value_backbone=self.value_backbone,
                    checkpointing=self.gradient_checkpointing, gpu_memory_gib=self.gpu_memory)


@dataclass
class AdapterConfig(Options):
    """How LoRA adapters train (with --lora-r)."""

    _argument_group_name = "LoRA adapters"
    lora_alpha: float = opt(32.0, "LoRA alpha (the adapter's scale is alpha / r)", gt=0, lt=inf)
    lora_dropout: float = opt(0.05, "dropout on the LoRA adapters' input", ge=0, lt=1)
    save_merged: bool = opt(False, "also write final/policy-merged: the base with the policy's "
                            "adapter merged in, a plain transformers model with its tokenizer "
                            "(the base is read again on the CPU)")


@dataclass
class RunConfig(Options):
    _argument_group_name = "run"
    out: str = opt("runs/dqo", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    eval_every: int = opt(0, "steps between evaluations (0: none)", ge=0)
    eval_samples: int = opt(4, "sampled responses a problem in evaluation (0: greedy only)",
                            ge=0)
    save_every: int = opt(0, "steps between checkpoints (0: none)", ge=0)
    keep_checkpoints: int = opt(2, "checkpoints of this run kept (its most recent; another "
                                "run's are never deleted)", ge=1)
    resume: bool = opt(False, "continue the run in --out from its last complete checkpoint "
                       "(refused if options that change the run differ from its recorded "
                       "ones)")
    resume_force: bool = opt(False, "with --resume: continue even though such options differ "
                             "(each is logged; the optimizer's saved state keeps the "
                             "checkpoint's learning rates)")
    overwrite: bool = opt(False, "a new run into an --out that holds another run: remove that "
                          "run's checkpoints/, metrics.jsonl, final/ first (without it, or "
                          "--resume, the run is refused)")
    report_to: str = opt("none", "every metrics row (and the final evaluations) to TensorBoard "
                         "(<out>/tensorboard) or W&B, from rank 0", choices=REPORT_TO)
    max_skipped_steps: int = opt(3, "consecutive steps with non-finite gradients before "
                                 "training stops", ge=1)
    threads: int = opt(0, "CPU threads, fixed for the whole run (0: every core the process may"
                       " use; a --resume restores the run's count)", ge=0)
    adapt_threads: bool = opt(False, "refit the CPU threads every few seconds to the cores other"
                              " processes leave free: faster beside busy processes, but the "
                              "results then depend on the machine's load (not bit for bit "
                              "reproducible, nor a --resume)")
    progress: bool = opt(True, "progress bars")
    dry_run: bool = opt(False, "print the per-GPU memory plan (python -m dqo.memory) for these "
                        "options and stop, before any weight is loaded")

    def check(self) -> None:
        super().check()
        if self.overwrite and self.resume:
            raise UsageError("--overwrite: removes the run in --out, --resume continues it; "
                             "give one")
        if self.resume_force and not self.resume:
            raise UsageError("--resume-force: only with --resume")


@dataclass
class TrainConfig(RunConfig, AdapterConfig, MemoryConfig, DecodingArgs, OptimizationConfig,
                  DQOLossConfig, AlgoConfig, ColumnsConfig, RewardConfig, TrainDataConfig):
    """Everything ``python -m dqo.train`` (and :func:`dqo.loop.train`) takes. With no
    ``data`` the command line applies :data:`EMBEDDED_DEFAULT` on top of these defaults."""

    def check(self) -> None:
        super().check()
        if self.sft_data and self.algo != "sft":
            raise UsageError(f"--sft-data: only --algo sft trains on it, got --algo {self.algo}")
        if self.save_merged and not self.lora_r:
            raise UsageError("--save-merged: needs --lora-r > 0 (without LoRA final/policy is "
                             "already a full model)")

    @property
    def loss(self) -> DQOLossConfig:
        return self.section(DQOLossConfig)


TRAIN_SECTIONS = (TrainDataConfig, RewardConfig, ColumnsConfig, AlgoConfig, DQOLossConfig,
                  OptimizationConfig, MemoryConfig, AdapterConfig, DecodingArgs, RunConfig)

# The embedded default (python -m dqo.train with no --data): a 0.8M-parameter model, not a 7B
# one, so learning rates and batches of its own.
EMBEDDED_DEFAULT = dict(lr=2e-5, value_lr=1e-3, beta=0.1, lam=1.0, epochs=2, batch_size=64,
                        micro_batch=64, eval_every=0, save_every=16, out="runs/default",
                        gradient_checkpointing=False)


@dataclass
class GenerationArgs(Options):
    _argument_group_name = "generation"
    engine: str = opt("hf", "hf: transformers' generate; vllm: vLLM (an optional install; "
                      "temperature 1 only, see dqo/generation/vllm.py)", choices=("hf", "vllm"))
    generation_batch_size: int = opt(32, "sequences a generate call", ge=1)
    seed: int = opt(0, "seed of the sampling")


@dataclass
class SampleSection(Options):
    _argument_group_name = "sampling"
    model: Optional[str] = opt(None, "HF path or Hub id of the policy to sample", required=True)
    prompts: Optional[str] = opt(None, "prompts with answers (and solutions, copied into the "
                                 "data): jsonl, json, parquet, csv or a saved datasets "
                                 "directory", required=True)
    out: Optional[str] = opt(None, "the data file to write (jsonl)", required=True)
    n: int = opt(20, "responses per prompt (paper: 20)", ge=1)
    grade_truncated: bool = opt(False, "grade responses cut at --max-new-tokens as they stand, as"
                                " if they had ended (finished: true); default: wrong, unfinished")
    process_scores: str = opt("none", "mc: Monte-Carlo process rewards on failed responses "
                              "(paper 4.4)", choices=("none", "mc"))
    process_n: int = opt(20, "completions per prefix (paper: 20)", ge=1)
    process_reward_total: float = opt(0.5, "the most a failed response earns from its steps, as "
                                      "a share of a correct answer's reward (each of its K steps"
                                      " judged correct earns total/K)", ge=0, lt=1)
    resume: bool = opt(False, "continue the interrupted run that writes --out (its rows kept in "
                       "OUT.partial/) with the same options; the result is the file an "
                       "uninterrupted run writes")


@dataclass
class SampleConfig(DecodingArgs, GenerationArgs, ColumnsConfig, RewardConfig, SampleSection):
    """Everything ``python -m dqo.sample`` takes."""


SAMPLE_SECTIONS = (SampleSection, RewardConfig, ColumnsConfig, GenerationArgs, DecodingArgs)


@dataclass
class EvalSection(Options):
    _argument_group_name = "evaluation"
    model: Optional[str] = opt(None, "HF path or Hub id of the policy", required=True)
    data: Optional[str] = opt(None, "prompts with answers: jsonl, json, parquet, csv or a saved "
                              "datasets directory", required=True)
    samples: int = opt(4, "sampled responses a problem (0: greedy only)", ge=0)
    decoding: Optional[str] = opt(None, "decoding.json to evaluate with (default: the model's)")


RERANK_RULES = ("value", "q", "majority", "random")


@dataclass
class CriticEvalSection(Options):
    """Best-of-N reranking and the critic as a process reward model (dqo.evaluate)."""

    _argument_group_name = "best-of-N and the critic"
    best_of: int = opt(0, "sample N responses a problem and pick one by each --rerank rule "
                       "(0: off)", ge=0)
    rerank: Optional[str] = opt(None, "comma-separated rules of " + ", ".join(RERANK_RULES) +
                                "; default: every one the models given allow (value needs "
                                "--value, q the reference)", metavar="RULES")
    value: Optional[str] = opt(None, "a value model (a run's final/value): --rerank value, and "
                               "the critic measured as a process reward model on the samples")
    reference: Optional[str] = opt(None, "the reference policy of --rerank q (default: the base "
                                   "of the run --model belongs to)")

    def rules(self, has_reference: bool = True) -> Tuple[str, ...]:
        """The --rerank rules; by default every one the models allow (``has_reference``: the
        reference policy of ``q`` can be found)."""
        if self.rerank is None:
            return tuple(r for r in RERANK_RULES if (r != "value" or self.value)
                         and (r != "q" or has_reference))
        return tuple(r.strip() for r in self.rerank.split(",") if r.strip())

    def check(self) -> None:
        super().check()
        if self.rerank is not None:
            bad = [r for r in self.rules() if r not in RERANK_RULES]
            if bad or not self.rules():
                raise UsageError(f"--rerank: expected comma-separated rules of "
                                 f"{', '.join(RERANK_RULES)}, got {self.rerank!r}")
            if not self.best_of:
                raise UsageError("--rerank: expected --best-of N (N >= 2) to rerank")
            if "value" in self.rules() and not self.value:
                raise UsageError("--rerank: the rule 'value' needs --value (a value model)")
        if self.best_of == 1:
            raise UsageError("--best-of: expected 0 (off) or at least 2 samples a problem, got 1")


@dataclass
class EvalConfig(DecodingArgs, GenerationArgs, ColumnsConfig, RewardConfig, CriticEvalSection,
                 EvalSection):
    """Everything ``python -m dqo.evaluate`` takes."""

    def check(self) -> None:
        super().check()
        if self.engine != "hf" and (self.best_of or self.value):
            raise UsageError(f"--engine {self.engine}: --best-of and --value read the samples "
                             f"with the policy's and the critic's forward passes, which need "
                             f"--engine hf")


EVAL_SECTIONS = (EvalSection, CriticEvalSection, RewardConfig, ColumnsConfig, GenerationArgs,
                 DecodingArgs)


@dataclass
class ScoreConfig(Options):
    """Everything ``python -m dqo.score`` takes."""

    _argument_group_name = "scoring"
    run: Optional[str] = opt(None, "a dqo.train run directory: its final/policy, final/value "
                             "and base model (the reference)")
    policy: Optional[str] = opt(None, "the policy (default: RUN/final/policy)")
    value: Optional[str] = opt(None, "the value model (default: RUN/final/value)")
    reference: Optional[str] = opt(None, "the reference policy (default: the run's base model)")
    data: Optional[str] = opt(None, "rows to score: dqo.sample's (prompt, response, "
                              "response_ids, reward, finished) or prompt/response text")
    prompt: Optional[str] = opt(None, "one prompt to score a --response of")
    response: Optional[str] = opt(None, "the response to --prompt (it ends there: finished)")
    reward: float = opt(0.0, "the outcome reward of --response")
    limit: int = opt(4, "rows of --data scored (the first ones)", ge=1)
    beta: Optional[float] = opt(None, "KL coefficient (default: the run's, else 0.1)", gt=0,
                                lt=inf)
    gamma: Optional[float] = opt(None, "discount (default: the run's, else 1)", gt=0, le=1)
    html: Optional[str] = opt(None, "also write the responses, steps coloured by advantage, "
                              "to this HTML file")
    html_tokens: bool = opt(False, "--html colours each token by the change of the critic's "
                            "value across it, not each step by its advantage")
    json: bool = opt(False, "print JSON (one object per response) instead of tables")

    def check(self) -> None:
        super().check()
        if not self.run and not (self.policy and self.value and self.reference):
            raise UsageError("--run: expected a run directory, or all of --policy, --value and "
                             "--reference")
        if bool(self.data) == bool(self.prompt):
            raise UsageError("--data: expected either --data or --prompt with --response")
        if self.prompt and self.response is None:
            raise UsageError("--response: expected a response to score with --prompt")
        if self.html_tokens and not self.html:
            raise UsageError("--html-tokens: expected --html FILE to write the tokens to")


SCORE_SECTIONS = (ScoreConfig,)


@dataclass
class PlanSection(Options):
    _argument_group_name = "the run to plan"
    model: Optional[str] = opt(None, "a model directory, its config.json, or a Hub id (its "
                               "config only)", required=True)
    gpus: int = opt(1, "GPUs the run is spread over", ge=1)
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    micro_batch: int = opt(1, "sequences a forward", ge=1)
    seq_len: int = opt(1024, "tokens of prompt + response", ge=1)
    fp32: bool = opt(False, "fp32 weights (CPU); default bf16")


@dataclass
class MemoryPlanConfig(MemoryConfig, PlanSection):
    """Everything ``python -m dqo.memory`` takes."""


PLAN_SECTIONS = (PlanSection, MemoryConfig)

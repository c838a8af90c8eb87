"""The stages of the embedded default, shared by ``python -m dqo.train`` and the replication
(:mod:`dqo.experiments.replicate`): problem splits of the synthetic task, the SFT warm-up of a
tiny base policy, offline sampling from it, and evaluation on held-out problems."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .atomic import replace_dir
from .data import read_jsonl, write_jsonl
from .decoding import DecodingConfig, sidecar
from .evaluation import accuracy
from .generation import generate, label_samples
from .modeling import build_policy, tiny_config
from .rng import seed_stage
from .sft import sft_train
from .tasks import arithmetic, get_verifier
from .tokenizer import char_tokenizer

log = logging.getLogger("dqo.pipeline")


@dataclass
class DefaultPipeline:
    n_sft: int = 2000  # problems with reference solutions for the warm-up
    n_offline: int = 256  # prompts sampled for the offline dataset
    n_test: int = 200  # held-out problems for evaluation
    n_dev: int = 100  # problems that decide when the warm-up stops
    n_val: int = 0  # problems that choose hyper-parameters (the replication's sweep)
    samples_per_prompt: int = 8
    sft_max_steps: int = 1500
    sft_target: float = 0.35  # stop the warm-up at this greedy accuracy: "right sometimes"
    top_p: float = 0.9  # the paper's sampling settings, for the data and for evaluation
    top_k: int = 16
    max_new_tokens: int = 40
    hidden_size: int = 128
    layers: int = 4
    attention_dropout: float = 0.0

    @property
    def decoding(self) -> DecodingConfig:
        return DecodingConfig(temperature=1.0, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens)


class Splits:
    """Disjoint problem sets of the synthetic task, fixed by the seed."""

    def __init__(self, pipe: DefaultPipeline, seed: int):
        sizes = (pipe.n_sft, pipe.n_offline, pipe.n_dev, pipe.n_test, pipe.n_val)
        probs = arithmetic.make_problems(sum(sizes), seed)  # the same prefix for any n_val
        ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
        self.sft, self.offline, self.dev, self.test, self.val = (
            probs[a:b] for a, b in zip([0] + ends[:-1], ends))


class Evaluator:
    """Greedy and sampled accuracy on a fixed problem set, decoded like the offline data."""

    def __init__(self, tokenizer, problems, decoding: DecodingConfig, samples: int = 4):
        self.tok, self.samples, self.decoding = tokenizer, samples, decoding
        self.prompts = [p.prompt for p in problems]
        self.answers = [p.answer for p in problems]
        self.verify = get_verifier("arithmetic")

    def __call__(self, model, samples: Optional[int] = None,
                 per_problem: bool = False) -> Dict[str, float]:
        return accuracy(model, self.tok, self.prompts, self.answers, self.verify,
                        samples=self.samples if samples is None else samples,
                        decoding=self.decoding, per_problem=per_problem)


def warm_up_base(pipe: DefaultPipeline, splits: Splits, out_dir: Path, *, seed: int = 0,
                 reuse: bool = False, progress: bool = True):
    """A tiny policy (random init from a config) SFT'd until it is right sometimes; saved to
    ``out_dir/base``. Returns (tokenizer, policy)."""
    tok = char_tokenizer()
    base_dir = Path(out_dir) / "base"
    if reuse and (base_dir / "config.json").is_file():
        log.info("reusing the warmed-up base policy in %s", base_dir)
        return tok, build_policy(path=str(base_dir))
    seed_stage(seed, "warm-up")
    policy = build_policy(tiny_config(tok, hidden_size=pipe.hidden_size, layers=pipe.layers,
                                      attention_dropout=pipe.attention_dropout))
    n_params = sum(p.numel() for p in policy.parameters())
    log.info("SFT warm-up of a %.2fM-parameter model", n_params / 1e6)
    dev = Evaluator(tok, splits.dev, pipe.decoding, samples=0)
    steps = sft_train(policy, tok, arithmetic.reference_pairs(splits.sft),
                      steps=pipe.sft_max_steps, lr=1e-3, batch_size=64, seed=seed,
                      eval_every=100, target=pipe.sft_target,
                      eval_fn=lambda: dev(policy)["greedy"], progress=progress)
    log.info("warm-up stopped after %d steps", steps)
    tmp = base_dir.with_name(".base.tmp")  # complete or absent: --resume reuses it
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    replace_dir(tmp, base_dir)
    return tok, policy


def sample_offline(policy, tok, pipe: DefaultPipeline, problems, path: Path, *,
                   reuse: bool = False, progress: bool = True) -> List[Dict]:
    """``samples_per_prompt`` responses to every problem, verified, written to ``path``."""
    path = Path(path)
    if reuse and path.is_file():
        rows, _ = read_jsonl(path, strict=True)
        return rows
    prompts = [p.prompt for p in problems]
    samples = generate(policy, tok, prompts, n=pipe.samples_per_prompt, decoding=pipe.decoding,
                       progress=progress)
    rows = label_samples(prompts, [p.answer for p in problems], samples,
                         get_verifier("arithmetic"))
    pipe.decoding.with_stop_ids(tok, policy).save(sidecar(path))
    write_jsonl(path, rows)  # last: its presence says the stage is complete
    return rows

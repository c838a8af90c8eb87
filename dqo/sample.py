"""Build an offline dataset: sample n responses per prompt, record the behaviour log-probs,
verify, and (optionally) add process rewards. Paper appendix A and section 4.4.

    python -m dqo.sample --model PATH --prompts prompts.jsonl --task gsm8k --n 20 --out data.jsonl

``prompts.jsonl`` rows hold ``prompt`` and ``answer``. The output rows are the trainer's format
(:mod:`dqo.data`): ``prompt, response, response_ids, behavior_logp, finished, reward, answer``
and, with ``--process-scores``, ``steps`` and ``step_rewards``. The decoding settings are
written beside them (``data.decoding.json``, :mod:`dqo.decoding`) for ``dqo.train`` and
``dqo.evaluate`` to read back.

A response ends at the first stop token (EOS, the generation config's EOS ids, the chat
template's end of turn), which is kept in ``response_ids`` (the policy chose it) and left out
of ``response``; one that reaches ``--max-new-tokens`` first is ``finished: false``. A cut
response is graded wrong (reward 0): its text did not end, even if it already wrote an answer
(``--grade-truncated`` grades it as it stands).

``behavior_logp`` is the log-prob of each sampled token under the model's distribution at the
sampling temperature, ``log_softmax(logits / temperature)``, read from ``generate``'s raw
logits. The top-k/top-p truncation is not included: with temperature 1 this is exactly the
reference policy the paper reweights against.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from dqo_kernels import token_logprobs

from .cli import check_data, check_model, parse_config
from .cli import run as run_cli
from .configs import SAMPLE_SECTIONS, SampleConfig
from .data import read_prompt_rows, split_steps, write_jsonl
from .decoding import DecodingConfig, encode_prompt, own_generation_config, sidecar, split_at_stop
from .errors import UsageError
from .rewards import Reward, RewardError, as_reward, load_reward, task_reward
from .threads import adapt as adapt_threads

log = logging.getLogger(__name__)

# Process rewards (paper 4.4) are a bonus, never a second outcome: a failed response's steps
# judged correct share at most this much of a correct answer's reward (1).
PROCESS_REWARD_TOTAL = 0.5


@dataclass
class Sample:
    text: str  # the response without its stop token
    ids: List[int]  # generated tokens, the stop token included if one was generated
    logp: List[float]  # behaviour log-prob of every generated token
    finished: bool = True  # False: cut at max_new_tokens


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, decoding: DecodingConfig, n: int = 1,
             greedy: bool = False, batch_size: int = 64,
             prefixes: Optional[Sequence[str]] = None,
             progress: bool = False) -> List[List[Sample]]:
    """``n`` continuations of every prompt (of ``prompt + prefix`` when ``prefixes`` is given;
    the returned text then excludes the prefix), decoded as ``decoding`` says (greedy: its
    length limit and stop tokens only)."""
    decoding = decoding.with_stop_ids(tokenizer, model)
    if hasattr(model, "llm"):  # a dqo.vllm_engine.VLLMEngine
        return model.generate(tokenizer, prompts, decoding=decoding, n=n, greedy=greedy,
                              prefixes=prefixes)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen_config = decoding.generation_config(tokenizer, greedy=greedy)
    encoded = [encode_prompt(tokenizer, p, prefixes[i] if prefixes else "")
               for i, p in enumerate(prompts)]
    jobs = [(i, e) for i, e in enumerate(encoded) for _ in range(n)]
    out: List[List[Sample]] = [[] for _ in prompts]
    pad = gen_config.pad_token_id
    chunks = range(0, len(jobs), batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="sampling", leave=False, disable=None)
    for start in chunks:
        adapt_threads()
        batch = jobs[start:start + batch_size]
        width = max(len(e) for _, e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, (_, e) in enumerate(batch):  # left padding for generation
            ids[r, width - len(e):] = torch.tensor(e)
            attn[r, width - len(e):] = 1
        with own_generation_config(model):
            res = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                 generation_config=gen_config)
        new = res.sequences[:, width:]
        temp = 1.0 if greedy else decoding.temperature
        # One [b, V] step at a time through the fused op: no [b, L, V] fp32 stack, no full
        # log_softmax output, just the taken tokens' log-probs.
        logp = torch.stack([token_logprobs(step_logits, new[:, j], temperature=temp)
                            for j, step_logits in enumerate(res.logits)], dim=1).cpu()
        new = new.cpu()
        for r, (i, _) in enumerate(batch):
            toks, finished = split_at_stop(new[r].tolist(), decoding.stop_ids)
            body = toks[:-1] if finished else toks
            text = tokenizer.decode(body, skip_special_tokens=True)
            out[i].append(Sample(text, toks, logp[r, :len(toks)].tolist(), finished))
    model.train(was_training)
    return out


# a verifier ``(responses, answers) -> list[bool]`` or a :class:`dqo.rewards.Reward`
Verifier = Union[Callable[[Sequence[str], Sequence[str]], List[bool]], Reward]
RESERVED = ("prompt", "answer", "solution", "response", "response_ids", "behavior_logp",
            "finished", "reward", "correct", "steps", "step_rewards")


def reward_columns(answer, extra: Optional[Dict], n: int) -> Dict[str, List]:
    """A reward function's ``**columns`` for ``n`` completions of one prompt."""
    cols = {} if answer is None else {"answer": [answer] * n}
    cols.update({k: [v] * n for k, v in (extra or {}).items()})
    return cols


def label_samples(prompts, answers, samples: List[List[Sample]], verify: Verifier, *,
                  grade_truncated: bool = False,
                  solutions: Optional[Sequence[Optional[str]]] = None,
                  columns: Optional[Sequence[Dict]] = None) -> List[Dict]:
    """Rows for the trainer: the reward of each response (built-in tasks: 1 if the final
    answer is right, else 0, paper app. A) and whether it is ``correct`` (reward >= the
    threshold). A response cut at the length limit gets 0 and is not correct, unless
    ``grade_truncated``: then it is graded as it stands and counts as having ended
    (``finished: true``, no bootstrap on top of its grade). A prompt's canonical ``solution``
    and its other ``columns`` (a reward function's extra inputs) ride along."""
    reward = as_reward(verify)
    rows = []
    for i, (p, a, ss) in enumerate(zip(prompts, answers, samples)):
        extra = dict(columns[i]) if columns else {}
        scores = reward.scores([p] * len(ss), [s.text for s in ss],
                               reward_columns(a, extra, len(ss)))
        if solutions and solutions[i] is not None:
            extra["solution"] = solutions[i]
        for s, score, good in zip(ss, scores, reward.correct(scores)):
            ended = s.finished or grade_truncated
            rows.append(dict(prompt=p, response=s.text, response_ids=s.ids,
                             behavior_logp=s.logp, finished=ended,
                             reward=score if ended else 0.0, correct=bool(good and ended),
                             **({} if a is None else {"answer": a}), **extra))
    return rows


def step_lines(response: str) -> List[int]:
    """Indices (among the response's lines, :func:`dqo.data.split_steps`) of its steps: the
    non-blank lines. A blank line is not a step: it earns nothing and is no place to cut."""
    return [i for i, line in enumerate(split_steps(response)) if line.strip()]


def mc_process_scores(model, tokenizer, rows: List[Dict], verify: Verifier, *,
                      decoding: DecodingConfig, n: int = 20,
                      total: float = PROCESS_REWARD_TOTAL, batch_size: int = 64) -> List[Dict]:
    """Paper 4.4: for each failed response with steps s_1..s_K, sample ``n`` completions
    from every prefix s_1..s_k (k < K); if one of them is correct, steps 1..k are judged
    correct. Each of them earns ``total / K`` (:func:`with_step_rewards`). Rows keep their
    tokens and behaviour log-probs and gain ``steps``/``step_rewards``."""
    reward = as_reward(verify)
    failed = [r for r in rows if not r.get("correct", r["reward"] > 0)
              and len(step_lines(r["response"])) > 1]
    queries = []  # (row, k, prefix)
    for r in failed:
        lines, steps = split_steps(r["response"]), step_lines(r["response"])
        for k in range(1, len(steps)):
            queries.append((r, k, "\n".join(lines[:steps[k - 1] + 1]) + "\n"))
    best: Dict[int, int] = {}
    if queries:
        samples = generate(model, tokenizer, [q[0]["prompt"] for q in queries], n=n,
                           prefixes=[q[2] for q in queries], decoding=decoding,
                           batch_size=batch_size)
        for (r, k, prefix), ss in zip(queries, samples):
            extra = {c: v for c, v in r.items() if c not in RESERVED}
            scores = reward.scores([r["prompt"]] * len(ss), [prefix + s.text for s in ss],
                                   reward_columns(r.get("answer"), extra, len(ss)))
            if any(good and s.finished for good, s in zip(reward.correct(scores), ss)):
                best[id(r)] = max(best.get(id(r), 0), k)
    failed_ids = {id(r) for r in failed}
    return [with_step_rewards(r, best.get(id(r), 0), total) if id(r) in failed_ids else r
            for r in rows]


def exact_process_scores(rows: List[Dict], step_labels: Callable[[str, str], List[bool]], *,
                         total: float = PROCESS_REWARD_TOTAL) -> List[Dict]:
    """The same from exact step labels (the synthetic task knows them, one per line): in a
    failed response, the leading correct steps earn ``total / K`` each."""
    out = []
    for r in rows:
        steps = step_lines(r["response"])
        if r.get("correct", r["reward"] > 0) or len(steps) < 2:
            out.append(r)
            continue
        labels = step_labels(r["prompt"], r["response"])
        k = 0
        while k < len(steps) and labels[steps[k]]:
            k += 1
        out.append(with_step_rewards(r, k, total))
    return out


def with_step_rewards(row: Dict, k: int, total: float = PROCESS_REWARD_TOTAL) -> Dict:
    """``row`` with its first ``k`` steps (non-blank lines) rewarded ``total / K`` each, K its
    number of steps: the step rewards of a response sum to less than ``total``, whatever its
    length (k < K for a failed response)."""
    if not 0.0 <= total < 1.0:
        raise ValueError(f"total: expected a value in [0, 1) (a share of a correct answer's "
                         f"reward), got {total!r}")
    lines, steps = split_steps(row["response"]), step_lines(row["response"])
    rewarded = set(steps[:k])
    per_step = total / len(steps)
    return dict(row, steps=lines,
                step_rewards=[per_step if i in rewarded else 0.0 for i in range(len(lines))])


def load_sampler(args):
    """(tokenizer, what generate() samples with): the HF model, or a vLLM engine."""
    from .modeling import load_policy
    if args.engine == "vllm":
        if args.temperature not in (None, 1.0):
            raise UsageError(f"--temperature: the vLLM engine records behaviour log-probs of "
                             f"the raw logits, exact at temperature 1 only, got "
                             f"{args.temperature}; use --engine hf")
        from .vllm_engine import VLLMEngine
        engine = VLLMEngine(args.model, seed=args.seed)
        return engine.tokenizer, engine
    return load_policy(args.model)


def reward_from_args(args) -> Reward:
    """The reward the flags name; exactly one of --task and --reward-fn."""
    if args.reward_fn and args.task:
        raise UsageError("--reward-fn and --task: give one of them")
    if args.reward_fn:
        try:
            return load_reward(args.reward_fn, args.correct_threshold)
        except RewardError as exc:
            raise UsageError(str(exc)) from None
    if not args.task:
        raise UsageError("--task or --reward-fn: give one of them (what grades a response)")
    return task_reward(args.task, args.correct_threshold)


def main(argv=None) -> None:
    run_cli(_main, argv, prog="python -m dqo.sample")


def _main(argv=None) -> None:
    args = parse_config(SampleConfig, SAMPLE_SECTIONS, argv, prog="python -m dqo.sample",
                        description=__doc__)
    decoding = args.decoding_config()
    reward = reward_from_args(args)
    check_model("--model", args.model)
    check_data("--prompts", args.prompts)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(args.seed)
    tok, model = load_sampler(args)
    decoding = decoding.with_stop_ids(tok, model)
    prompt_rows = read_prompt_rows(args.prompts, require_answer=args.reward_fn is None,
                                   prompt_column=args.prompt_column,
                                   answer_column=args.answer_column)
    prompts, answers = [r["prompt"] for r in prompt_rows], [r.get("answer") for r in prompt_rows]
    samples = generate(model, tok, prompts, n=args.n, progress=True, decoding=decoding,
                       batch_size=args.generation_batch_size)
    rows = label_samples(prompts, answers, samples, reward,
                         grade_truncated=args.grade_truncated,
                         solutions=[r.get("solution") for r in prompt_rows],
                         columns=[{k: v for k, v in r.items() if k not in RESERVED}
                                  for r in prompt_rows])
    if args.process_scores == "mc":
        rows = mc_process_scores(model, tok, rows, reward, n=args.process_n,
                                 total=args.process_reward_total, decoding=decoding,
                                 batch_size=args.generation_batch_size)
    write_jsonl(args.out, rows)
    decoding.save(sidecar(args.out))
    acc = sum(r["correct"] for r in rows) / max(1, len(rows))
    cut = sum(not r["finished"] for r in rows) / max(1, len(rows))
    log.info("wrote %d responses to %s (%.1f%% correct, %.1f%% cut at %d tokens); decoding "
             "settings in %s", len(rows), args.out, 100 * acc, 100 * cut,
             decoding.max_new_tokens, sidecar(args.out))


if __name__ == "__main__":
    main()

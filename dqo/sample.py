"""Build an offline dataset: sample n responses per prompt, record the behaviour log-probs,
verify, and (optionally) add process rewards. Paper appendix A and section 4.4.

    python -m dqo.sample --model PATH --prompts prompts.jsonl --task gsm8k --n 20 --out data.jsonl

``prompts.jsonl`` rows hold ``prompt`` and ``answer``. The output rows are the trainer's format
(:mod:`dqo.data`): ``prompt, response, response_ids, behavior_logp, reward, answer`` and, with
``--process-scores``, ``steps`` and ``step_rewards``.

``behavior_logp`` is the log-prob of each sampled token under the model's distribution at the
sampling temperature, ``log_softmax(logits / temperature)``, read from ``generate``'s raw
logits. The top-k/top-p truncation is not included: with temperature 1 this is exactly the
reference policy the paper reweights against.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from dqo_kernels import token_logprobs

from .data import format_prompt, read_prompts, split_steps, write_jsonl

log = logging.getLogger(__name__)


@dataclass
class Sample:
    text: str
    ids: List[int]  # generated tokens, EOS included if it was generated
    logp: List[float]  # behaviour log-prob of every generated token


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, n: int = 1, greedy: bool = False,
             max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, batch_size: int = 64, prefixes: Optional[Sequence[str]] = None,
             progress: bool = False) -> List[List[Sample]]:
    """``n`` continuations of every prompt (of ``prompt + prefix`` when ``prefixes`` is given;
    the returned text then excludes the prefix)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts = [format_prompt(tokenizer, p) + (prefixes[i] if prefixes else "")
             for i, p in enumerate(prompts)]
    jobs = [(i, t) for i, t in enumerate(texts) for _ in range(n)]
    out: List[List[Sample]] = [[] for _ in prompts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = range(0, len(jobs), batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="sampling", leave=False, disable=None)
    for start in chunks:
        batch = jobs[start:start + batch_size]
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for _, t in batch]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, e in enumerate(enc):  # left padding for generation
            ids[r, width - len(e):] = torch.tensor(e)
            attn[r, width - len(e):] = 1
        kw = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
        res = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                             output_logits=True, return_dict_in_generate=True, **kw)
        new = res.sequences[:, width:]
        temp = 1.0 if greedy else temperature
        # One [b, V] step at a time through the fused op: no [b, L, V] fp32 stack, no full
        # log_softmax output, just the taken tokens' log-probs.
        logp = torch.stack([token_logprobs(step_logits, new[:, j], temperature=temp)
                            for j, step_logits in enumerate(res.logits)], dim=1).cpu()
        new = new.cpu()
        for r, (i, _) in enumerate(batch):
            toks = new[r].tolist()
            cut = toks.index(eos) + 1 if eos in toks else len(toks)
            toks = toks[:cut]
            text = tokenizer.decode([t for t in toks if t != eos], skip_special_tokens=True)
            out[i].append(Sample(text, toks, logp[r, :cut].tolist()))
    model.train(was_training)
    return out


Verifier = Callable[[Sequence[str], Sequence[str]], List[bool]]


def label_samples(prompts, answers, samples: List[List[Sample]], verify: Verifier) -> List[Dict]:
    """Rows for the trainer: reward 1 if the final answer is right, else 0 (paper app. A)."""
    rows = []
    for p, a, ss in zip(prompts, answers, samples):
        ok = verify([s.text for s in ss], [a] * len(ss))
        for s, good in zip(ss, ok):
            rows.append(dict(prompt=p, response=s.text, response_ids=s.ids,
                             behavior_logp=s.logp, reward=float(good), answer=a))
    return rows


def mc_process_scores(model, tokenizer, rows: List[Dict], verify: Verifier, *, n: int = 8,
                      process_reward: float = 0.1, **gen_kw) -> List[Dict]:
    """Paper 4.4: for each failed response split into steps s_1..s_K, sample ``n``
    completions from every prefix s_1..s_k (k < K); if one of them is correct, steps 1..k are
    judged correct and get ``process_reward``. Rows keep their tokens and behaviour log-probs
    and gain ``steps``/``step_rewards``."""
    failed = [r for r in rows if r["reward"] <= 0 and len(split_steps(r["response"])) > 1]
    queries = []  # (row, k, prefix)
    for r in failed:
        steps = split_steps(r["response"])
        for k in range(1, len(steps)):
            queries.append((r, k, "\n".join(steps[:k]) + "\n"))
    if queries:
        samples = generate(model, tokenizer, [q[0]["prompt"] for q in queries], n=n,
                           prefixes=[q[2] for q in queries], **gen_kw)
        best: Dict[int, int] = {}
        for (r, k, prefix), ss in zip(queries, samples):
            ok = verify([prefix + s.text for s in ss], [r["answer"]] * len(ss))
            if any(ok):
                best[id(r)] = max(best.get(id(r), 0), k)
    else:
        best = {}
    failed_ids = {id(r) for r in failed}
    return [_with_step_rewards(r, best.get(id(r), 0), process_reward) if id(r) in failed_ids
            else r for r in rows]


def exact_process_scores(rows: List[Dict], step_labels: Callable[[str, str], List[bool]], *,
                         process_reward: float = 0.1) -> List[Dict]:
    """The same from exact step labels (the synthetic task knows them): in a failed response,
    the leading correct steps get ``process_reward``."""
    out = []
    for r in rows:
        if r["reward"] > 0 or len(split_steps(r["response"])) < 2:
            out.append(r)
            continue
        labels = step_labels(r["prompt"], r["response"])
        k = 0
        while k < len(labels) and labels[k]:
            k += 1
        out.append(_with_step_rewards(r, k, process_reward))
    return out


def _with_step_rewards(row: Dict, k: int, process_reward: float) -> Dict:
    steps = split_steps(row["response"])
    return dict(row, steps=steps,
                step_rewards=[process_reward if i < k else 0.0 for i in range(len(steps))])


def add_generation_args(p: argparse.ArgumentParser, *, top_p: float, top_k: int) -> None:
    """The sampling flags shared by dqo.sample and dqo.evaluate."""
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=top_p)
    p.add_argument("--top-k", type=int, default=top_k)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)


def main(argv=None) -> None:
    from .modeling import load_policy
    from .tasks import TASKS, get_verifier

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="jsonl with prompt and answer")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=20, help="responses per prompt (paper: 20)")
    p.add_argument("--process-scores", choices=("none", "mc"), default="none")
    p.add_argument("--process-n", type=int, default=8, help="completions per prefix")
    p.add_argument("--process-reward", type=float, default=0.1,
                   help="reward on each step judged correct (the paper's value was lost)")
    add_generation_args(p, top_p=0.9, top_k=16)  # the paper's appendix A
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(args.seed)
    tok, model = load_policy(args.model)
    prompts, answers = read_prompts(args.prompts)
    gen = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    verify = get_verifier(args.task)
    samples = generate(model, tok, prompts, n=args.n, progress=True, **gen)
    rows = label_samples(prompts, answers, samples, verify)
    if args.process_scores == "mc":
        rows = mc_process_scores(model, tok, rows, verify, n=args.process_n,
                                 process_reward=args.process_reward, **gen)
    write_jsonl(args.out, rows)
    acc = sum(r["reward"] > 0 for r in rows) / max(1, len(rows))
    log.info("wrote %d responses to %s (%.1f%% correct)", len(rows), args.out, 100 * acc)


if __name__ == "__main__":
    main()

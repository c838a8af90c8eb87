"""Greedy and sampled accuracy of a policy on a test set.

    python -m dqo.evaluate --model PATH --data test.jsonl --task gsm8k [--samples 4]

``test.jsonl`` rows hold ``prompt`` and ``answer``. Greedy accuracy is one greedy decode per
problem; sampled accuracy is the mean correctness of ``--samples`` samples per problem.
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Dict, Sequence

import torch

from .sample import Verifier, generate

log = logging.getLogger(__name__)


def accuracy(model, tokenizer, prompts: Sequence[str], answers: Sequence[str],
             verify: Verifier, *, samples: int = 4, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 64,
             batch_size: int = 64) -> Dict[str, float]:
    greedy = generate(model, tokenizer, prompts, greedy=True, max_new_tokens=max_new_tokens,
                      batch_size=batch_size)
    ok_greedy = verify([g[0].text for g in greedy], list(answers))
    out = {"greedy": sum(ok_greedy) / max(1, len(prompts))}
    if samples > 0:
        sampled = generate(model, tokenizer, prompts, n=samples, temperature=temperature,
                           top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
        texts = [s.text for ss in sampled for s in ss]
        refs = [a for a in answers for _ in range(samples)]
        ok = verify(texts, refs)
        out["sampled"] = sum(ok) / max(1, len(ok))
    return out


def main(argv=None) -> None:
    from .data import read_prompts
    from .modeling import load_policy
    from .sample import add_generation_args
    from .tasks import TASKS, get_verifier

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="jsonl with prompt and answer")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--samples", type=int, default=4, help="samples a problem (0: greedy only)")
    add_generation_args(p, top_p=1.0, top_k=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(args.seed)
    tok, model = load_policy(args.model)
    prompts, answers = read_prompts(args.data)
    res = accuracy(model, tok, prompts, answers, get_verifier(args.task), samples=args.samples,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(json.dumps(dict(model=args.model, data=args.data, n=len(prompts), **res)))


if __name__ == "__main__":
    main()

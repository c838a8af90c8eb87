"""Greedy and sampled accuracy of a policy on a test set, with the paper's protocol.

    python -m dqo.evaluate --model PATH --data test.jsonl --task gsm8k [--samples 4]

``test.jsonl`` rows hold ``prompt`` and ``answer``. Greedy accuracy is one greedy decode per
problem; sampled accuracy is the mean correctness of ``--samples`` samples per problem, drawn
with the decoding settings the training data were sampled with (the paper evaluates with its
sampling settings, top_p 0.9 and top_k 16). Those settings and the length limit come from
``--decoding FILE``, else ``decoding.json`` in the model directory (``dqo.train`` writes it to
``final/policy``), else the paper's defaults; the flags override single fields. A response cut
at the length limit is graded wrong, and the share of cut responses is reported beside each
accuracy (``greedy_cut``, ``sampled_cut``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .cli import check_data, check_file, check_model, parse_config
from .cli import run as run_cli
from .configs import EVAL_SECTIONS, EvalConfig
from .decoding import DecodingConfig, find_decoding
from .errors import UsageError
from .rewards import as_reward
from .sample import Verifier, generate, reward_columns

log = logging.getLogger(__name__)


def accuracy(model, tokenizer, prompts: Sequence[str], answers: Sequence[Optional[str]],
             verify: Verifier, *, decoding: DecodingConfig, samples: int = 4,
             batch_size: int = 64, per_problem: bool = False,
             columns: Optional[Sequence[Dict]] = None) -> Dict:
    """``greedy`` and ``sampled`` accuracy (a cut response is wrong), and the share of
    responses cut at ``decoding.max_new_tokens`` (``greedy_cut``, ``sampled_cut``). With
    ``per_problem``, also each problem's score (``greedy_items``, ``sampled_items``: the share
    of its responses that are right), for paired statistics over problems."""
    decoding = decoding.with_stop_ids(tokenizer, model)
    reward = as_reward(verify)
    out = {}
    runs = [("greedy", 1, True)] + ([("sampled", samples, False)] if samples > 0 else [])
    for name, n, greedy in runs:
        res = generate(model, tokenizer, prompts, n=n, greedy=greedy, decoding=decoding,
                       batch_size=batch_size)
        flat = [s for ss in res for s in ss]
        cols: Dict[str, List] = {}
        for i, a in enumerate(answers):  # each prompt's columns, once per completion
            for k, v in reward_columns(a, columns[i] if columns else None, n).items():
                cols.setdefault(k, []).extend(v)
        scores = reward.scores([p for p in prompts for _ in range(n)],
                               [s.text for s in flat], cols)
        ok = reward.correct(scores)
        right = [float(good and s.finished) for good, s in zip(ok, flat)]
        out[name] = sum(right) / max(1, len(flat))
        out[f"{name}_cut"] = sum(not s.finished for s in flat) / max(1, len(flat))
        if per_problem:
            out[f"{name}_items"] = [sum(right[i * n:(i + 1) * n]) / n for i in range(len(res))]
    return out


def main(argv=None) -> None:
    run_cli(_main, argv, prog="python -m dqo.evaluate")


def _main(argv=None) -> None:
    from .data import read_prompt_rows
    from .sample import RESERVED, load_sampler, reward_from_args

    args = parse_config(EvalConfig, EVAL_SECTIONS, argv, prog="python -m dqo.evaluate",
                        description=__doc__)
    reward = reward_from_args(args)
    check_model("--model", args.model)
    check_data("--data", args.data)
    check_file("--decoding", args.decoding)
    try:
        base = find_decoding(args.decoding, args.model if Path(args.model).is_dir() else None)
    except ValueError as exc:
        raise UsageError(f"--decoding: {exc}") from None
    decoding = args.decoding_config(base)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(args.seed)
    tok, model = load_sampler(args)
    rows = read_prompt_rows(args.data, require_answer=args.reward_fn is None,
                            prompt_column=args.prompt_column, answer_column=args.answer_column)
    decoding = decoding.with_stop_ids(tok, model)
    res = accuracy(model, tok, [r["prompt"] for r in rows], [r.get("answer") for r in rows],
                   reward, samples=args.samples, decoding=decoding,
                   batch_size=args.generation_batch_size,
                   columns=[{k: v for k, v in r.items() if k not in RESERVED} for r in rows])
    print(json.dumps(dict(model=args.model, data=args.data, n=len(rows), **res,
                          decoding=json.loads(decoding.to_json()))))


if __name__ == "__main__":
    main()

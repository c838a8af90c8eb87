"""See where a response goes wrong: each step's value and soft advantage under a trained run.

    python -m dqo.score --run runs/default --data runs/default/offline.jsonl --limit 2
    python -m dqo.score --run RUN --prompt "Q: 7+3*2-5=?" --response "$(cat response.txt)"
    python -m dqo.score --run RUN --data rows.jsonl --html steps.html [--html-tokens]

For every response, one row per step (its lines, as process rewards split them): V before and
after it, its reward, beta x its KL, and its soft advantage; the step with the lowest advantage
is marked as the likely first error (the paper's Table 2). Labels: the synthetic task's exact
step correctness, where the prompt is one of its problems. The library is :mod:`dqo.scoring`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .cli import check_data, parse_config
from .cli import run as run_cli
from .configs import SCORE_SECTIONS, ScoreConfig
from .data import read_jsonl
from .errors import UsageError
from .restore import run_config
from .scoring import as_rows, html_page, score_response, text_table
from .tasks import arithmetic

log = logging.getLogger(__name__)


def main(argv=None) -> None:
    run_cli(_main, argv, prog="python -m dqo.score")


def models(args: ScoreConfig):
    """(tokenizer, policy, reference, value) as the options name them."""
    from .modeling import ValueModel
    from .restore import load_trained_policy, run_base

    run = Path(args.run) if args.run else None
    policy_dir = args.policy or str(run / "final" / "policy")
    value_dir = args.value or str(run / "final" / "value")
    ref_dir = args.reference or run_base(run, "--run")
    if not (Path(value_dir) / "value_head.pt").is_file():
        raise UsageError(f"--value: {value_dir} holds no value model (value_head.pt): the "
                         f"run trained no critic (its algorithm has none?)")
    tok, policy = load_trained_policy(policy_dir, "--policy")
    _, reference = load_trained_policy(ref_dir, "--reference")
    value = ValueModel.from_pretrained(value_dir)
    return tok, policy.eval(), reference.eval(), value.eval()


def rows_to_score(args: ScoreConfig, tok):
    """(prompt, response text, response ids, rewards, finished) for each response."""
    from .data import check_row, tokenize_row
    if args.prompt is not None:
        rows = [check_row(dict(prompt=args.prompt, response=args.response, reward=args.reward),
                          "--prompt")]
    else:
        check_data("--data", args.data)
        rows, _ = read_jsonl(args.data, strict=True)  # a bad row is named, not skipped
        rows = rows[:args.limit]
    out = []
    for r in rows:
        ex = tokenize_row(r, tok)
        out.append((r["prompt"], r["response"], ex.response_ids, ex.rewards, ex.finished))
    return out


def _main(argv=None) -> None:
    args = parse_config(ScoreConfig, SCORE_SECTIONS, argv, prog="python -m dqo.score",
                        description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    opts = run_config(Path(args.run)) if args.run else {}
    beta = args.beta or float(opts.get("beta", 0.1))
    gamma = args.gamma or float(opts.get("gamma", 1.0))
    tok, policy, reference, value = models(args)
    scored = []
    for prompt, text, ids, rewards, finished in rows_to_score(args, tok):
        steps = score_response(policy, reference, value, tok, prompt, ids, text=text,
                               rewards=rewards, finished=finished, beta=beta, gamma=gamma,
                               labels=arithmetic.prompt_step_labels(prompt, text))
        scored.append(dict(prompt=prompt, steps=as_rows(steps), finished=finished,
                           outcome=sum(rewards)))
        if not args.json:
            print(f"\nprompt: {prompt!r}  (reward {sum(rewards):.3f}, beta {beta}, "
                  f"{'finished' if finished else 'cut at the length limit'})")
            print(text_table(steps))
    if args.json:
        for s in scored:
            print(json.dumps(s))
    if args.html:
        from .atomic import atomic_write
        atomic_write(args.html, lambda f: f.write(html_page(scored, tokens=args.html_tokens)))
        log.info("wrote %s", args.html)


if __name__ == "__main__":
    main()

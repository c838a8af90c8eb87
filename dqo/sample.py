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

The library is :mod:`dqo.generation` (sampling, labelling, process rewards) and
:mod:`dqo.data` (the rows); this module is its command line.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .cli import check_data, check_model, parse_config
from .cli import run as run_cli
from .configs import SAMPLE_SECTIONS, SampleConfig
from .data import extra_columns, read_prompt_rows, write_jsonl
from .decoding import model_id, sidecar
from .generation import generate, label_samples, load_sampler, mc_process_scores
from .optional import check_installed
from .prompts import prepare_prompt, with_system_prompt, with_template
from .rewards import reward_from_args

log = logging.getLogger(__name__)


def main(argv=None) -> None:
    run_cli(_main, argv, prog="python -m dqo.sample")


def _main(argv=None) -> None:
    args = parse_config(SampleConfig, SAMPLE_SECTIONS, argv, prog="python -m dqo.sample",
                        description=__doc__)
    check_installed(args)
    reward = reward_from_args(args)
    decoding = replace(with_system_prompt(with_template(
        args.decoding_config(), args.prompt_template, None if args.reward_fn else args.task),
        args.system_prompt),
                       sampled_by=model_id(args.model))
    check_model("--model", args.model)
    check_data("--prompts", args.prompts)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(args.seed)
    tok, model = load_sampler(args)
    decoding = decoding.with_stop_ids(tok, model)
    prompt_rows = read_prompt_rows(args.prompts, require_answer=args.reward_fn is None,
                                   prompt_column=args.prompt_column,
                                   answer_column=args.answer_column)
    prompts = [prepare_prompt(r["prompt"], decoding.prompt_template, decoding.system_prompt)
               for r in prompt_rows]
    answers = [r.get("answer") for r in prompt_rows]
    samples = generate(model, tok, prompts, n=args.n, progress=True, decoding=decoding,
                       batch_size=args.generation_batch_size)
    rows = label_samples(prompts, answers, samples, reward,
                         grade_truncated=args.grade_truncated,
                         solutions=[r.get("solution") for r in prompt_rows],
                         columns=[extra_columns(r) for r in prompt_rows])
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

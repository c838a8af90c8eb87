"""Build an offline dataset: sample n responses per prompt, record the behaviour log-probs,
verify, and (optionally) add process rewards. Paper appendix A and section 4.4.

    python -m dqo.sample --model PATH --prompts prompts.jsonl --task gsm8k --n 20 --out data.jsonl

``prompts.jsonl`` rows hold ``prompt`` and ``answer``. The output rows are the trainer's format
(:mod:`dqo.data`): ``prompt, response, response_ids, behavior_logp, finished, reward, answer``
and, with ``--process-scores``, ``steps`` and ``step_rewards``. The decoding settings are
written beside them (``data.decoding.json``, :mod:`dqo.decoding`) for ``dqo.train`` and
``dqo.evaluate`` to read back, before the first row.

Rows are written as they are sampled (:mod:`dqo.generation.dataset`): after every generation
batch they are appended durably to ``data.jsonl.partial/``, and the complete file is renamed to
``data.jsonl`` at the end. After a kill, a Ctrl-C, a full disk or a failing reward function,
``--resume`` continues where the run stopped and writes the same bytes an uninterrupted run
writes (same options).

Under a launcher (``torchrun --nproc-per-node N -m dqo.sample ...``) the ranks share the
generation batches (rank r runs batches r, r + N, ...; each one exactly as one process runs
it) and rank 0 grades and writes the rows in prompt order: the same file, byte for byte, as one
process on the same kind of device writes. ``--resume`` works there too.

A user's reward function runs with a time limit (``--reward-timeout``) and whatever it raises
is a RewardError naming it and the row.

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

import json
import logging
import sys
from dataclasses import replace

from .cli import check_data, check_model, parse_config
from .cli import run as run_cli
from .configs import SAMPLE_SECTIONS, SampleConfig
from .data import read_prompt_rows
from .decoding import model_id, sidecar
from .engine import rank
from .generation import load_sampler
from .generation.dataset import SampleJob, sample_dataset
from .launcher import check_ranks, launcher_group
from .optional import check_installed
from .prompts import prepare_prompt, with_system_prompt, with_template
from .rewards import reward_from_args

log = logging.getLogger(__name__)


def main(argv=None) -> None:
    try:
        run_cli(_main, argv, prog="python -m dqo.sample")
    except KeyboardInterrupt:  # the rows so far are on disk (the log line says where)
        print("python -m dqo.sample: interrupted; rerun with --resume to continue",
              file=sys.stderr)
        raise SystemExit(130) from None


def _main(argv=None) -> None:
    args = parse_config(SampleConfig, SAMPLE_SECTIONS, argv, prog="python -m dqo.sample",
                        description=__doc__)
    check_ranks(args.engine)  # before vllm's install is checked: it does not apply
    check_installed(args)
    reward = reward_from_args(args)
    decoding = replace(with_system_prompt(with_template(
        args.decoding_config(), args.prompt_template, None if args.reward_fn else args.task),
        args.system_prompt),
                       sampled_by=model_id(args.model))
    check_model("--model", args.model)
    check_data("--prompts", args.prompts)
    with launcher_group():
        _sample(args, reward, decoding)


def _sample(args: SampleConfig, reward, decoding) -> None:
    logging.basicConfig(level=logging.INFO if rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    # every row is checked before the model is loaded: a bad prompt late in the file must not
    # cost the hours sampled before it
    prompt_rows = read_prompt_rows(args.prompts, require_answer=args.reward_fn is None,
                                   prompt_column=args.prompt_column,
                                   answer_column=args.answer_column)
    prompts = [prepare_prompt(r["prompt"], decoding.prompt_template, decoding.system_prompt)
               for r in prompt_rows]
    tok, model = load_sampler(args)
    job = SampleJob(out=args.out, n=args.n, batch_size=args.generation_batch_size,
                    seed=args.seed, grade_truncated=args.grade_truncated,
                    process_scores=args.process_scores, process_n=args.process_n,
                    process_reward_total=args.process_reward_total, source=args.prompts)
    state = dict(engine=args.engine, reward=reward.name, correct_threshold=reward.threshold)
    if not sample_dataset(model, tok, prompt_rows, prompts, reward, decoding, job,
                          resume=args.resume, progress=True, state=state) or rank() != 0:
        return
    total = correct = cut = 0
    with open(args.out, encoding="utf-8") as f:  # streamed: the file may be large
        for line in f:
            r = json.loads(line)
            total, correct, cut = total + 1, correct + bool(r["correct"]), cut + (not r["finished"])
    log.info("wrote %d responses to %s (%.1f%% correct, %.1f%% cut at %d tokens); decoding "
             "settings in %s", total, args.out, 100 * correct / max(1, total),
             100 * cut / max(1, total), decoding.max_new_tokens, sidecar(args.out))


if __name__ == "__main__":
    main()

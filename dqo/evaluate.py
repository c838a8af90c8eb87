"""Greedy and sampled accuracy of a policy on a test set, with the paper's protocol.

    python -m dqo.evaluate --model PATH --data test.jsonl --task gsm8k [--samples 4]

``test.jsonl`` rows hold ``prompt`` and ``answer``. Greedy accuracy is one greedy decode per
problem; sampled accuracy is the mean correctness of ``--samples`` samples per problem, drawn
with the decoding settings the training data were sampled with (the paper evaluates with its
sampling settings, top_p 0.9 and top_k 16). Those settings and the length limit come from
``--decoding FILE``, else ``decoding.json`` in the model directory (``dqo.train`` writes it to
``final/policy``), else the paper's defaults; the flags override single fields. A response cut
at the length limit is graded wrong, and the share of cut responses is reported beside each
accuracy (``greedy_cut``, ``sampled_cut``). Each sample draws from its own generator, seeded
from (``--seed``, problem, sample) as ``dqo.sample`` seeds them: the draws do not depend on
``--generation-batch-size`` or on the number of ranks.

Under a launcher (``torchrun --nproc-per-node N -m dqo.evaluate ...``) the ranks share the
generation batches (each one exactly as one process runs it) and gather the responses; rank 0
prints the figures one process prints.

With ``--best-of N`` it also samples N responses a problem and reports, from those same
samples, the accuracy of the one each ``--rerank`` rule picks (the learned value, the policy's
implied return, the majority answer, a random one), each with a 95% interval over problems;
with ``--value DIR`` it measures that value model as a process reward model on them (step AUC
and first-error localisation against the synthetic task's exact labels, outcome AUC on any
task; :mod:`dqo.process_metrics`)::

    python -m dqo.evaluate --model RUN/final/policy --data test.jsonl --task arithmetic \
        --best-of 8 --value RUN/final/value

The library is :func:`dqo.evaluation.accuracy` and :func:`dqo.evaluation.critic_evaluation`;
this module is its command line.
"""
from __future__ import annotations

import json
import logging

import torch

from .cli import check_data, check_file, check_model, parse_config
from .cli import run as run_cli
from .configs import EVAL_SECTIONS, EvalConfig
from .data import extra_columns, read_prompt_rows
from .decoding import find_decoding
from .engine import rank
from .errors import UsageError
from .evaluation import accuracy, critic_evaluation
from .generation import load_sampler
from .launcher import check_ranks, launcher_group
from .optional import check_installed
from .prompts import prepare_prompt, with_system_prompt, with_template
from .restore import decoding_dirs
from .rewards import reward_from_args

log = logging.getLogger(__name__)


def main(argv=None) -> None:
    run_cli(_main, argv, prog="python -m dqo.evaluate")


def _main(argv=None) -> None:
    args = parse_config(EvalConfig, EVAL_SECTIONS, argv, prog="python -m dqo.evaluate",
                        description=__doc__)
    check_ranks(args.engine)  # before vllm's install is checked: it does not apply
    check_installed(args)
    reward = reward_from_args(args)
    check_model("--model", args.model)
    check_data("--data", args.data)
    check_file("--decoding", args.decoding)
    try:
        base = find_decoding(args.decoding, *decoding_dirs(args.model))
    except ValueError as exc:
        raise UsageError(f"--decoding: {exc}") from None
    decoding = with_system_prompt(with_template(
        args.decoding_config(base), args.prompt_template,
        None if args.reward_fn else args.task), args.system_prompt)
    critic = critic_paths(args)  # checked before any model loads
    with launcher_group():
        _evaluate(args, reward, decoding, critic)


def _evaluate(args: EvalConfig, reward, decoding, critic: dict) -> None:
    logging.basicConfig(level=logging.INFO if rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(args.seed)
    tok, model = load_sampler(args)
    value, reference = critic_models(critic, model)
    rows = read_prompt_rows(args.data, require_answer=args.reward_fn is None,
                            prompt_column=args.prompt_column, answer_column=args.answer_column)
    decoding = decoding.with_stop_ids(tok, model)
    prompts = [prepare_prompt(r["prompt"], decoding.prompt_template, decoding.system_prompt)
               for r in rows]
    res = accuracy(model, tok, prompts, [r.get("answer") for r in rows],
                   reward, samples=args.samples, decoding=decoding,
                   batch_size=args.generation_batch_size,
                   columns=[extra_columns(r) for r in rows], progress=rank() == 0,
                   seed=args.seed, sharded=True)
    if args.best_of or args.value:
        res["critic"] = critic_report(args, critic["rules"], tok, model, value, reference,
                                      prompts, rows, reward, decoding)
    if rank() == 0:
        print(json.dumps(dict(model=args.model, data=args.data, n=len(rows), **res,
                              decoding=json.loads(decoding.to_json()))))


def critic_paths(args: EvalConfig) -> dict:
    """The ``value`` and ``reference`` directories ``--value`` and ``--rerank q`` need (None
    where not), and the ``rules`` to rerank by, checked: a missing model is an error before
    any work, and the default rules leave ``q`` out when no reference can be found."""
    from pathlib import Path

    from .restore import run_base

    if args.value:
        check_model("--value", args.value)
    ref = args.reference
    if ref is None and args.best_of:
        run = Path(args.model).expanduser().resolve().parent.parent  # RUN/final/policy
        if (run / "config.yaml").is_file():
            ref = run_base(run, "--reference")
    rules = args.rules(has_reference=ref is not None) if args.best_of else ()
    if "q" in rules:
        if ref is None:
            raise UsageError("--reference: --rerank q needs the reference policy; --model is "
                             "not a run's final/policy, so name it (or leave q out of "
                             "--rerank)")
        check_model("--reference", ref)
    elif args.rerank is None and args.best_of and ref is None:
        log.info("--best-of: no reference policy found (--reference), so no rule q")
    return dict(value=args.value, reference=ref if "q" in rules else None, rules=rules)


def critic_models(paths: dict, model):
    """(value, reference) loaded from :func:`critic_paths`' directories (None where none),
    on the policy's device."""
    from .modeling import ValueModel
    from .restore import load_trained_policy

    value = reference = None
    if paths["value"]:
        value = ValueModel.from_pretrained(paths["value"]).eval()
        value.to(next(model.parameters()).device)
    if paths["reference"]:
        reference = load_trained_policy(paths["reference"], "--reference")[1].eval()
    return value, reference


def _finite(x):
    """NaN (an AUC without pairs) as null: the printed line stays strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def critic_report(args: EvalConfig, rules, tok, model, value, reference, prompts, rows, reward,
                  decoding) -> dict:
    res = critic_evaluation(
        model, tok, prompts, [r.get("answer") for r in rows], reward, decoding=decoding,
        n=args.best_of or max(args.samples, 1), rules=rules, value=value, reference=reference,
        task=None if args.reward_fn else args.task, batch_size=args.generation_batch_size,
        columns=[extra_columns(r) for r in rows], seed=args.seed, sharded=True,
        progress=rank() == 0)
    for fig in res.get("best_of", {}).values():
        fig.pop("items")
    return _finite(res)


if __name__ == "__main__":
    main()

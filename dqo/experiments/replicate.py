"""A reproducible mini-replication of the paper's comparisons (Tables 3-7, Figures 2-3) on the
synthetic arithmetic task, on a CPU.

    python -m dqo.experiments.replicate                 # 3 bases x 2 seeds, about 50 minutes
    python -m dqo.experiments.replicate --quick         # toy sizes, seconds (CI smoke)

A tiny base policy is warmed up with SFT until it is right sometimes. An offline dataset is
sampled from it (8 responses a prompt, verified), plus two process-score variants of it: Monte-
Carlo (paper 4.4: completions sampled from every prefix of a failed response) and the task's
exact step labels. Every method then trains from the same base weights on the same samples
(SFT on the problems' canonical solutions). All of it is repeated for several bases
(``--bases``: SFT warm-ups from different seeds, each with its own offline data).

The protocol, the same for every method (SFT, RS, DPO, KTO, DRO, DQO):

- **One step budget**: ``Budget.max_steps`` optimizer steps of ``Budget.batch_size``.
- **Checkpoint selection on validation**: greedy accuracy on a validation split (disjoint from
  the test problems) every ``Budget.select_every`` steps; the run keeps its best checkpoint
  (the earliest of equals). The paper selects DQO's and DRO's checkpoints on the training
  curve; here every method gets the same selection.
- **A learning-rate grid with an interior choice**: ``Budget.lrs`` (three points, beta at its
  default 0.1), each run once (seed 0) and scored by its selected checkpoint's validation
  accuracy. Where the best is an end of the grid, the grid is widened past it by
  ``Budget.lr_factor``, up to ``Budget.max_widen`` times; the report says where a choice stays
  on an edge. The chosen learning rate then trains every seed (seed 0's sweep run is reused).
  DQO's ablations and process-score variants use DQO's choice.
- **Intervals over bases and problems**: every accuracy and difference has a 95% interval from
  a two-level bootstrap that resamples the bases and the test problems (the same problems on
  every base, so differences stay paired); a difference from DQO pairs the same problems,
  bases and seeds.

The critic (issue 26's measurements): for DQO, DQO with each process score, and DRO (whose value
is fit at the prompt only), the trained value model reads responses the base policy samples for
the test problems (:mod:`dqo.process_metrics`: step AUC against the exact labels, first-error
localisation, outcome AUC), and the DQO policy's best-of-8 samples are reranked by its value,
its implied return, the majority answer and at random (:mod:`dqo.reranking`).

Outputs in ``--out``: ``replication.md`` (tables), ``replication.json`` (every run, with its
per-problem results), ``replication.png`` (accuracy differences with intervals, and learned
V(s) against true step correctness). ``runs.jsonl`` holds every finished run as it ends: a
rerun with ``--resume`` skips those (the bases and their data are rebuilt: the same ones, the
warm-up and sampling being seeded).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .. import algos
from ..configs import TrainConfig
from ..critic import init_value_head, mean_return
from ..data import Example, tokenize_rows
from ..evaluation import critic_evaluation
from ..generation import PROCESS_REWARD_TOTAL, exact_process_scores, generate, mc_process_scores
from ..generation.dataset import prompt_seed
from ..loop import train
from ..modeling import ValueModel
from ..pipeline import DefaultPipeline, Evaluator, Splits, sample_offline, warm_up_base
from ..process_metrics import (
    critic_records,
    pooled_first_error,
    pooled_outcome_auc,
    pooled_outcome_auc_within,
    pooled_step_auc,
    process_metrics,
)
from ..reference_logps import compute_ref_logps
from ..reranking import RULES
from ..stats import two_level_ci, two_level_groups_ci
from ..tasks import arithmetic, get_verifier

log = logging.getLogger("dqo.replicate")


@dataclass
class Method:
    name: str
    algo: str
    data: str = "outcome"  # outcome | mc | exact | reference
    overrides: Dict = field(default_factory=dict)
    tuned: bool = False  # swept on the validation split (else: DQO's chosen configuration)


METHODS = [
    Method("SFT", "sft", "reference", tuned=True),
    Method("RS", "rs", tuned=True),
    Method("DPO", "dpo", tuned=True),
    Method("KTO", "kto", tuned=True),
    Method("DRO", "dro", tuned=True),
    Method("DQO", "dqo", tuned=True),
    Method("DQO, no IS on policy loss", "dqo", overrides={"is_policy": False}),
    Method("DQO, no IS on value loss", "dqo", overrides={"is_value": False}),
    Method("DQO, no IS", "dqo", overrides={"is_policy": False, "is_value": False}),
    Method("DQO, lambda=0.95", "dqo", overrides={"lam": 0.95}),
    Method("DQO + process scores (MC)", "dqo", "mc"),
    Method("DQO + process scores (exact labels)", "dqo", "exact"),
]

# the critics measured as process reward models; DRO's value is fit at the prompt only
CRITIC_METHODS = ("DQO", "DQO + process scores (MC)", "DQO + process scores (exact labels)",
                  "DRO")
RERANKED = "DQO"  # the run whose best-of-N samples are reranked


@dataclass
class Budget:
    max_steps: int = 64
    batch_size: int = 64
    select_every: int = 16  # validation checkpoints every this many steps
    eval_samples: int = 4
    mc_samples: int = 4  # completions per prefix for the Monte-Carlo process scores
    process_reward_total: float = PROCESS_REWARD_TOTAL  # the most a failed response earns
    lrs: Tuple[float, ...] = (1e-5, 3e-5, 1e-4)  # the starting grid of every tuned method
    lr_factor: float = 3.0  # one widening step past an end of the grid
    max_widen: int = 2
    critic_samples: int = 4  # base-policy responses a test problem the critics read
    best_of: int = 8
    bootstrap: int = 2000  # resamples for the accuracy intervals
    critic_bootstrap: int = 500  # resamples for the critic's intervals (an AUC each)


def quick() -> (DefaultPipeline, Budget):
    return (DefaultPipeline(n_sft=512, n_offline=16, n_test=16, n_dev=16, n_val=8,
                            samples_per_prompt=8, sft_max_steps=150, hidden_size=64, layers=2),
            Budget(max_steps=2, batch_size=4, select_every=1, eval_samples=1, mc_samples=2,
                   lrs=(1e-5, 2e-5, 4e-5), max_widen=1, critic_samples=2, best_of=2,
                   bootstrap=200, critic_bootstrap=20))


def replication_pipeline() -> DefaultPipeline:
    return DefaultPipeline(n_val=100)


def build_datasets(tok, policy, pipe: DefaultPipeline, splits: Splits, budget: Budget,
                   out: Path) -> Dict[str, List[Example]]:
    rows = sample_offline(policy, tok, pipe, splits.offline, out / "offline.jsonl",
                          progress=False)
    verify = get_verifier("arithmetic")
    mc = mc_process_scores(policy, tok, rows, verify, n=budget.mc_samples,
                           total=budget.process_reward_total, decoding=pipe.decoding)
    exact = exact_process_scores(
        rows, lambda p, r: arithmetic.step_labels(arithmetic.parse_prompt(p), r),
        total=budget.process_reward_total)
    reference = [dict(prompt=p.prompt, response=p.solution, reward=1.0, answer=p.answer)
                 for p in splits.offline]
    out_sets = {}
    for name, rs in (("outcome", rows), ("mc", mc), ("exact", exact), ("reference", reference)):
        exs, _ = tokenize_rows(rs, tok, strict=True)
        compute_ref_logps(policy, exs, tok.pad_token_id)
        out_sets[name] = exs
    stats = {name: dict(responses=len(rs),
                        correct=sum(r["reward"] > 0 for r in rs) / len(rs),
                        with_process_reward=sum(any(x > 0 for x in r.get("step_rewards", []))
                                                for r in rs))
             for name, rs in (("outcome", rows), ("mc", mc), ("exact", exact))}
    log.info("offline data: %s", json.dumps(stats))
    return out_sets, stats


def cells(runs: List[Dict], key: str, bases: List[int]) -> Optional[torch.Tensor]:
    """[bases, problems]: each test problem's ``key`` score, mean over a base's seeds; None
    when a base has no run."""
    rows = []
    for b in bases:
        mine = [r[key + "_items"] for r in runs if r["base"] == b]
        if not mine:
            return None
        rows.append(torch.tensor(mine, dtype=torch.float64).mean(0))
    return torch.stack(rows)


def compare(runs: List[Dict], name: str, ref: str, key: str, n: int,
            base: Optional[int] = None) -> Dict:
    """``name``'s accuracy with its interval, and its difference from ``ref``'s paired on the
    same problems, bases and seeds, with its interval (both over bases and problems)."""
    def sel(m):
        return {(r["base"], r["seed"]): r for r in runs if r["method"] == m
                and f"{key}_items" in r and (base is None or r["base"] == base)}
    mine, theirs = sel(name), sel(ref)
    if not mine:
        return {}
    bases = sorted({b for b, _ in mine})
    own = cells(list(mine.values()), key, bases)
    out = dict(acc=own.mean().item(), ci=two_level_ci(own, n))
    both = sorted(set(mine) & set(theirs))
    if name != ref and both:
        bb = sorted({b for b, _ in both})
        diff = (cells([mine[k] for k in both], key, bb)
                - cells([theirs[k] for k in both], key, bb))
        out.update(diff=diff.mean().item(), diff_ci=two_level_ci(diff, n))
    return out


def summarize(runs: List[Dict], methods: List[Method], bases: List[int], n: int,
              ref: str = "DQO") -> List[Dict]:
    rows = []
    for name in ["Base (SFT warm-up)"] + [m.name for m in methods]:
        mine = [r for r in runs if r["method"] == name]
        row = {"method": name, "n": sum("greedy" in r for r in mine),
               "skipped": sorted({r["skipped"] for r in mine if "skipped" in r}),
               "steps": [r["selected_step"] for r in mine if "selected_step" in r]}
        for key in ("greedy", "sampled"):
            row[key] = compare(runs, name, ref, key, n)
            row[key + "_by_base"] = {b: compare(runs, name, ref, key, n, base=b) for b in bases}
        rows.append(row)
    return rows


def summarize_critics(critics: Dict[str, Dict[int, List[List[list]]]], n: int) -> List[Dict]:
    """Per critic: its figures on the responses of every base and seed, pooled, with two-level
    intervals. A cell (base, problem) holds that problem's group of responses under each seed's
    critic: the bootstrap draws bases and problems, and within-problem pairs stay within one
    critic."""
    out = []
    for name, by_base in critics.items():
        table = [[[seed_groups[p] for seed_groups in by_base[b]]
                  for p in range(len(by_base[b][0]))] for b in sorted(by_base)]
        flat = [g for row in table for cell in row for g in cell]
        pooled = process_metrics(flat, resamples=0)
        row = dict(method=name, runs=sum(len(v) for v in by_base.values()), **pooled)
        for key, fn in (("step_auc", pooled_step_auc), ("first_error", pooled_first_error),
                        ("outcome_auc", pooled_outcome_auc),
                        ("outcome_auc_within", pooled_outcome_auc_within)):
            row[key + "_ci"] = two_level_groups_ci(
                table, lambda cells, fn=fn: fn([g for c in cells for g in c]), n)
        row["step_auc_by_run"] = {f"{b}/{s}": process_metrics(g, resamples=0).get("step_auc")
                                  for b in sorted(by_base) for s, g in enumerate(by_base[b])}
        out.append(row)
    return out


def summarize_best_of(runs: List[Dict], bases: List[int], n: int) -> Dict:
    """The reranked run's best-of-N accuracy of each rule over bases and seeds, and each
    rule's difference from one sample's accuracy (``mean``: a random pick's expectation),
    paired on the problems, with two-level intervals."""
    mine = [r for r in runs if "best_of" in r]
    if not mine:
        return {}
    bases = sorted({r["base"] for r in mine})
    out = {}
    for rule in mine[0]["best_of"]:
        rows = [dict(base=r["base"], x_items=r["best_of"][rule]["items"],
                     d_items=[a - b for a, b in zip(r["best_of"][rule]["items"],
                                                    r["best_of"]["mean"]["items"])])
                for r in mine]
        x, d = cells(rows, "x", bases), cells(rows, "d", bases)
        out[rule] = dict(acc=x.mean().item(), ci=two_level_ci(x, n))
        if rule not in ("mean", "oracle"):
            out[rule].update(minus_mean=d.mean().item(), minus_mean_ci=two_level_ci(d, n))
    return out


def _pct(c: Dict, which: str = "acc") -> str:
    if which == "acc":
        return f"{100 * c['acc']:.1f} [{100 * c['ci'][0]:.1f}, {100 * c['ci'][1]:.1f}]"
    if "diff" not in c:
        return "–"
    return f"{100 * c['diff']:+.1f} [{100 * c['diff_ci'][0]:+.1f}, {100 * c['diff_ci'][1]:+.1f}]"


def _num(x: Optional[float], ci=None, fmt: str = ".3f") -> str:
    if x is None or x != x:
        return "–"
    s = f"{x:{fmt}}"
    return s + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci and ci[0] == ci[0] else "")


class Selector:
    """``train``'s ``eval_fn``: the validation greedy accuracy of the policy now; keeps a copy
    of the policy's (and value model's) weights whenever it is the best so far (the earliest
    of equals)."""

    def __init__(self, policy, value, validate: Evaluator, every: int):
        self.policy, self.value, self.validate, self.every = policy, value, validate, every
        self.best, self.step, self.curve, self.state = -1.0, 0, [], None

    def __call__(self) -> Dict:
        self.policy.eval()
        acc = self.validate(self.policy, samples=0)["greedy"]
        self.curve.append(acc)
        if acc > self.best:
            self.best, self.step = acc, self.every * len(self.curve)
            self.state = (copy.deepcopy(self.policy.state_dict()),
                          None if self.value is None else copy.deepcopy(self.value.state_dict()))
        return dict(val_greedy=acc)

    def restore(self) -> None:
        self.policy.load_state_dict(self.state[0])
        if self.value is not None:
            self.value.load_state_dict(self.state[1])
        self.policy.eval()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def train_one(m: Method, b: int, seed: int, lr: float, tok, base, datasets, budget: Budget,
              work: Path, validate: Evaluator):
    """Train ``m`` with ``lr`` from a copy of ``base``, keeping its best validation checkpoint:
    (row, policy, value) with the row's validation curve; (row with ``skipped``, None, None)
    when the method has no batch of training items."""
    row = dict(method=m.name, base=b, seed=seed, config=dict(lr=lr))
    n_items = len(algos.make(m.algo).items(datasets[m.data]))
    if n_items < budget.batch_size:  # e.g. RS/DPO when no sample is correct
        log.warning("base %d seed %d %s: skipped, %d training items < one batch", b, seed,
                    m.name, n_items)
        return dict(row, skipped=f"{n_items} training items < one batch"), None, None
    torch.manual_seed(seed)
    policy = copy.deepcopy(base)
    value = None
    if algos.REGISTRY[m.algo].needs_value:
        value = ValueModel.from_policy(policy)
        init_value_head(value, mean_return(datasets[m.data]))  # the trainer's default start
    out = work / "runs" / f"{_slug(m.name)}-lr{lr:g}-s{seed}"
    targs = TrainConfig(algo=m.algo, out=str(out), lr=lr, batch_size=budget.batch_size,
                        micro_batch=budget.batch_size, engine="torch", progress=False,
                        seed=seed, max_steps=budget.max_steps, eval_every=budget.select_every,
                        **m.overrides)
    select = Selector(policy, value, validate, budget.select_every)
    t = time.time()
    train(targs, tok, policy, value, datasets[m.data], eval_fn=select)
    select.restore()
    shutil.rmtree(out, ignore_errors=True)
    log.info("base %d seed %d %-38s lr %-7g val %s -> step %d", b, seed, m.name, lr,
             " ".join(f"{x:.3f}" for x in select.curve), select.step)
    return (dict(row, train_s=time.time() - t, val_curve=select.curve, val_greedy=select.best,
                 selected_step=select.step), policy, value)


def test_one(row: Dict, policy, value, ctx: Dict) -> Dict:
    """``row`` with the test figures of the selected checkpoint: accuracy per problem, and for
    the critics their reading of the base's responses, for the reranked run its best-of-N."""
    t = time.time()
    with torch.random.fork_rng():
        torch.manual_seed(row["seed"])
        row.update(ctx["evaluate"](policy, per_problem=True))
    name = row["method"]
    if value is not None and name in CRITIC_METHODS:
        value.eval()
        groups = critic_records(value, ctx["tok"], ctx["prompts"], ctx["base_samples"],
                                ctx["base_right"])
        row["critic"] = process_metrics(groups, resamples=ctx["budget"].critic_bootstrap)
        row["critic_groups"] = groups  # pooled over bases and seeds in the summary
    if value is not None and name == RERANKED:
        res = critic_evaluation(policy, ctx["tok"], ctx["prompts"], ctx["answers"],
                                get_verifier("arithmetic"), decoding=ctx["decoding"],
                                n=ctx["budget"].best_of, rules=RULES, value=value,
                                reference=ctx["base"], task="arithmetic", seed=row["seed"])
        row["best_of"] = res["best_of"]
        row["own_samples_critic"] = res["process"]
    log.info("base %d seed %d %-38s test greedy %.3f sampled %.3f%s", row["base"], row["seed"],
             name, row["greedy"], row.get("sampled", float("nan")),
             f" best-of-{ctx['budget'].best_of} by value {row['best_of']['value']['acc']:.3f}"
             if "best_of" in row else "")
    row["test_s"] = time.time() - t
    return row


def lr_grid(budget: Budget, done: Dict[float, float]) -> Optional[float]:
    """The next learning rate to try, given validation scores ``done`` (lr -> accuracy): the
    starting grid first, then one step past an end that is the best (up to ``max_widen``
    steps); None when the choice is interior or the widening is spent."""
    for lr in budget.lrs:
        if lr not in done:
            return lr
    lrs = sorted(done)
    best = max(lrs, key=lambda x: (done[x], -x))  # equals: the smaller lr
    if len(lrs) - len(budget.lrs) >= budget.max_widen:
        return None
    if best == lrs[0]:
        return lrs[0] / budget.lr_factor
    if best == lrs[-1]:
        return lrs[-1] * budget.lr_factor
    return None


def chosen_lr(done: Dict[float, float]) -> Tuple[float, bool]:
    """(the best learning rate, whether it is interior to the points tried)."""
    lrs = sorted(done)
    best = max(lrs, key=lambda x: (done[x], -x))
    return best, lrs[0] < best < lrs[-1]


def _config(c: Dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in c.items())


def write_report(out: Path, summary, critics, best_of, meta, data_stats, sweep, chosen) -> None:
    correct = ", ".join(f"{100 * d['outcome']['correct']:.1f}%" for d in data_stats.values())
    bases, budget, pipe = meta["bases"], meta["budget"], meta["pipe"]
    lines = [
        "# Mini-replication on the synthetic arithmetic task", "",
        f"Command: `{meta['command']}`  ",
        f"Versions: torch {meta['torch']}, transformers {meta['transformers']}, "
        f"python {meta['python']}; {meta['device']}; {meta['date']}; {meta['minutes']:.1f} min"
        + (" (this process; earlier runs of the journal resumed)" if meta["resumed"] else ""),
        "",
        f"Bases: {len(bases)} {meta['params_m']:.2f}M-parameter transformers, SFT warm-ups on "
        f"{pipe['n_sft']} problems from seeds {bases}. Offline data of each: "
        f"{pipe['n_offline']} prompts x {pipe['samples_per_prompt']} samples ({correct} "
        f"correct). Every method: at most {budget['max_steps']} steps of "
        f"{budget['batch_size']}, its checkpoint chosen by greedy accuracy on "
        f"{pipe['n_val']} validation problems every {budget['select_every']} steps. Tuned "
        f"methods: lr swept from {list(budget['lrs'])} (beta 0.1), widened by "
        f"x{budget['lr_factor']:g} past an end that wins (at most {budget['max_widen']} times), "
        f"per base, on seed 0; the chosen lr trains {len(meta['seeds'])} seeds, scored on the "
        f"{pipe['n_test']} test problems. Ablations and process-score variants use DQO's lr. "
        f"Brackets: 95% intervals from a bootstrap over the bases and the test problems "
        f"({budget['bootstrap']} resamples); \"minus DQO\" is paired on the same problems, bases "
        f"and seeds.",
        "",
        "| method | greedy % | minus DQO | sampled % | minus DQO | selected steps |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in summary:
        if not r["n"]:
            why = "; ".join(r["skipped"]) or "not run"
            lines.append(f"| {r['method']} | skipped: {why} | | | | |")
            continue
        g, sm = r["greedy"], r["sampled"]
        steps = ", ".join(str(x) for x in r["steps"]) or "–"
        lines.append(f"| {r['method']} | {_pct(g)} | {_pct(g, 'diff')} | {_pct(sm)} | "
                     f"{_pct(sm, 'diff')} | {steps} |")
    lines += ["", "Greedy accuracy on each base (mean over training seeds), and minus DQO's on "
              "that base (interval over the test problems):", "",
              "| method | " + " | ".join(f"base {b}" for b in bases) + " |",
              "|---|" + "---:|" * len(bases)]
    for r in summary:
        cells_ = []
        for b in bases:
            c = r["greedy_by_base"].get(b) or {}
            cells_.append(f"{100 * c['acc']:.1f} ({_pct(c, 'diff')})" if c else
                          "skipped: " + ("; ".join(r["skipped"]) or "not run"))
        lines.append(f"| {r['method']} | " + " | ".join(cells_) + " |")
    lines += ["", "The sweep: each learning rate's best validation greedy accuracy (seed 0) and "
              "the step it was reached at; the chosen lr in bold, *edge* where it is an end of "
              "the points tried:", "",
              "| method | lr | " + " | ".join(f"base {b}" for b in bases) + " |",
              "|---|---|" + "---:|" * len(bases)]
    for name in dict.fromkeys(x["method"] for x in sweep):
        for lr in sorted({x["config"]["lr"] for x in sweep if x["method"] == name}):
            cells_ = []
            for b in bases:
                hit = [x for x in sweep if x["method"] == name and x["base"] == b
                       and x["config"]["lr"] == lr]
                if not hit:
                    cells_.append("")
                    continue
                h = hit[0]
                text = (f"{100 * h['val_greedy']:.1f} @{h['selected_step']}"
                        if "val_greedy" in h else f"skipped: {h['skipped']}")
                pick = chosen.get(b, {}).get(name, {})
                if pick.get("lr") == lr:
                    text = f"**{text}**" + ("" if pick.get("interior") else " *edge*")
                cells_.append(text)
            lines.append(f"| {name} | {lr:g} | " + " | ".join(cells_) + " |")
    if critics:
        lines += ["", "The critic as a process reward model: each trained value model reads "
                  f"{budget['critic_samples']} responses a test problem sampled from its base; "
                  "pooled over bases and seeds. Step AUC: P(V after a right prefix > V after a "
                  "wrong one), exact labels. First error: share of responses with a wrong step "
                  "where the step whose V falls most is the first wrong one (chance: a step "
                  "drawn uniformly). Outcome AUC: V(s_T) of right vs wrong responses, over all "
                  "pairs and within a problem's responses (what a reranker needs). 95% "
                  f"intervals over bases and problems ({budget['critic_bootstrap']} resamples).",
                  "",
                  "| value model | step AUC | mean V right / wrong prefix | first error | "
                  "chance | outcome AUC | within a problem | step AUC per base/seed |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for c in critics:
            per = ", ".join(f"{v:.2f}" if v is not None and v == v else "–"
                            for v in c["step_auc_by_run"].values())
            lines.append(
                f"| {c['method']} | {_num(c.get('step_auc'), c.get('step_auc_ci'))} | "
                f"{_num(c.get('mean_value_right_prefix'))} / "
                f"{_num(c.get('mean_value_wrong_prefix'))} | "
                f"{_num(c.get('first_error'), c.get('first_error_ci'))} | "
                f"{_num(c.get('first_error_chance'))} | "
                f"{_num(c.get('outcome_auc'), c.get('outcome_auc_ci'))} | "
                f"{_num(c.get('outcome_auc_within'), c.get('outcome_auc_within_ci'))} | {per} |")
    if best_of:
        lines += ["", f"Best-of-{budget['best_of']} with the {RERANKED} run's samples "
                  "(each rule picks one of the same samples of every test problem; mean over "
                  "bases and seeds; intervals over bases and problems):", "",
                  "| rule | accuracy % | minus one sample (mean) |", "|---|---:|---:|"]
        for rule, c in best_of.items():
            d = ("–" if "minus_mean" not in c else
                 f"{100 * c['minus_mean']:+.1f} [{100 * c['minus_mean_ci'][0]:+.1f}, "
                 f"{100 * c['minus_mean_ci'][1]:+.1f}]")
            lines.append(f"| {rule} | {_pct(c)} | {d} |")
    (out / "replication.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, summary, values) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    # the paired difference from DQO is what the study can resolve: absolute accuracies share
    # the test problems' spread, which hides it
    rows = [r for r in summary if r["n"] and "diff" in r["greedy"]]
    x = range(len(rows))
    for off, key, color in ((-0.2, "greedy", "tab:blue"), (0.2, "sampled", "tab:orange")):
        d = [100 * r[key]["diff"] for r in rows]
        err = [[v - 100 * r[key]["diff_ci"][0] for v, r in zip(d, rows)],
               [100 * r[key]["diff_ci"][1] - v for v, r in zip(d, rows)]]
        ax1.bar([i + off for i in x], d, 0.4, yerr=err, label=key, color=color, capsize=2)
    ax1.axhline(0, color="black", linewidth=0.8)
    ax1.set_xticks(list(x))
    ax1.set_xticklabels([r["method"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax1.set_ylabel("accuracy minus DQO's (points)")
    ax1.legend(ncol=2, loc="upper right")
    ax1.set_title("Each method minus DQO, paired (95% intervals over bases and problems)")
    data, labels = [], []
    for name in [n for n in CRITIC_METHODS if n in values]:
        for ok in (True, False):
            data.append([p["value"] for p in values[name] if p["correct"] == ok]
                        or [float("nan")])
            short = name.replace("DQO + process scores (exact labels)", "DQO+exact").replace(
                "DQO + process scores (MC)", "DQO+MC")
            labels.append(f"{short}\n{'right' if ok else 'wrong'}\nprefix")
    ax2.boxplot(data, showfliers=False)
    ax2.set_xticks(range(1, len(labels) + 1))
    ax2.set_xticklabels(labels, fontsize=7)
    ax2.set_ylabel("learned V(s) after the step")
    ax2.set_title("Value of states vs true step correctness (base 0, seed 0)")
    fig.tight_layout()
    fig.savefig(out / "replication.png", dpi=110)
    plt.close(fig)


class Journal:
    """``runs.jsonl``: every finished sweep point and test run, appended as it ends, so that a
    stopped replication resumes (``--resume``) without redoing them."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.rows: List[Dict] = []
        if resume and path.is_file():
            lines = [x for x in path.read_text().splitlines() if x.strip()]
            for i, x in enumerate(lines):
                try:
                    self.rows.append(json.loads(x))
                except json.JSONDecodeError:
                    if i != len(lines) - 1:
                        raise
                    log.warning("%s: its last line was cut by a kill: dropped", path)
                    path.write_text("".join(line + "\n" for line in lines[:-1]))
        elif path.exists():
            path.unlink()

    def find(self, kind: str, **key) -> Optional[Dict]:
        return next((r for r in self.rows if r["kind"] == kind and all(
            (r["config"]["lr"] if k == "lr" else r.get(k)) == v for k, v in key.items())), None)

    def add(self, kind: str, row: Dict) -> Dict:
        row = dict(row, kind=kind)
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return row


def base_samples(tok, base, splits: Splits, pipe: DefaultPipeline, n: int, seed: int):
    """``n`` responses of the base policy to every test problem, graded: what the critics
    read."""
    prompts = [p.prompt for p in splits.test]
    samples = generate(base, tok, prompts, n=n, decoding=pipe.decoding,
                       seeds=[prompt_seed(seed, i) for i in range(len(prompts))])
    right = [[arithmetic.verify(s.text, p.answer) and s.finished for s in ss]
             for p, ss in zip(splits.test, samples)]
    return samples, right


def run_base_model(b: int, methods: List[Method], pipe: DefaultPipeline, splits: Splits,
                   budget: Budget, seeds: List[int], out: Path, journal: Journal) -> Dict:
    """Everything on base ``b``: its warm-up and data, the sweeps, every seed's test run."""
    work = out / "work" / f"base-{b}"
    # warmed up again on --resume too: the data are sampled from the global generator, whose
    # state the warm-up leaves, so only a fresh warm-up gives the same data again
    tok, base = warm_up_base(pipe, splits, work, seed=b, progress=False)
    base.eval()
    datasets, stats = build_datasets(tok, base, pipe, splits, budget, work)
    validate = Evaluator(tok, splits.val, pipe.decoding, samples=0)
    samples, right = base_samples(tok, base, splits, pipe, budget.critic_samples, seed=b)
    ctx = dict(tok=tok, base=base, evaluate=Evaluator(tok, splits.test, pipe.decoding,
                                                      samples=budget.eval_samples),
               prompts=[p.prompt for p in splits.test], answers=[p.answer for p in splits.test],
               decoding=pipe.decoding, budget=budget, base_samples=samples, base_right=right)
    for seed in seeds:
        if not journal.find("run", method="Base (SFT warm-up)", base=b, seed=seed):
            torch.manual_seed(seed)
            journal.add("run", dict(method="Base (SFT warm-up)", base=b, seed=seed,
                                    **ctx["evaluate"](base, per_problem=True)))
    chosen: Dict[str, Tuple[float, bool]] = {}
    for m in methods:
        if m.tuned:
            kept = {}  # lr -> (row, policy, value) of this session's seed-0 runs
            done = {r["config"]["lr"]: r.get("val_greedy", -1.0) for r in journal.rows
                    if r["kind"] == "sweep" and r["method"] == m.name and r["base"] == b}
            while (lr := lr_grid(budget, done)) is not None:
                row, policy, value = train_one(m, b, 0, lr, tok, base, datasets, budget, work,
                                               validate)
                journal.add("sweep", {k: v for k, v in row.items()})
                done[lr] = row.get("val_greedy", -1.0)
                kept[lr] = (row, policy, value)
            chosen[m.name] = chosen_lr(done)
        else:
            chosen[m.name] = chosen.get("DQO") or (budget.lrs[len(budget.lrs) // 2], True)
        lr = chosen[m.name][0]
        for seed in seeds:
            if journal.find("run", method=m.name, base=b, seed=seed):
                continue
            if m.tuned and seed == 0 and lr in kept:
                row, policy, value = kept[lr]
            else:
                row, policy, value = train_one(m, b, seed, lr, tok, base, datasets, budget,
                                               work, validate)
            if policy is not None:
                row = test_one(dict(row), policy, value, ctx)
            journal.add("run", row)
        if m.tuned:
            kept.clear()
    return journal.add("base", dict(
        base=b, methods=[m.name for m in methods], seeds=seeds, stats=stats,
        chosen={k: dict(lr=v[0], interior=v[1]) for k, v in chosen.items()},
        params_m=sum(x.numel() for x in base.parameters()) / 1e6))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes: a smoke test")
    p.add_argument("--bases", type=int, default=None,
                   help="SFT-warmed base models, each with its own data; default 3 (1 with "
                        "--quick)")
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds per base; default 2 (1 with --quick)")
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--methods", default=None,
                   help="a subset of the method names, separated by ';' (they contain commas)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs --out/runs.jsonl holds and do the rest")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()

    t0 = time.time()
    pipe, budget = quick() if args.quick else (replication_pipeline(), Budget())
    bases = list(range(args.bases or (1 if args.quick else 3)))
    seeds = list(range(args.seeds or (1 if args.quick else 2)))
    wanted = [x.strip() for x in args.methods.split(";")] if args.methods else None
    unknown = set(wanted or ()) - {m.name for m in METHODS}
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; the methods are "
                f"{'; '.join(m.name for m in METHODS)}")
    methods = METHODS if not wanted else [m for m in METHODS if m.name in wanted]
    if "DQO" not in [m.name for m in methods] and any(not m.tuned for m in methods):
        p.error("--methods: DQO's ablations and variants use DQO's choice: include DQO")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / "runs.jsonl", args.resume)
    resumed = bool(journal.rows)
    torch.manual_seed(0)
    splits = Splits(pipe, seed=0)  # one split: every base is tested on the same problems
    # a base the journal finished (with these methods and seeds) is not warmed up again
    names = [m.name for m in methods]
    per_base = {b: journal.find("base", base=b, methods=names, seeds=seeds) or run_base_model(
        b, methods, pipe, splits, budget, seeds, out, journal) for b in bases}
    runs = [r for r in journal.rows if r["kind"] == "run" and r["base"] in bases]
    sweep = [r for r in journal.rows if r["kind"] == "sweep" and r["base"] in bases]
    critics: Dict[str, Dict[int, List]] = {}
    for r in runs:
        if "critic_groups" in r:
            critics.setdefault(r["method"], {}).setdefault(r["base"], []).append(
                r.pop("critic_groups"))
    summary = summarize(runs, methods, bases, budget.bootstrap)
    critic_summary = summarize_critics({k: critics[k] for k in CRITIC_METHODS if k in critics},
                                       budget.critic_bootstrap)
    best_of = summarize_best_of(runs, bases, budget.bootstrap)
    points = {name: [dict(value=s["value"], correct=s["label"]) for g in by_base[bases[0]][0]
                     for rr in g for s in rr["steps"] if s["label"] is not None]
              for name, by_base in critics.items() if bases[0] in by_base}
    import transformers
    meta = dict(command="python -m dqo.experiments.replicate" + (" --quick" if args.quick else ""),
                torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(),
                device=f"CPU, {torch.get_num_threads()} threads",
                date=time.strftime("%Y-%m-%d"), minutes=(time.time() - t0) / 60,
                resumed=resumed, seeds=seeds,
                params_m=per_base[bases[0]]["params_m"],
                bases=bases, pipe=asdict(pipe), budget=asdict(budget))
    data_stats = {b: v["stats"] for b, v in per_base.items()}
    chosen = {b: v["chosen"] for b, v in per_base.items()}
    (out / "replication.json").write_text(json.dumps(
        dict(meta=meta, data=data_stats, chosen=chosen, summary=summary,
             critics=critic_summary, best_of=best_of, sweep=sweep, runs=runs, values=points),
        indent=1))
    write_report(out, summary, critic_summary, best_of, meta, data_stats, sweep, chosen)
    plot(out, summary, points)
    print((out / "replication.md").read_text())


if __name__ == "__main__":
    main()

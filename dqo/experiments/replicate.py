"""A reproducible mini-replication of the paper's comparisons (Tables 3-7, Figure 2) on the
synthetic arithmetic task, on a CPU.

    python -m dqo.experiments.replicate                 # 3 bases x 2 seeds, about an hour
    python -m dqo.experiments.replicate --quick         # toy sizes, seconds (CI smoke)

A tiny base policy is warmed up with SFT until it is right sometimes. An offline dataset is
sampled from it (8 responses a prompt, verified), plus two process-score variants of it: Monte-
Carlo (paper 4.4: completions sampled from every prefix of a failed response) and the task's
exact step labels. Every method then trains from the same base weights on the same samples
(SFT on the problems' canonical solutions).

Tuning, as the paper's appendix A does for every baseline: each of SFT, RS, DPO, KTO, DRO and
DQO gets the same budget of configurations (lr x beta where a method has a beta, lr x steps
for SFT and RS), each trained once and scored by greedy accuracy on a validation split that is
disjoint from the test problems; the best goes on to the test problems with every training
seed. DQO's ablations and process-score variants use DQO's chosen configuration.

All of that is repeated for several bases (``--bases``: SFT warm-ups from different seeds,
each with its own offline data). Every accuracy comes with a 95% interval from a bootstrap
over the test problems, and every method is compared with DQO paired on the same problems,
bases and seeds (the paired bootstrap's interval of the difference).

Outputs in ``--out``: ``replication.md`` (tables), ``replication.json`` (every run, with its
per-problem results), ``replication.png`` (accuracy with intervals, and learned V(s) against
true step correctness).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .. import algos
from ..configs import TrainConfig
from ..data import Example, split_steps, step_end_tokens, tokenize_rows
from ..decoding import encode_prompt
from ..generation import PROCESS_REWARD_TOTAL, exact_process_scores, generate, mc_process_scores
from ..loop import train
from ..modeling import ValueModel
from ..pipeline import DefaultPipeline, Evaluator, Splits, sample_offline, warm_up_base
from ..reference_logps import compute_ref_logps
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


@dataclass
class Budget:
    max_steps: int = 64
    batch_size: int = 64
    value_lr: float = 1e-3
    eval_samples: int = 4
    mc_samples: int = 4  # completions per prefix for the Monte-Carlo process scores
    process_reward_total: float = PROCESS_REWARD_TOTAL  # the most a failed response earns
    # the sweep: the same number of configurations for every tuned method
    lrs: Tuple[float, ...] = (1e-5, 3e-5)
    betas: Tuple[float, ...] = (0.03, 0.1)  # methods with a KL coefficient
    steps: Tuple[int, ...] = (32, 64)  # SFT and RS: lr x steps
    bootstrap: int = 2000  # resamples of the test problems for the 95% intervals


BETA_ALGOS = ("dqo", "dro", "dpo", "kto")


def grid(algo: str, budget: Budget) -> List[Dict]:
    """The configurations a tuned method is swept over: the same number for every method."""
    name, values = (("beta", budget.betas) if algo in BETA_ALGOS
                    else ("max_steps", budget.steps))
    return [{"lr": lr, name: v} for lr in budget.lrs for v in values]


def quick() -> (DefaultPipeline, Budget):
    return (DefaultPipeline(n_sft=512, n_offline=16, n_test=16, n_dev=16, n_val=8,
                            samples_per_prompt=8, sft_max_steps=150, hidden_size=64, layers=2),
            Budget(max_steps=2, batch_size=4, eval_samples=1, mc_samples=2, lrs=(2e-5,),
                   betas=(0.1,), steps=(2,), bootstrap=200))


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


def value_vs_correctness(value: ValueModel, tok, policy, problems, pipe, n: int = 4):
    """V(s) of the states after each step of held-out responses sampled from the base policy,
    with the exact correctness of the prefix that leads there (the paper's Figure 2)."""
    samples = generate(policy, tok, [p.prompt for p in problems], n=n, decoding=pipe.decoding)
    return [row for prob, ss in zip(problems, samples) for s in ss
            for row in step_values(value, tok, prob, s.text, s.ids)]


def step_values(value, tok, problem, text: str, response_ids) -> List[Dict]:
    """One row per non-blank step of a response: its 1-based index among the steps, its exact
    label, and V of the state after its last token."""
    prompt_ids = encode_prompt(tok, problem.prompt)
    steps = split_steps(text)
    labels = arithmetic.step_labels(problem, text)
    ends = step_end_tokens(tok, steps, response_ids)
    ids = torch.tensor([prompt_ids + list(response_ids)])
    with torch.no_grad():
        v = value(ids, torch.ones_like(ids))[0]
    out, k = [], 0
    for step, ok, end in zip(steps, labels, ends):
        pos = len(prompt_ids) + end + 1  # V(s_t) sits at t: the state after token t - 1
        if step.strip() and pos < ids.shape[1]:
            k += 1
            out.append(dict(step=k, correct=bool(ok), value=float(v[pos])))
    return out


def bootstrap_ci(items: List[float], n: int, seed: int = 0) -> Tuple[float, float]:
    """95% percentile interval of the mean of ``items`` (one value per test problem), from
    ``n`` resamples of the problems."""
    x = torch.tensor(items, dtype=torch.float64)
    idx = torch.randint(len(x), (n, len(x)), generator=torch.Generator().manual_seed(seed))
    lo, hi = torch.quantile(x[idx].mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return lo.item(), hi.item()


def per_problem(runs: List[Dict], key: str) -> List[float]:
    """Each test problem's score averaged over ``runs`` (bases x seeds)."""
    return [statistics.mean(col) for col in zip(*(r[key + "_items"] for r in runs))]


def compare(runs: List[Dict], name: str, ref: str, key: str, n: int,
            base: Optional[int] = None) -> Dict:
    """``name``'s accuracy with its interval and its difference from ``ref``'s, paired on the
    same problems, bases and seeds, with the paired bootstrap's interval."""
    def sel(m):
        return {(r["base"], r["seed"]): r for r in runs if r["method"] == m
                and f"{key}_items" in r and (base is None or r["base"] == base)}
    mine, theirs = sel(name), sel(ref)
    if not mine:
        return {}
    own = per_problem(list(mine.values()), key)
    out = dict(acc=statistics.mean(own), ci=bootstrap_ci(own, n))
    both = sorted(set(mine) & set(theirs))
    if name != ref and both:
        diff = [a - b for a, b in zip(per_problem([mine[k] for k in both], key),
                                      per_problem([theirs[k] for k in both], key))]
        out.update(diff=statistics.mean(diff), diff_ci=bootstrap_ci(diff, n))
    return out


def summarize(runs: List[Dict], methods: List[Method], bases: List[int], n: int,
              ref: str = "DQO") -> List[Dict]:
    rows = []
    for name in ["Base (SFT warm-up)"] + [m.name for m in methods]:
        row = {"method": name, "n": sum(r["method"] == name and "greedy" in r for r in runs),
               "skipped": sorted({r["skipped"] for r in runs
                                  if r["method"] == name and "skipped" in r})}
        for key in ("greedy", "sampled"):
            row[key] = compare(runs, name, ref, key, n)
            row[key + "_by_base"] = {b: compare(runs, name, ref, key, n, base=b) for b in bases}
        rows.append(row)
    return rows


def _pct(c: Dict, which: str = "acc") -> str:
    if which == "acc":
        return f"{100 * c['acc']:.1f} [{100 * c['ci'][0]:.1f}, {100 * c['ci'][1]:.1f}]"
    if "diff" not in c:
        return "–"
    return f"{100 * c['diff']:+.1f} [{100 * c['diff_ci'][0]:+.1f}, {100 * c['diff_ci'][1]:+.1f}]"


def auc(pos: List[float], neg: List[float]) -> float:
    """P(V of a correct prefix > V of an incorrect one): how well V ranks step correctness."""
    if not pos or not neg:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def _config(c: Dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in c.items())


def write_report(out: Path, summary, values, meta, data_stats, sweep) -> None:
    correct = ", ".join(f"{100 * d['outcome']['correct']:.1f}%" for d in data_stats.values())
    bases, budget, pipe = meta["bases"], meta["budget"], meta["pipe"]
    lines = [
        "# Mini-replication on the synthetic arithmetic task", "",
        f"Command: `{meta['command']}`  ",
        f"Versions: torch {meta['torch']}, transformers {meta['transformers']}, "
        f"python {meta['python']}; {meta['device']}; {meta['date']}; {meta['minutes']:.1f} min",
        "",
        f"Bases: {len(bases)} {meta['params_m']:.2f}M-parameter transformers, SFT warm-ups on "
        f"{pipe['n_sft']} problems from seeds {bases}. Offline data of each: "
        f"{pipe['n_offline']} prompts x {pipe['samples_per_prompt']} samples ({correct} "
        f"correct). Every method: {budget['max_steps']} steps of {budget['batch_size']} "
        f"(SFT and RS: the swept number of steps). Tuned methods swept over "
        f"lr {list(budget['lrs'])} x (beta {list(budget['betas'])} or steps "
        f"{list(budget['steps'])}) on {pipe['n_val']} validation problems, per base; the best "
        f"by greedy accuracy is reported on the {pipe['n_test']} test problems over "
        f"{len(meta['seeds'])} training seeds. Ablations and process-score variants use DQO's "
        f"configuration. Brackets: 95% intervals, bootstrap over the test problems "
        f"({budget['bootstrap']} resamples); \"minus DQO\" is paired on the same problems, bases "
        f"and seeds.",
        "",
        "| method | greedy % | minus DQO | sampled % | minus DQO |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in summary:
        if not r["n"]:
            why = "; ".join(r["skipped"]) or "not run"
            lines.append(f"| {r['method']} | skipped: {why} | | | |")
            continue
        g, sm = r["greedy"], r["sampled"]
        lines.append(f"| {r['method']} | {_pct(g)} | {_pct(g, 'diff')} | {_pct(sm)} | "
                     f"{_pct(sm, 'diff')} |")
    lines += ["", "Greedy accuracy on each base (mean over training seeds), and minus DQO's on "
              "that base:", "",
              "| method | " + " | ".join(f"base {b}" for b in bases) + " |",
              "|---|" + "---:|" * len(bases)]
    for r in summary:
        cells = []
        for b in bases:
            c = r["greedy_by_base"].get(b) or {}
            cells.append(f"{100 * c['acc']:.1f} ({_pct(c, 'diff')})" if c else
                         "skipped: " + ("; ".join(r["skipped"]) or "not run"))
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    lines += ["", "The sweep: greedy accuracy on the validation problems of every configuration "
              "(one training seed), the chosen one in bold:", "",
              "| method | configuration | " + " | ".join(f"base {b}" for b in bases) + " |",
              "|---|---|" + "---:|" * len(bases)]
    for name in dict.fromkeys(x["method"] for x in sweep):
        for cfg in [dict(c) for c in dict.fromkeys(
                tuple(x["config"].items()) for x in sweep if x["method"] == name)]:
            cells = []
            for b in bases:
                hit = [x for x in sweep if x["method"] == name and x["base"] == b
                       and x["config"] == cfg]
                if not hit:
                    cells.append("")
                    continue
                text = (f"{100 * hit[0]['greedy']:.1f}" if "greedy" in hit[0]
                        else f"skipped: {hit[0]['skipped']}")
                cells.append(f"**{text}**" if hit[0].get("chosen") else text)
            lines.append(f"| {name} | {_config(cfg)} | " + " | ".join(cells) + " |")
    lines += ["", "Learned V(s) after each step of held-out responses vs the exact correctness "
              "of the prefix (base 0, seed 0; AUC = P(V correct prefix > V incorrect prefix)):",
              "",
              "| value model | mean V, correct prefix | mean V, incorrect prefix | AUC |",
              "|---|---:|---:|---:|"]
    for name, pts in values.items():
        pos = [p["value"] for p in pts if p["correct"]]
        neg = [p["value"] for p in pts if not p["correct"]]
        mean = lambda x: statistics.mean(x) if x else float("nan")  # noqa: E731
        lines.append(f"| {name} | {mean(pos):.3f} | {mean(neg):.3f} | {auc(pos, neg):.3f} |")
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
    ax1.set_title("Each method minus DQO, paired on problems, bases, seeds (95% intervals)")
    data, labels = [], []
    for name, pts in values.items():
        for ok in (True, False):
            data.append([p["value"] for p in pts if p["correct"] == ok] or [float("nan")])
            short = name.replace("DQO + process scores", "DQO + PS").replace(" labels", "")
            labels.append(f"{short}\n{'correct' if ok else 'incorrect'}\nprefix")
    ax2.boxplot(data, showfliers=False)
    ax2.set_xticks(range(1, len(labels) + 1))
    ax2.set_xticklabels(labels, fontsize=7)
    ax2.set_ylabel("learned V(s) after the step")
    ax2.set_title("Value of states vs true step correctness")
    fig.tight_layout()
    fig.savefig(out / "replication.png", dpi=110)
    plt.close(fig)


VALUE_METHODS = ("DQO", "DQO + process scores (exact labels)")  # the Figure-2 analysis


def run_method(m: Method, b: int, seed: int, config: Dict, tok, base, datasets,
               budget: Budget, work: Path, evaluate, samples: Optional[int] = None
               ) -> Tuple[Dict, Optional[ValueModel]]:
    """Train one method with ``config`` from a copy of ``base`` and evaluate it: the row of
    the results (with per-problem scores), and the trained value model (None for methods
    without one) for the Figure-2 analysis."""
    torch.manual_seed(seed)
    policy = copy.deepcopy(base)
    value = ValueModel.from_policy(policy) if algos.REGISTRY[m.algo].needs_value else None
    settings = dict(dict(max_steps=budget.max_steps), **config, **m.overrides)
    targs = TrainConfig(algo=m.algo, out=str(work / "runs" / f"{m.algo}-{seed}"),
                      value_lr=budget.value_lr, batch_size=budget.batch_size,
                      micro_batch=budget.batch_size, engine="torch", progress=False,
                      seed=seed, **settings)
    row = dict(method=m.name, base=b, seed=seed, config=config)
    n_items = len(algos.make(m.algo).items(datasets[m.data]))
    if n_items < budget.batch_size:  # e.g. RS/DPO when no sample is correct
        log.warning("base %d seed %d %s: skipped, %d training items < one batch", b, seed,
                    m.name, n_items)
        return dict(row, skipped=f"{n_items} training items < one batch"), None
    t = time.time()
    train(targs, tok, policy, value, datasets[m.data])
    res = evaluate(policy, samples=samples, per_problem=True)
    log.info("base %d seed %d %-38s %-22s greedy %.3f%s", b, seed, m.name, _config(config),
             res["greedy"], f" sampled {res['sampled']:.3f}" if "sampled" in res else "")
    return dict(row, train_s=time.time() - t, **res), value


def sweep_base(methods: List[Method], b: int, tok, base, datasets, budget: Budget, work: Path,
               validate) -> Tuple[Dict[str, Dict], List[Dict]]:
    """Each tuned method's configurations on the validation split (seed 0, greedy): the
    chosen configuration of every method on this base, and the sweep's rows."""
    chosen, rows = {}, []
    for m in (m for m in methods if m.tuned):
        tried = [run_method(m, b, 0, cfg, tok, base, datasets, budget, work, validate,
                            samples=0)[0] for cfg in grid(m.algo, budget)]
        scored = [r for r in tried if "greedy" in r]
        best = max(scored, key=lambda r: r["greedy"]) if scored else tried[0]
        best["chosen"] = True
        chosen[m.name] = best["config"]
        rows += [{k: v for k, v in r.items() if not k.endswith("_items")} for r in tried]
    for m in methods:  # the rest ride on DQO's choice
        chosen.setdefault(m.name, chosen.get("DQO", grid("dqo", budget)[0]))
    return chosen, rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes: a smoke test")
    p.add_argument("--bases", type=int, default=None,
                   help="SFT-warmed base models, each with its own data; default 3 (1 with "
                        "--quick)")
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds per base; default 2 (1 with --quick)")
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--methods", default=None, help="comma-separated subset of method names")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()

    t0 = time.time()
    pipe, budget = quick() if args.quick else (replication_pipeline(), Budget())
    bases = list(range(args.bases or (1 if args.quick else 3)))
    seeds = list(range(args.seeds or (1 if args.quick else 2)))
    methods = METHODS if not args.methods else [
        m for m in METHODS if m.name in args.methods.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    splits = Splits(pipe, seed=0)  # one split: every base is tested on the same problems
    runs: List[Dict] = []
    sweep: List[Dict] = []
    values: Dict[str, List[Dict]] = {}
    data_stats: Dict[int, Dict] = {}
    for b in bases:
        work = out / "work" / f"base-{b}"
        tok, base = warm_up_base(pipe, splits, work, seed=b, progress=False)
        base.eval()
        datasets, data_stats[b] = build_datasets(tok, base, pipe, splits, budget, work)
        validate = Evaluator(tok, splits.val, pipe.decoding, samples=0)
        evaluate = Evaluator(tok, splits.test, pipe.decoding, samples=budget.eval_samples)
        chosen, rows = sweep_base(methods, b, tok, base, datasets, budget, work, validate)
        sweep += rows
        for seed in seeds:
            torch.manual_seed(seed)
            runs.append(dict(method="Base (SFT warm-up)", base=b, seed=seed,
                             **evaluate(base, per_problem=True)))
            for m in methods:
                row, value = run_method(m, b, seed, chosen[m.name], tok, base, datasets, budget,
                                        work, evaluate)
                runs.append(row)
                if b == 0 and seed == 0 and m.name in VALUE_METHODS:
                    values[m.name] = value_vs_correctness(value, tok, base, splits.test, pipe)
    summary = summarize(runs, methods, bases, budget.bootstrap)
    import transformers
    meta = dict(command="python -m dqo.experiments.replicate" + (" --quick" if args.quick else ""),
                torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(),
                device=f"CPU, {torch.get_num_threads()} threads",
                date=time.strftime("%Y-%m-%d"), minutes=(time.time() - t0) / 60, seeds=seeds,
                params_m=sum(x.numel() for x in base.parameters()) / 1e6,
                bases=bases, pipe=asdict(pipe), budget=asdict(budget))
    (out / "replication.json").write_text(json.dumps(
        dict(meta=meta, data=data_stats, summary=summary, sweep=sweep, runs=runs,
             values=values), indent=1))
    write_report(out, summary, values, meta, data_stats, sweep)
    plot(out, summary, values)
    print((out / "replication.md").read_text())


if __name__ == "__main__":
    main()

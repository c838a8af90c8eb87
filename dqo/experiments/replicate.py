"""A reproducible mini-replication of the paper's comparisons (Tables 3-7, Figure 2) on the
synthetic arithmetic task, on a CPU.

    python -m dqo.experiments.replicate                 # 3 bases x 2 seeds, about 25 min
    python -m dqo.experiments.replicate --quick         # toy sizes, seconds (CI smoke)

A tiny base policy is warmed up with SFT until it is right sometimes. An offline dataset is
sampled from it (8 responses a prompt, verified), plus two process-score variants of it: Monte-
Carlo (paper 4.4: completions sampled from every prefix of a failed response) and the task's
exact step labels. Then every method below trains from the same base weights on the same
samples with the same budget (optimizer steps, batch size, learning rate). Each is evaluated
on held-out problems, greedy and sampled, over several seeds (data order and sampling).

All of that is repeated for several bases (``--bases``: SFT warm-ups from different seeds,
each with its own offline data): differences between methods that are smaller than the
base-to-base spread are not findings.

Outputs in ``--out``: ``replication.md`` (mean +- std table), ``replication.json`` (every run),
``replication.png`` (accuracy, and learned V(s) against true step correctness).
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
from ..data import Example, split_steps, step_end_tokens, tokenize_rows
from ..decoding import encode_prompt
from ..modeling import ValueModel
from ..pipeline import DefaultPipeline, Evaluator, Splits, sample_offline, warm_up_base
from ..reference_logps import compute_ref_logps
from ..sample import PROCESS_REWARD_TOTAL, exact_process_scores, generate, mc_process_scores
from ..tasks import arithmetic, get_verifier
from ..train import TrainArgs, train

log = logging.getLogger("dqo.replicate")


@dataclass
class Method:
    name: str
    algo: str
    data: str = "outcome"  # outcome | mc | exact | reference
    overrides: Dict = field(default_factory=dict)


METHODS = [
    Method("SFT", "sft", "reference"),
    Method("RS", "rs"),
    Method("DPO", "dpo"),
    Method("KTO", "kto"),
    Method("DRO", "dro"),
    Method("DQO", "dqo"),
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
    lr: float = 2e-5
    value_lr: float = 1e-3
    beta: float = 0.1
    eval_samples: int = 4
    mc_samples: int = 4  # completions per prefix for the Monte-Carlo process scores
    process_reward_total: float = PROCESS_REWARD_TOTAL  # the most a failed response earns


def quick() -> (DefaultPipeline, Budget):
    return (DefaultPipeline(n_sft=512, n_offline=16, n_test=16, n_dev=16, samples_per_prompt=8,
                            sft_max_steps=150, hidden_size=64, layers=2),
            Budget(max_steps=2, batch_size=4, eval_samples=1, mc_samples=2))


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


def summarize(runs: List[Dict], methods: List[Method]) -> List[Dict]:
    rows = []
    for m in [Method("Base (SFT warm-up)", "-")] + methods:
        rs = [r for r in runs if r["method"] == m.name and "skipped" not in r]
        row = {"method": m.name, "n": len(rs)}
        for k in ("greedy", "sampled"):
            vals = [r[k] for r in rs]
            row[k] = statistics.mean(vals) if vals else float("nan")
            row[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            # mean over seeds for each base: the spread a single-base study cannot see
            row[k + "_by_base"] = {b: statistics.mean(r[k] for r in rs if r["base"] == b)
                                   for b in sorted({r["base"] for r in rs})}
        rows.append(row)
    return rows


def paired_to(runs: List[Dict], ref: str = "DQO") -> List[Dict]:
    """Each method minus ``ref`` on the same base and training seed (greedy accuracy): the
    comparison the base-to-base spread does not blur. ``ahead``: in how many bases the method's
    mean over seeds is above ``ref``'s."""
    acc = {(r["method"], r["base"], r["seed"]): r["greedy"] for r in runs if "greedy" in r}
    out = []
    for name in dict.fromkeys(r["method"] for r in runs):
        pairs = [(b, acc[(name, b, s)] - acc[(ref, b, s)]) for (m, b, s) in acc
                 if m == name and (ref, b, s) in acc]
        if name == ref or not pairs:
            continue
        diffs = [d for _, d in pairs]
        by_base = {b: statistics.mean(d for bb, d in pairs if bb == b) for b, _ in pairs}
        out.append(dict(method=name, diff=statistics.mean(diffs),
                        diff_std=statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                        ahead=sum(d > 0 for d in by_base.values()), bases=len(by_base)))
    return out


def auc(pos: List[float], neg: List[float]) -> float:
    """P(V of a correct prefix > V of an incorrect one): how well V ranks step correctness."""
    if not pos or not neg:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def write_report(out: Path, summary, values, meta, data_stats, runs) -> None:
    correct = ", ".join(f"{100 * d['outcome']['correct']:.1f}%" for d in data_stats.values())
    lines = [
        "# Mini-replication on the synthetic arithmetic task", "",
        f"Command: `{meta['command']}`  ",
        f"Versions: torch {meta['torch']}, transformers {meta['transformers']}, "
        f"python {meta['python']}; {meta['device']}; {meta['date']}; {meta['minutes']:.1f} min",
        "",
        f"Bases: {len(meta['bases'])} {meta['params_m']:.2f}M-parameter transformers, SFT "
        f"warm-ups on {meta['pipe']['n_sft']} problems from seeds {meta['bases']}. Offline data "
        f"of each: {meta['pipe']['n_offline']} prompts x {meta['pipe']['samples_per_prompt']} "
        f"samples ({correct} correct). Every method: {meta['budget']['max_steps']} steps of "
        f"{meta['budget']['batch_size']}, lr {meta['budget']['lr']}, beta "
        f"{meta['budget']['beta']}. Accuracy on {meta['pipe']['n_test']} held-out problems, "
        f"mean +- std over {len(meta['bases'])} bases x {len(meta['seeds'])} training seeds.",
        "",
        "| method | greedy | sampled |",
        "|---|---:|---:|",
    ]
    for r in summary:
        if r["n"] == 0:
            lines.append(f"| {r['method']} | skipped: no training data | |")
            continue
        lines.append(f"| {r['method']} | {100 * r['greedy']:.1f} +- {100 * r['greedy_std']:.1f} "
                     f"| {100 * r['sampled']:.1f} +- {100 * r['sampled_std']:.1f} |")
    bases = meta["bases"]
    lines += ["", "Greedy accuracy of each base and what each method made of it (mean over "
              "training seeds):", "",
              "| method | " + " | ".join(f"base {b}" for b in bases) + " |",
              "|---|" + "---:|" * len(bases)]
    for r in summary:
        if r["n"]:
            lines.append(f"| {r['method']} | " + " | ".join(
                f"{100 * r['greedy_by_base'][b]:.1f}" if b in r["greedy_by_base"] else ""
                for b in bases) + " |")
    lines += ["", "Greedy accuracy minus DQO's on the same base and training seed (mean +- std "
              "over the pairs), and in how many bases the method is ahead of DQO:", "",
              "| method | minus DQO | ahead in |", "|---|---:|---:|"]
    for r in paired_to(runs):
        lines.append(f"| {r['method']} | {100 * r['diff']:+.1f} +- {100 * r['diff_std']:.1f} "
                     f"| {r['ahead']} of {r['bases']} |")
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
    names = [r["method"] for r in summary]
    x = range(len(names))
    for off, key, color in ((-0.2, "greedy", "tab:blue"), (0.2, "sampled", "tab:orange")):
        ax1.bar([i + off for i in x], [100 * r[key] for r in summary], 0.4,
                yerr=[100 * r[key + "_std"] for r in summary], label=key, color=color,
                capsize=2)
    ax1.set_xticks(list(x))
    ax1.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax1.set_ylabel("accuracy on held-out problems (%)")
    ax1.set_ylim(0, 1.2 * max(100 * r[k] for r in summary for k in ("greedy", "sampled")))
    ax1.legend(ncol=2, loc="upper center")  # above the bars: the ylim leaves room
    ax1.set_title("Accuracy (mean +- std over seeds)")
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


def run_method(m: Method, b: int, seed: int, tok, base, datasets, budget: Budget, work: Path,
               evaluate) -> Tuple[Dict, Optional[ValueModel]]:
    """Train one method from a copy of ``base`` and evaluate it: the row of the results, and
    the trained value model (None for methods without one) for the Figure-2 analysis."""
    torch.manual_seed(seed)
    policy = copy.deepcopy(base)
    value = ValueModel.from_policy(policy) if m.algo in algos.NEEDS_VALUE else None
    targs = TrainArgs(algo=m.algo, out=str(work / "runs" / f"{m.algo}-{seed}"),
                      lr=budget.lr, value_lr=budget.value_lr, beta=budget.beta,
                      batch_size=budget.batch_size, micro_batch=budget.batch_size,
                      max_steps=budget.max_steps, engine="torch", progress=False,
                      seed=seed, **m.overrides)
    n_items = len(algos.items(m.algo, datasets[m.data]))
    if n_items < budget.batch_size:  # e.g. RS/DPO when no sample is correct
        log.warning("base %d seed %d %s: skipped, %d training items < one batch", b, seed,
                    m.name, n_items)
        return dict(method=m.name, base=b, seed=seed, skipped=f"{n_items} training items"), None
    t = time.time()
    train(targs, tok, policy, value, datasets[m.data])
    res = evaluate(policy)
    log.info("base %d seed %d %-38s greedy %.3f sampled %.3f", b, seed, m.name,
             res["greedy"], res["sampled"])
    return dict(method=m.name, base=b, seed=seed, train_s=time.time() - t, **res), value


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
    pipe, budget = quick() if args.quick else (DefaultPipeline(), Budget())
    bases = list(range(args.bases or (1 if args.quick else 3)))
    seeds = list(range(args.seeds or (1 if args.quick else 2)))
    methods = METHODS if not args.methods else [
        m for m in METHODS if m.name in args.methods.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    splits = Splits(pipe, seed=0)  # one split: every base is tested on the same problems
    runs: List[Dict] = []
    values: Dict[str, List[Dict]] = {}
    data_stats: Dict[int, Dict] = {}
    for b in bases:
        work = out / "work" / f"base-{b}"
        tok, base = warm_up_base(pipe, splits, work, seed=b, progress=False)
        base.eval()
        datasets, data_stats[b] = build_datasets(tok, base, pipe, splits, budget, work)
        evaluate = Evaluator(tok, splits.test, pipe.decoding, samples=budget.eval_samples)
        for seed in seeds:
            torch.manual_seed(seed)
            runs.append(dict(method="Base (SFT warm-up)", base=b, seed=seed, **evaluate(base)))
            for m in methods:
                row, value = run_method(m, b, seed, tok, base, datasets, budget, work, evaluate)
                runs.append(row)
                if b == 0 and seed == 0 and m.name in VALUE_METHODS:
                    values[m.name] = value_vs_correctness(value, tok, base, splits.test, pipe)
    summary = summarize(runs, methods)
    import transformers
    meta = dict(command="python -m dqo.experiments.replicate" + (" --quick" if args.quick else ""),
                torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(),
                device=f"CPU, {torch.get_num_threads()} threads",
                date=time.strftime("%Y-%m-%d"), minutes=(time.time() - t0) / 60, seeds=seeds,
                params_m=sum(x.numel() for x in base.parameters()) / 1e6,
                bases=bases, pipe=asdict(pipe), budget=asdict(budget))
    (out / "replication.json").write_text(json.dumps(
        dict(meta=meta, data=data_stats, summary=summary, runs=runs, values=values), indent=1))
    write_report(out, summary, values, meta, data_stats, runs)
    plot(out, summary, values)
    print((out / "replication.md").read_text())


if __name__ == "__main__":
    main()

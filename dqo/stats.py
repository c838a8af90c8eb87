"""Intervals for the figures the evaluations report: a percentile bootstrap over problems (the
unit that was sampled), or over bases and problems (the replication), and the AUC of a score
against binary labels."""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

RESAMPLES = 2000


def bootstrap_ci(items: Sequence[float], n: int = RESAMPLES, seed: int = 0
                 ) -> Tuple[float, float]:
    """95% percentile interval of the mean of ``items`` (one value per problem), from ``n``
    resamples of the problems."""
    x = torch.tensor(list(items), dtype=torch.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    idx = torch.randint(len(x), (n, len(x)), generator=torch.Generator().manual_seed(seed))
    lo, hi = torch.quantile(x[idx].mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return lo.item(), hi.item()


def percentile_interval(vals: Sequence[float]) -> Tuple[float, float]:
    """The 2.5% and 97.5% quantiles of bootstrap statistics (NaNs dropped; NaN if none)."""
    vals = [v for v in vals if v == v]
    if not vals:
        return float("nan"), float("nan")
    lo, hi = torch.quantile(torch.tensor(vals, dtype=torch.float64),
                            torch.tensor([0.025, 0.975], dtype=torch.float64))
    return lo.item(), hi.item()


def auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(a positive's score > a negative's), ties counting one half (the Mann-Whitney U over
    the pairs); NaN without positives or negatives."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    scores = torch.tensor(list(pos) + list(neg), dtype=torch.float64)
    # mid-ranks: a tie shares the mean of the ranks it spans
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(scores, return_inverse=True)
    mean_rank = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=len(uniq)).double()
    r_pos = mean_rank[inverse[:len(pos)]].sum().item()
    return (r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def cluster_bootstrap_ci(groups: Sequence, statistic: Callable[[List], float],
                         n: int = RESAMPLES, seed: int = 0) -> Tuple[float, float]:
    """95% percentile interval of ``statistic(list of groups)`` over ``n`` resamples of the
    groups (problems) with replacement: for figures such as an AUC whose items (steps,
    responses) are not independent within a problem. Resamples where the statistic is NaN (no
    positives, say) are dropped."""
    if not groups:
        return float("nan"), float("nan")
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n):
        idx = torch.randint(len(groups), (len(groups),), generator=gen).tolist()
        vals.append(statistic([groups[i] for i in idx]))
    return percentile_interval(vals)


def two_level_ci(cells: torch.Tensor, n: int, seed: int = 0) -> Tuple[float, float]:
    """95% percentile interval of the mean of ``cells`` [bases, problems] over ``n`` resamples
    of the bases and, independently, of the problems (the same problems for every base drawn:
    each base saw the same test set)."""
    B, P = cells.shape
    g = torch.Generator().manual_seed(seed)
    ib = torch.randint(B, (n, B), generator=g)
    ip = torch.randint(P, (n, P), generator=g)
    stat = cells.double()[ib[:, :, None], ip[:, None, :]].mean((1, 2))
    lo, hi = torch.quantile(stat, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return lo.item(), hi.item()


def two_level_groups_ci(table: List[List[list]], statistic: Callable[[List], float], n: int,
                        seed: int = 0) -> Tuple[float, float]:
    """:func:`two_level_ci` for a statistic of records that is not a mean (an AUC):
    ``table[base][problem]`` holds that cell's records; each resample draws bases and problems
    and computes ``statistic`` on the drawn cells (NaN resamples dropped)."""
    B, P = len(table), len(table[0]) if table else 0
    if not B or not P:
        return float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n):
        ib = torch.randint(B, (B,), generator=g).tolist()
        ip = torch.randint(P, (P,), generator=g).tolist()
        vals.append(statistic([table[b][p] for b in ib for p in ip]))
    return percentile_interval(vals)

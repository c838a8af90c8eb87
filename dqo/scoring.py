"""The learned value as a step scorer: one response, step by step (the paper's Table 2).

A response's steps are its lines, as process rewards define them (:func:`dqo.data.split_steps`).
For step k, spanning the response tokens ``a..b``, with ``l_t = log pi(a_t|s_t) - log
pi_ref(a_t|s_t)``, ``r_t`` the token rewards and ``V`` the value model (docs/math.md §3)::

    V_before = V(s_a)          V_after = V(s_{b+1})   (0 after a finished response's last token)
    A_k = sum_{t=a..b} gamma^(t-a) (r_t - beta * l_t) + gamma^(b-a+1) V_after - V_before

``A_k`` is the step's soft advantage: what the Bellman residual of the KL-regularised return
credits to it. The critic's own reading of the step is its drop ``D_k = V'_after - V_before``,
where ``V'_after`` is ``V_after`` except after a finished response's last step: there it is V of
the state the stop token is chosen in, not the terminal 0. The step with the lowest ``D_k`` (the
value falls most) is marked as the likely first error: unlike ``A_k`` it does not depend on the
outcome reward (a wrong response's last step always loses its whole value when the reward
arrives) or on the KL, so a reranker or a process reward model can use it before any grading
(:mod:`dqo.process_metrics` measures it). Labels, where known: the synthetic task's exact step
correctness, and the outcome of the response.
"""
from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .data import split_steps, step_end_tokens
from .decoding import encode_prompt
from .modeling import policy_logprobs


@dataclass
class StepScore:
    index: int  # 1-based, among all lines
    text: str
    tokens: int
    value_before: float  # V(s_a)
    value_after: float  # V(s_{b+1}); 0 after a finished response's last token
    reward: float  # the step's token rewards (outcome on the last token, process rewards)
    kl: float  # beta * sum of the step's log-ratios
    advantage: float  # A_k
    label: Optional[bool] = None  # exact correctness where the task knows it
    likely_first_error: bool = False
    drop: float = 0.0  # D_k: the critic's reading, V'_after - V_before
    # each token of the step: (its text, V' after it, V' after it - V before it)
    token_values: List[Tuple[str, float, float]] = field(default_factory=list)


@torch.no_grad()
def score_response(policy, reference, value, tokenizer, prompt, response_ids: Sequence[int],
                   *, text: str, rewards: Optional[Sequence[float]] = None,
                   finished: bool = True, beta: float = 0.1, gamma: float = 1.0,
                   labels: Optional[Sequence[bool]] = None) -> List[StepScore]:
    """The per-step table of one response (see the module docstring). ``response_ids``: the
    response's tokens (its stop token included when ``finished``); ``text``: its text, whose
    lines are the steps; ``rewards``: one per response token (default: none). Without
    ``policy`` or ``reference`` the KL term is 0: the critic's own reading of the steps."""
    response_ids = list(response_ids)
    prompt_ids = encode_prompt(tokenizer, prompt)
    ids = torch.tensor([prompt_ids + response_ids])
    attn = torch.ones_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(prompt_ids):] = True
    if policy is None or reference is None:  # the critic alone: no KL term
        logp = ref = torch.zeros(len(response_ids), dtype=torch.float64)
    else:
        logp = policy_logprobs(policy, ids, attn, mask)[0, len(prompt_ids):].double()
        ref = policy_logprobs(reference, ids, attn, mask)[0, len(prompt_ids):].double()
    values, after = value(ids, attn, with_after=True)
    v = values[0, len(prompt_ids):].double()  # V(s_t) for each response token t
    v_next = after[0, len(prompt_ids):].double()  # V of the state after token t
    n = len(response_ids)
    read = v_next.clone()  # V'_after: the critic's reading, never the terminal 0
    if finished:
        read[n - 1] = v[n - 1]
        v_next[n - 1] = 0.0  # the episode ends with the stop token
    r = torch.zeros(n, dtype=torch.float64) if rewards is None else torch.tensor(
        list(rewards), dtype=torch.float64)
    if r.shape[0] != n:
        raise ValueError(f"rewards: expected one per response token ({n}), got {r.shape[0]}")
    steps = split_steps(text)
    body = response_ids[:-1] if finished else response_ids
    ends = step_end_tokens(tokenizer, steps, body) if body else [0] * len(steps)
    if finished and ends:
        # the stop token belongs to the last step with text (blank lines after it: no tokens)
        last = max((k for k, st in enumerate(steps) if st.strip()), default=len(steps) - 1)
        ends[last:] = [n - 1] * (len(steps) - last)
    out: List[StepScore] = []
    start = 0
    for k, (step, end) in enumerate(zip(steps, ends)):
        if end < start:  # an empty line inside a token: no token of its own
            out.append(StepScore(k + 1, step, 0, float(v[min(start, n - 1)]),
                                 float(v[min(start, n - 1)]), 0.0, 0.0, 0.0,
                                 None if labels is None else bool(labels[k])))
            continue
        span = torch.arange(start, end + 1)
        disc = gamma ** (span - start).double()
        kl = beta * float((disc * (logp[span] - ref[span])).sum())
        reward = float((disc * r[span]).sum())
        adv = reward - kl + gamma ** (end + 1 - start) * float(v_next[end]) - float(v[start])
        toks = [(tokenizer.decode([response_ids[t]], skip_special_tokens=True) or "\u220e",
                 float(read[t]), float(read[t] - v[t])) for t in range(start, end + 1)]
        out.append(StepScore(k + 1, step, end + 1 - start, float(v[start]),
                             float(v_next[end]), reward, kl, adv,
                             None if labels is None else bool(labels[k]),
                             drop=float(read[end]) - float(v[start]), token_values=toks))
        start = end + 1
    real = [s for s in out if s.tokens and s.text.strip()]
    if real:
        min(real, key=lambda s: s.drop).likely_first_error = True
    return out


def as_rows(scores: Sequence[StepScore]) -> List[Dict]:
    return [asdict(s) for s in scores]


def text_table(scores: Sequence[StepScore], width: int = 48) -> str:
    """The per-step table as plain text (what ``python -m dqo.score`` prints)."""
    lines = [f"{'step':>4}  {'V before':>8}  {'V after':>8}  {'reward':>7}  {'KL':>7}  "
             f"{'advantage':>9}  {'V drop':>7}  {'label':>5}  text"]
    for s in scores:
        label = "" if s.label is None else ("ok" if s.label else "wrong")
        mark = "  <- likely first error" if s.likely_first_error else ""
        text = s.text if len(s.text) <= width else s.text[:width - 3] + "..."
        lines.append(f"{s.index:>4}  {s.value_before:8.3f}  {s.value_after:8.3f}  "
                     f"{s.reward:7.3f}  {s.kl:7.3f}  {s.advantage:9.3f}  {s.drop:7.3f}  "
                     f"{label:>5}  {text!r}{mark}")
    return "\n".join(lines)


def html_page(responses: Sequence[Dict], tokens: bool = False) -> str:
    """Each response with its steps coloured by advantage (red: negative, green: positive),
    V beside each step; ``responses``: dicts with ``prompt`` and ``steps``
    (:class:`StepScore` rows). With ``tokens``, each token of a step's text is coloured by the
    change of the critic's value across it instead (its V in the tooltip)."""
    def colour(a: float, scale: float) -> str:
        x = max(-1.0, min(1.0, a / scale)) if scale > 0 else 0.0
        return (f"rgba(214, 39, 40, {-x:.2f})" if x < 0 else f"rgba(44, 160, 44, {x:.2f})")

    parts = ["<!doctype html><meta charset='utf-8'><title>dqo.score</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             "table{border-collapse:collapse;width:100%;margin-bottom:2em}"
             "td,th{padding:.2em .5em;border-bottom:1px solid #ddd;text-align:right}"
             "td.text{text-align:left;font-family:monospace;white-space:pre-wrap;width:35%}"
             "pre{background:#f4f4f4;padding:.5em}</style>",
             "<h1>Steps scored by the learned value</h1>",
             "<p>Each step is coloured by its soft advantage A = reward &minus; &beta;&middot;KL "
             "+ V(after) &minus; V(before): red where it is negative (the step lost return: its "
             "value fell, or it paid KL), green where it is positive. "
             "&#9888; marks the likely first error: the step whose value falls most in the "
             "critic's own reading (V drop; after the last step, V of the state the stop token "
             "is chosen in, not the terminal 0), which does not know the outcome.</p>"]
    if tokens:
        parts.append("<p>Tokens: each coloured by the change of the critic's value across it "
                     "(hover for V after it); &#8629; is a newline, &#8718; the stop token.</p>")
    for i, r in enumerate(responses):
        steps = r["steps"]
        scale = max([abs(s["advantage"]) for s in steps] + [1e-9])
        t_scale = max([abs(t[2]) for s in steps for t in s["token_values"]] + [1e-9])
        parts.append(f"<h2>Response {i + 1}</h2><pre>{html.escape(str(r['prompt']))}</pre>")
        parts.append("<table><tr><th>step</th><th style='text-align:left'>text</th>"
                     "<th>V before</th><th>V after</th><th>reward</th><th>&beta;&middot;KL</th>"
                     "<th>advantage</th><th>V drop</th><th>label</th></tr>")
        for s in steps:
            label = "" if s["label"] is None else ("ok" if s["label"] else "wrong")
            flag = " &#9888;" if s["likely_first_error"] else ""
            if tokens:
                text = "".join(
                    f"<span title='V {v:.3f} ({d:+.3f})' style='background:"
                    f"{colour(d, t_scale)}'>{html.escape(t.replace(chr(10), '↵'))}</span>"
                    for t, v, d in s["token_values"])
                cell = f"<td class='text'>{text}</td>"
            else:
                cell = (f"<td class='text' style='background:{colour(s['advantage'], scale)}'>"
                        f"{html.escape(s['text'])}</td>")
            parts.append(
                f"<tr><td>{s['index']}{flag}</td>{cell}<td>{s['value_before']:.3f}</td>"
                f"<td>{s['value_after']:.3f}</td><td>{s['reward']:.3f}</td>"
                f"<td>{s['kl']:.3f}</td><td>{s['advantage']:.3f}</td><td>{s['drop']:.3f}</td>"
                f"<td>{label}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"

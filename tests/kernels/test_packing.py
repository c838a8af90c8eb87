"""Packed sequences (several end to end in one row, boundaries in ``cu_seqlens``): every backend
of every op gives on the packed layout the values and gradients of the padded one, checked
against the float64 reference; no recurrence and no log-prob crosses a boundary."""
import math

import pytest
import torch
from batches import make_batch, stable_seed, to

from dqo_kernels import (
    action_logprobs,
    action_logprobs_from_logits,
    cu_seqlens_from_lengths,
    fused_dqo_loss,
    packed_response_mask,
    position_ids,
    response_mask,
)
from dqo_kernels.packing import pack, unpack
from dqo_kernels.validation import triton_available

BACKENDS = ["torch", "cpp"] + (["triton", "triton-bt16"] if triton_available() else [])
KEYS = ("logp", "ref_logp", "values", "rewards", "mask", "behavior_logp")
CONFIGS = [  # (lam, gamma, is_clip, target_grad, loss_agg)
    (1.0, 1.0, 1.0, False, "token-mean"),
    (0.95, 0.9, 2.0, True, "seq-mean-token-mean"),
    (0.5, 1.0, math.inf, False, "seq-mean-token-sum"),
]


def ragged(seed, lengths, pad=0, rows=1):
    """A padded float64 batch of ``len(lengths)`` sequences (row s: its first lengths[s]
    positions, then padding) and the same sequences packed end to end into ``rows`` rows, with
    ``pad`` positions of padding (one sequence with no action) at the end."""
    S, L = len(lengths), max(lengths)
    batch = make_batch("interleaved", B=S, T=L, seed=seed)
    for s, n in enumerate(lengths):
        batch["mask"][s, n:] = False
        batch["mask"][s, 0] = False  # a sequence's first token is never an action
    batch["rewards"] = batch["rewards"].masked_fill(~batch["mask"], 0.0)
    total = sum(lengths) + pad
    assert total % rows == 0
    packed = {}
    for k in KEYS:
        x = batch[k]
        parts = [x[s, :n] for s, n in enumerate(lengths)] + [x.new_zeros(pad)]
        packed[k] = torch.cat(parts).reshape(rows, total // rows)
    g = torch.Generator().manual_seed(seed)
    packed["bootstrap"] = torch.cat([batch["bootstrap"], torch.randn(1, generator=g,
                                                                      dtype=torch.float64)])
    cu = cu_seqlens_from_lengths(list(lengths) + [pad])
    return batch, packed, cu


def loss_of(batch, backend, cu=None, **kw):
    out = fused_dqo_loss(*(batch[k] for k in KEYS[:5]), behavior_logp=batch["behavior_logp"],
                         bootstrap=batch["bootstrap"], cu_seqlens=cu, backend=backend, beta=0.3,
                         **kw)
    grads = torch.autograd.grad(out.loss, [batch["logp"], batch["values"]])
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("lengths,pad,rows", [
    ((5, 1, 9, 3), 2, 2),  # a one-token sequence; padding at the end of the second row
    ((17, 33, 16, 1, 20), 0, 1),  # lengths around 16-token tiles (triton-bt16)
    ((2,), 0, 1),  # one sequence
])
def test_packed_matches_padded_float64(backend, cfg, lengths, pad, rows, monkeypatch):
    if backend == "triton-bt16":  # 16-token tiles: sequences cross block edges
        from dqo_kernels.dqo_loss import triton as dqo_loss_triton
        monkeypatch.setattr(dqo_loss_triton, "MAX_BLOCK_T", 16)
        backend = "triton"
    lam, gamma, is_clip, target_grad, loss_agg = cfg
    kw = dict(lam=lam, gamma=gamma, is_clip=is_clip, target_grad=target_grad, loss_agg=loss_agg)
    padded, packed, cu = ragged(stable_seed(lengths, cfg), lengths, pad, rows)
    exp, (e_gl, e_gv) = loss_of(to(padded, torch.float64), "torch", **kw)
    got, (g_gl, g_gv) = loss_of(to(packed, torch.float32), backend, cu=cu, **kw)
    tol = dict(rtol=2e-5, atol=2e-5)
    # the padded float64 result, packed: exactly what each sequence alone gives
    exp_cu = cu_seqlens_from_lengths(list(lengths) + [pad])
    shape = packed["logp"].shape

    def packed_of(x):
        return pack(torch.nn.functional.pad(x.detach(), (0, 0, 0, 1)), exp_cu, shape)

    for name, a, b in (("loss", got.loss, exp.loss), ("policy_loss", got.policy_loss,
                                                      exp.policy_loss),
                       ("value_loss", got.value_loss, exp.value_loss),
                       ("returns", got.returns, packed_of(exp.returns)),
                       ("weights", got.weights, packed_of(exp.weights)),
                       ("td_error", got.td_error, packed_of(exp.td_error)),
                       ("grad logp", g_gl, packed_of(e_gl)),
                       ("grad values", g_gv, packed_of(e_gv))):
        torch.testing.assert_close(a.detach().double(), b.detach(), **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for k, v in got.metrics.items():
        torch.testing.assert_close(v.double(), exp.metrics[k], **tol, equal_nan=True)


def test_no_recurrence_crosses_a_boundary():
    """Two sequences whose only reward is on the second: the first one's returns stay 0 (a
    chained scan would carry the second's reward back into the first)."""
    mask = torch.tensor([[False, True, True, False, True, True]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    zeros = torch.zeros(1, 6)
    cu = torch.tensor([0, 3, 6])
    for backend in BACKENDS[:2]:
        out = fused_dqo_loss(zeros.clone().requires_grad_(), zeros, zeros.clone(), rewards, mask,
                             cu_seqlens=cu, backend=backend)
        assert out.returns[0, :3].abs().max() == 0, backend
        assert out.returns[0, 4:].min() > 0, backend
        chained = fused_dqo_loss(zeros, zeros, zeros, rewards, mask, backend=backend)
        assert chained.returns[0, 1] > 0  # the same row unpacked does chain: the test can fail


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([0, 3, 5]), r"cu_seqlens\[-1\] = 6"),
    (torch.tensor([1, 3, 6]), r"cu_seqlens\[0\] = 0"),
    (torch.tensor([0, 4, 3, 6]), "non-decreasing"),
    (torch.tensor([0.0, 6.0]), "integer"),
    (torch.tensor([[0, 6]]), "1-D"),
])
def test_bad_cu_seqlens_are_refused(bad, match):
    x = torch.zeros(1, 6)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        fused_dqo_loss(x, x, x, x, mask, cu_seqlens=bad, backend="torch")


def test_packed_bootstrap_is_one_a_sequence():
    x = torch.zeros(1, 6)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"bootstrap: expected shape \(2,\)"):
        fused_dqo_loss(x, x, x, x, mask, bootstrap=torch.zeros(1), cu_seqlens=[0, 3, 6],
                       backend="torch")


def test_unpack_pack_round_trip_and_gradient():
    x = torch.arange(10.0, requires_grad=True)
    cu = torch.tensor([0, 4, 4, 5, 10])  # an empty sequence too
    rows = unpack(x, cu, fill=-1)
    assert rows.tolist() == [[0, 1, 2, 3, -1], [-1] * 5, [4, -1, -1, -1, -1],
                             [5, 6, 7, 8, 9]]
    assert torch.equal(pack(rows, cu, (10,)), x.detach())
    (g,) = torch.autograd.grad((rows * rows).sum(), x)
    assert torch.equal(g, 2 * x.detach())
    assert position_ids(cu).tolist() == [[0, 1, 2, 3, 0, 0, 1, 2, 3, 4]]


@pytest.mark.parametrize("seed", [0, 1])
def test_action_logprobs_on_packed_rows_match_each_sequence_alone(seed):
    g = torch.Generator().manual_seed(seed)
    V, D = 29, 6
    lengths, prompts = [4, 1, 7, 3], [2, 1, 3, 3]  # one sequence with no action
    cu = cu_seqlens_from_lengths(lengths)
    N = sum(lengths)
    ids = torch.randint(0, V, (1, N), generator=g)
    hidden = torch.randn(1, N, D, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(V, D, dtype=torch.float64, generator=g)
    mask = packed_response_mask(cu, torch.tensor(prompts))
    got = action_logprobs(hidden, weight, ids, mask, cu_seqlens=cu)
    logits = hidden @ weight.T
    got_l = action_logprobs_from_logits(logits, ids, mask, cu_seqlens=cu)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one_mask = response_mask(torch.ones(1, b - a), torch.tensor([prompts[s]]))
        assert torch.equal(one_mask, mask[:, a:b])
        alone = action_logprobs(hidden[:, a:b], weight, ids[:, a:b], one_mask)
        torch.testing.assert_close(got[:, a:b], alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_l[:, a:b], alone, rtol=1e-12, atol=1e-12)
    assert (got[~mask] == 0).all() and (got[mask] < 0).all()


def test_an_action_at_a_sequence_start_is_refused():
    cu = torch.tensor([0, 3, 5])
    mask = torch.tensor([[False, True, True, True, False]])  # position 3 starts sequence 1
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="first position of packed sequence 1"):
        action_logprobs(torch.zeros(1, 5, 4), torch.zeros(7, 4), ids, mask, cu_seqlens=cu)
    with pytest.raises(ValueError, match="first position of packed sequence 1"):
        action_logprobs_from_logits(torch.zeros(1, 5, 7), ids, mask, cu_seqlens=cu)


def test_a_causal_lm_keeps_packed_sequences_apart():
    """transformers' sdpa attention builds the block-diagonal mask from restarting
    position_ids (no attention mask, and no KV cache: ``use_cache=False``, else the packed
    format is not looked for): the packed forward equals each sequence's own, which is what a
    packed training row relies on (on GPU flash-attn's varlen path does the same)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")).eval()
    lengths = [5, 3, 6]
    cu = cu_seqlens_from_lengths(lengths)
    ids = torch.randint(0, 50, (1, sum(lengths)))
    with torch.no_grad():
        packed = model.model(input_ids=ids, position_ids=position_ids(cu),
                             use_cache=False).last_hidden_state
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = model.model(input_ids=ids[:, a:b]).last_hidden_state
            torch.testing.assert_close(packed[:, a:b], alone, rtol=1e-5, atol=1e-5)

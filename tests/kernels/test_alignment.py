"""The alignment helpers: a causal LM's batch -> [B, T] action-aligned log-probs, with the head
on the action rows only (never on prompt or padding positions) and no copy of the logits."""
import pytest
import torch

import dqo_kernels.alignment as A
from dqo_kernels import action_logprobs, action_logprobs_from_logits, response_mask


def reference(logits: torch.Tensor, input_ids, mask, temperature=1.0):
    """float64 log-softmax of the output at t - 1, read at token t, on action positions."""
    lp = torch.log_softmax(logits.double() / temperature, -1)
    out = torch.zeros(mask.shape, dtype=torch.float64)
    out[:, 1:] = lp[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    return out * mask


def batches(seed):
    g = torch.Generator().manual_seed(seed)
    V = 37
    for B, T, layout in ((3, 9, "right"), (3, 9, "left"), (2, 1, "right"), (4, 70, "holes"),
                         (2, 6, "empty")):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        attn = torch.zeros(B, T, dtype=torch.long)
        for b, n in enumerate(lengths.tolist()):
            if layout == "left":
                attn[b, T - n:] = 1
            else:
                attn[b, :n] = 1
        prompts = torch.randint(0, 3, (B,), generator=g)
        mask = response_mask(attn, prompts)
        if layout == "holes":  # environment tokens inside responses: a non-contiguous mask
            mask &= torch.rand(B, T, generator=g) > 0.3
        if layout == "empty":
            mask[:] = False
        mask[0] = False if B > 1 else mask[0]  # an all-padding (no action) row
        yield torch.randint(0, V, (B, T), generator=g), mask, V


@pytest.mark.parametrize("seed", [0, 1])
def test_action_logprobs_match_the_float64_reference(seed):
    for ids, mask, V in batches(seed):
        B, T = ids.shape
        D = 8
        hidden = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
        up = torch.randn(B, T, dtype=torch.float64)
        got = action_logprobs(hidden, weight, ids, mask, temperature=0.7)
        exp = reference(hidden @ weight.T, ids, mask, temperature=0.7)
        torch.testing.assert_close(got.double(), exp, rtol=1e-10, atol=1e-12)
        g_got = torch.autograd.grad((got * up).sum(), (hidden, weight), allow_unused=True)
        h2, w2 = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        g_exp = torch.autograd.grad((reference(h2 @ w2.T, ids, mask, 0.7) * up).sum(), (h2, w2))
        for a, b in zip(g_got, g_exp):
            torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b, rtol=1e-10,
                                       atol=1e-12)
        logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
        got = action_logprobs_from_logits(logits, ids, mask)
        torch.testing.assert_close(got.double(), reference(logits, ids, mask), rtol=1e-10,
                                   atol=1e-12)
        (g,) = torch.autograd.grad((got * up).sum(), logits)
        l2 = logits.detach().requires_grad_()
        (e,) = torch.autograd.grad((reference(l2, ids, mask) * up).sum(), l2)
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_the_head_runs_on_action_rows_only_and_the_logits_are_not_copied(monkeypatch):
    ids, mask, V = next(batches(3))
    seen = {}
    real_linear, real_token = A.linear_logprobs, A.token_logprobs

    def linear_spy(h, w, targets, **kw):
        seen["head_rows"] = h.shape[0]
        return real_linear(h, w, targets, **kw)

    def token_spy(logits, targets, **kw):
        seen["logits_ptr"], seen["logits_shape"] = logits.data_ptr(), tuple(logits.shape)
        return real_token(logits, targets, **kw)

    monkeypatch.setattr(A, "linear_logprobs", linear_spy)
    monkeypatch.setattr(A, "token_logprobs", token_spy)
    B, T = ids.shape
    action_logprobs(torch.randn(B, T, 8), torch.randn(V, 8), ids, mask)
    assert seen["head_rows"] == int(mask[:, 1:].sum()) < B * (T - 1)
    logits = torch.randn(B, T, V)
    action_logprobs_from_logits(logits, ids, mask)
    assert seen["logits_ptr"] == logits.data_ptr() and seen["logits_shape"] == (B, T, V)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="mask: expected the shape of input_ids"):
        action_logprobs(torch.randn(2, 5, 4), torch.randn(9, 4), torch.zeros(2, 5, dtype=int),
                        torch.ones(2, 4, dtype=torch.bool))

"""dqo.sample's rows feed dqo.hf.DQOTrainer through one function, dqo.data.trainer_rows: read,
tokenized and given their reference log-probs, they batch (DQOCollator) to the same tensors as
the trainer's own loop (dqo.data.collate)."""
import pytest
import torch

from dqo import data as D
from dqo.decoding import DecodingConfig
from dqo.generation import generate, label_samples
from dqo.hf import DQOCollator
from dqo.reference_logps import ref_logps
from dqo.tasks import arithmetic, get_verifier


@pytest.mark.parametrize("padding", ["right", "left"])
def test_sampled_rows_feed_the_trainer_as_the_loop_sees_them(tok, policy, tmp_path, padding):
    probs = arithmetic.make_problems(3, 0)
    torch.manual_seed(1)
    samples = generate(policy, tok, [p.prompt for p in probs], n=2,
                       decoding=DecodingConfig(max_new_tokens=12))
    rows = label_samples([p.prompt for p in probs], [p.answer for p in probs], samples,
                         get_verifier("arithmetic"))
    rows[0]["reward"] = 1.0
    rows.append(dict(prompt="1+2=?", steps=["1+2=3", "#### 3"], step_rewards=[0.25, 0.0],
                     reward=1.0))  # a hand-written row: text only, no behaviour log-probs
    path = tmp_path / "data.jsonl"
    D.write_jsonl(path, rows)

    read, errors = D.read_jsonl(path, strict=True)
    examples, _ = D.tokenize_rows(read, tok, strict=True)
    assert not errors and any(not e.finished for e in examples)
    ref = ref_logps(policy, examples, tok.pad_token_id)
    assert all(e.ref_logp is None for e in examples)  # nothing attached to the examples
    dataset = D.trainer_rows(examples, ref)
    assert len(dataset) == len(rows)
    got = DQOCollator(tok.pad_token_id, padding=padding)(dataset)

    for e, lp in zip(examples, ref):
        e.ref_logp = lp
    want = D.collate(examples, tok.pad_token_id, padding=padding)
    for key in ("input_ids", "attention_mask", "action_mask", "rewards", "ref_logp",
                "behavior_logp"):
        torch.testing.assert_close(got[key], getattr(want, key), msg=key)
    assert got["finished"].tolist() == (~want.unfinished).tolist()
    assert D.trainer_rows(examples) == dataset  # the examples' own ref_logp, once attached


def test_trainer_rows_need_the_reference_log_probs(tok):
    ex = D.tokenize_row(D.check_row(dict(prompt="1+2=?", response="3", reward=1.0), "x:1"), tok)
    with pytest.raises(ValueError, match="x:1: needs the reference log-prob of each of its 2"):
        D.trainer_rows([ex])
    with pytest.raises(ValueError, match="1 lists for 2 examples"):
        D.trainer_rows([ex, ex], [[0.0, 0.0]])

"""What a real model's data brings and the toy never did (issue 10): responses cut at the length
limit, stop tokens other than EOS, a checkpoint's own generation settings, BOS, rows over
max_length, and evaluation that grades cut responses wrong."""
import pytest
import torch
from tokenizers import processors

from dqo import algos
from dqo import data as D
from dqo.configs import TrainConfig
from dqo.decoding import (
    DecodingConfig,
    adds_bos,
    encode_prompt,
    end_of_turn_ids,
    sidecar,
    stop_token_ids,
)
from dqo.evaluation import accuracy
from dqo.generation import generate, label_samples
from dqo.loop import train
from dqo.modeling import ValueModel, build_policy, tiny_config
from dqo.reference_logps import compute_ref_logps
from dqo.tasks import arithmetic
from dqo.tokenizer import char_tokenizer


def dec(n, **kw):
    return DecodingConfig(max_new_tokens=n, **kw)


def always_right(texts, refs):
    return [True] * len(texts)


def greedy_by_hand(model, ids, steps, eos):
    """Greedy decoding with nothing but argmax: what generate must reproduce."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(t)
            out.append(t)
            if t == eos:
                break
    return out


# ---- sampling ---------------------------------------------------------------------------------


def test_cut_responses_are_unfinished_graded_wrong_and_get_no_eos(tok, policy):
    probs = arithmetic.make_problems(6, 1)
    prompts = [p.prompt for p in probs]
    torch.manual_seed(0)
    samples = generate(policy, tok, prompts, n=2, decoding=dec(4))
    rows = label_samples(prompts, [p.answer for p in probs], samples, always_right)
    cut = [r for r in rows if not r["finished"]]
    assert cut, "a random model writes 4 tokens without EOS"
    for r in rows:
        ends = r["response_ids"][-1] == tok.eos_token_id
        assert r["finished"] == ends
        assert len(r["response_ids"]) == len(r["behavior_logp"]) <= 4
        assert r["reward"] == (1.0 if r["finished"] else 0.0)  # a cut text is never right
        if not r["finished"]:
            assert len(r["response_ids"]) == 4
    graded = label_samples(prompts, [p.answer for p in probs], samples, always_right,
                           grade_truncated=True)
    # graded as they stand, and so ended: no bootstrap on top of the grade
    assert all(r["reward"] == 1.0 and r["finished"] for r in graded)


def test_generation_stops_at_every_stop_id(tok, policy):
    prompt = arithmetic.make_problems(1, 2)[0].prompt
    (free,), = generate(policy, tok, [prompt], greedy=True, decoding=dec(10))
    assert len(free.ids) >= 3 and tok.eos_token_id not in free.ids[:3]
    stop = free.ids[2]  # a token the model emits: make it an end of turn
    (s,), = generate(policy, tok, [prompt], greedy=True,
                     decoding=dec(10, stop_ids=[tok.eos_token_id, stop]))
    i = free.ids.index(stop)
    assert s.ids == free.ids[:i + 1] and s.finished
    assert s.text == tok.decode(free.ids[:i], skip_special_tokens=True)


def test_a_checkpoints_generation_settings_do_not_leak_into_sampling(tok, policy):
    prompt = arithmetic.make_problems(1, 3)[0].prompt
    ids = encode_prompt(tok, prompt)
    manual = greedy_by_hand(policy, ids, 8, tok.eos_token_id)
    g = policy.generation_config
    g.repetition_penalty, g.no_repeat_ngram_size, g.suppress_tokens = 50.0, 1, [manual[0]]
    g.top_k, g.top_p, g.temperature = 1, 0.01, 0.01
    (s,), = generate(policy, tok, [prompt], greedy=True, decoding=dec(8))
    assert s.ids == manual
    assert policy.generation_config.repetition_penalty == 50.0  # the model's own is put back
    # and the recorded behaviour log-probs are the model's (temperature 1, no penalty)
    with torch.no_grad():
        logits = policy(torch.tensor([ids + manual])).logits[0, len(ids) - 1:-1]
    expect = torch.log_softmax(logits, -1).gather(-1, torch.tensor(manual)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(s.logp), expect, rtol=1e-4, atol=1e-4)


def test_stop_ids_are_eos_generation_config_and_end_of_turn():
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<eot>"]})
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}<eot>{% endfor %}"
                         "{% if add_generation_prompt %}A:{% endif %}")
    eot = tok.convert_tokens_to_ids("<eot>")
    assert end_of_turn_ids(tok) == [eot]
    model = build_policy(tiny_config(tok, hidden_size=16, layers=1, heads=1))
    model.generation_config.eos_token_id = [tok.eos_token_id, 7]
    assert stop_token_ids(tok, model) == [tok.eos_token_id, 7, eot]
    assert end_of_turn_ids(char_tokenizer()) == []  # no template
    cfg = dec(5).with_stop_ids(tok, model).generation_config(tok)
    assert cfg.eos_token_id == [tok.eos_token_id, 7, eot]


def test_bos_is_added_where_the_tokenizer_adds_it_once():
    tok = char_tokenizer()
    assert not adds_bos(tok)
    assert encode_prompt(tok, "1+2=?") == tok("1+2=?", add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)])
    assert adds_bos(tok)
    plain = tok("1+2=?", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, "1+2=?") == [bos] + plain
    ex = D.tokenize_row(D.check_row({"prompt": "1+2=?", "response": "3", "reward": 1}, "x"), tok)
    assert ex.prompt_ids == [bos] + plain  # training sees what sampling saw
    tok.chat_template = "<bos>{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert encode_prompt(tok, "1+2=?") == [bos] + plain  # the template's BOS, not a second


def test_decoding_config_round_trips_and_is_checked(tmp_path):
    d = dec(7, top_k=0, stop_ids=[2, 5])
    d.save(tmp_path / "d.json")
    assert DecodingConfig.load(tmp_path / "d.json") == d
    assert sidecar(tmp_path / "data.jsonl") == tmp_path / "data.decoding.json"
    for bad, msg in ((dict(top_p=0.0), "top_p"), (dict(temperature=0), "temperature"),
                     (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
                     (dict(stop_ids=[]), "stop_ids")):
        with pytest.raises(ValueError, match=msg):
            DecodingConfig(**bad)
    (tmp_path / "bad.json").write_text('{"top_p": 0.9, "beam": 4}')
    with pytest.raises(ValueError, match="bad.json: expected an object with fields"):
        DecodingConfig.load(tmp_path / "bad.json")


def test_min_p_is_a_decoding_option_on_record_and_applied(tok, policy, tmp_path):
    """The paper's third sampling setting ("threshold=0.01", a min-p cut): --min-p reaches
    generate (a cut at 0.99 of the top token leaves the top token: sampling is greedy) and is
    recorded with the data."""
    from dqo.cli import parse_config
    from dqo.configs import SAMPLE_SECTIONS, SampleConfig
    from dqo.errors import UsageError
    base = ["--model", "m", "--prompts", "p", "--out", "o"]
    cfg = parse_config(SampleConfig, SAMPLE_SECTIONS, base + ["--min-p", "0.01"], prog="s")
    d = cfg.decoding_config().with_stop_ids(tok, policy)
    assert d.min_p == 0.01 and d.generation_config(tok).min_p == 0.01
    d.save(tmp_path / "d.json")
    assert DecodingConfig.load(tmp_path / "d.json").min_p == 0.01
    assert d.generation_config(tok, greedy=True).min_p is None
    assert dec(4).min_p == 0 and dec(4).with_stop_ids(tok).generation_config(tok).min_p is None
    with pytest.raises(UsageError, match=r"--min-p: expected a value in \[0, 1\)"):
        parse_config(SampleConfig, SAMPLE_SECTIONS, base + ["--min-p", "1"], prog="s")
    with torch.no_grad():  # top logits apart by more than the random model's ~0.05
        policy.get_output_embeddings().weight.mul_(20)
    prompts = [p.prompt for p in arithmetic.make_problems(3, 5)]
    greedy = generate(policy, tok, prompts, decoding=dec(6).with_stop_ids(tok), greedy=True)

    def sampled(**kw):
        torch.manual_seed(0)
        return [s.ids for c in generate(policy, tok, prompts, n=2, decoding=dec(
            6, **kw).with_stop_ids(tok)) for s in c]
    assert sampled(min_p=0.99) == [g[0].ids for g in greedy for _ in range(2)]
    assert sampled() != sampled(min_p=0.99)  # without the cut, sampling is not greedy here


# ---- data -------------------------------------------------------------------------------------


def test_rows_say_whether_they_finished(tok):
    eos = tok.eos_token_id
    ids = tok("12", add_special_tokens=False)["input_ids"]
    cases = [  # (row fields, expected response ids, finished)
        (dict(response="12"), ids + [eos], True),  # text rows: finished, EOS made explicit
        (dict(response="12", finished=False), ids, False),
        (dict(response="12", response_ids=ids + [eos]), ids + [eos], True),
        (dict(response="12", response_ids=ids), ids, False),  # no stop token at the end
        (dict(response="12", response_ids=ids, finished=True), ids, True),  # a stop string
    ]
    for fields, expect_ids, finished in cases:
        ex = D.tokenize_row(D.check_row({"prompt": "Q", "reward": 1.0, **fields}, "x"), tok)
        assert ex.response_ids == expect_ids and ex.finished == finished, fields
        assert ex.rewards[-1] == 1.0 and sum(ex.rewards) == 1.0
    with pytest.raises(D.DataError, match="'finished' must be true or false"):
        D.check_row({"prompt": "Q", "reward": 1.0, "response": "1", "finished": 1}, "x")
    # a text row's behaviour log-probs must cover the end token it gets: nothing is made up
    with pytest.raises(D.DataError, match=r"has 2 entries but the response has 3 tokens \(with "
                                          r"the end token of a finished text row\)"):
        D.tokenize_row(D.check_row({"prompt": "Q", "reward": 0, "response": "12",
                                    "behavior_logp": [-1.0, -1.0]}, "x"), tok)


def test_rows_over_max_length_are_cut_to_fit_never_their_prompt(tok, caplog):
    p = "Q: 1+2=?\n"
    ids = tok("1+2=3\n#### 3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row = D.check_row({"prompt": p, "response": "1+2=3\n#### 3", "response_ids": ids,
                       "behavior_logp": [-0.5] * len(ids), "steps": ["1+2=3", "#### 3"],
                       "step_rewards": [0.2, 0.0], "reward": 1.0}, "f:1")
    n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
    ex = D.tokenize_row(row, tok, max_length=n_prompt + 6)
    assert ex.response_ids == ids[:6] and ex.behavior_logp == [-0.5] * 6
    assert not ex.finished and ex.cut_to_fit
    assert ex.rewards == [0.0, 0.0, 0.0, 0.0, 0.2, 0.0]  # step 1 kept; the outcome was beyond
    full = D.tokenize_row(row, tok, max_length=n_prompt + len(ids))
    assert full.finished and not full.cut_to_fit
    with pytest.raises(D.DataError, match=r"f:1: the prompt alone has \d+ tokens, "
                                          r"max_length=5 leaves no room"):
        D.tokenize_row(row, tok, max_length=5)
    exs, errors = D.tokenize_rows([row, row], tok, max_length=n_prompt + 6)
    assert len(exs) == 2 and not errors
    assert "2 of 2 responses cut to fit max_length" in caplog.text


def test_a_cut_response_is_never_a_correct_sample(tok):
    ids = tok("#### 3", add_special_tokens=False)["input_ids"]
    right = D.check_row({"prompt": "Q", "response": "#### 3", "reward": 1.0}, "x")
    cut_by_user = D.check_row({"prompt": "Q", "response": "#### 3", "reward": 1.0,
                               "response_ids": ids}, "x")  # no stop token: unfinished
    exs = [D.tokenize_row(right, tok), D.tokenize_row(cut_by_user, tok),
           D.tokenize_row(right, tok, max_length=len(encode_prompt(tok, "Q")) + 2)]
    assert [e.correct for e in exs] == [True, False, False]
    penalized, _ = D.apply_truncated_policy(exs, "penalize")
    assert [e.correct for e in penalized] == [True, False, False]  # terminal, still not right
    assert algos.make("rs").items(exs) == [exs[0]]
    wrong = D.tokenize_row(D.check_row({"prompt": "Q", "response": "#### 4", "reward": 0.0},
                                       "x"), tok)
    pairs = algos.make("dpo").items(exs + [wrong])
    assert {id(c) for c, _ in pairs} == {id(exs[0])}  # the cut ones are rejected samples
    assert {id(r) for _, r in pairs} == {id(exs[1]), id(exs[2]), id(wrong)}


def test_kto_pairs_warn_when_one_prompt_dominates(tok, caplog):
    rows = [{"prompt": p, "response": str(i), "reward": 0.0}
            for i, p in enumerate(["Q1", "Q1", "Q1", "Q2"])]
    exs = [D.tokenize_row(D.check_row(r, "x"), tok) for r in rows]
    pairs = algos.kto.mismatched(exs)
    same = sum(a.prompt == b.prompt for a, b in zip(exs, pairs))
    assert same > 0 and f"KTO: {same} of 4 reference-point pairs share their prompt" in caplog.text


def test_non_finite_outputs_on_an_engine_that_cannot_skip_is_an_error(tok, policy):
    class Blind:
        skips_non_finite = False

        def backward(self, loss):
            raise AssertionError("NaN gradients must never be applied")

    x = torch.full((2, 3), float("nan"), requires_grad=True)
    with pytest.raises(RuntimeError, match="the policy engine cannot skip a step"):
        algos.base.skip_with_nan_gradients({"policy": Blind()}, policy=x)


def test_truncated_policies(tok):
    rows = [{"prompt": "Q", "response": "1", "reward": 1.0},
            {"prompt": "Q", "response": "2", "reward": 0.0, "finished": False}]
    exs = [D.tokenize_row(D.check_row(r, "x"), tok) for r in rows]
    kept, counts = D.apply_truncated_policy(exs, "bootstrap")
    assert kept == exs and counts == dict(examples=2, unfinished=1, cut_to_fit=0)
    kept, _ = D.apply_truncated_policy(exs, "drop")
    assert kept == [exs[0]]
    kept, _ = D.apply_truncated_policy(exs, "penalize", reward=-1.0)
    assert kept[0] is exs[0] and kept[1].finished and kept[1].rewards == [-1.0]
    assert not exs[1].finished and exs[1].rewards == [0.0]  # the input is left as it was
    with pytest.raises(ValueError, match="truncated: expected one of"):
        D.apply_truncated_policy(exs, "ignore")


def test_baselines_label_by_outcome_not_by_summed_reward(tok):
    failed_with_steps = D.check_row({"prompt": "Q", "steps": ["1+1=2", "#### 3"],
                                     "step_rewards": [0.25, 0.0], "reward": 0.0}, "x")
    right = D.check_row({"prompt": "Q", "response": "#### 2", "reward": 1.0}, "x")
    exs = [D.tokenize_row(r, tok) for r in (failed_with_steps, right)]
    b = D.collate(exs, tok.pad_token_id)
    assert b.correct.tolist() == [False, True]  # KTO's desirable
    assert algos.make("rs").items(exs) == [exs[1]]
    assert algos.make("dpo").items(exs) == [(exs[1], exs[0])]


# ---- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["right", "left"])
def test_bootstrap_is_the_value_of_the_state_after_the_last_token(tok, policy, padding):
    value = ValueModel.from_policy(policy)
    torch.nn.init.normal_(value.head.weight)
    rows = [{"prompt": "Q: 1+2=?\n", "response": "1+2=", "reward": 0.0, "finished": False},
            {"prompt": "Q: 3+4=?\n", "response": "#### 7", "reward": 1.0},
            {"prompt": "Q: 12*3-4=?\n", "response": "12*3", "reward": 0.0, "finished": False}]
    exs = [D.tokenize_row(D.check_row(r, "x"), tok) for r in rows]
    b = D.collate(exs, tok.pad_token_id, padding=padding)
    with torch.no_grad():
        values, boot = algos.base.values_and_bootstrap({"value": value}, b)
        assert torch.equal(values, value(b.input_ids, b.attention_mask))
        for i, e in enumerate(exs):
            if e.finished:
                assert boot[i] == 0
                continue
            # V(s) of the state after the last token: the value read at one more position
            ids = torch.tensor([e.prompt_ids + e.response_ids + [tok.pad_token_id]])
            expect = value(ids, torch.ones_like(ids))[0, -1]
            torch.testing.assert_close(boot[i], expect, rtol=1e-5, atol=1e-6)
            assert boot[i] != 0


@pytest.mark.parametrize("algo", ["dqo", "dro"])
def test_sampled_cut_responses_train(tok, policy, tmp_path, monkeypatch, algo):
    """A tiny random model sampled with a 4-token limit: rows with finished false, no EOS
    appended, that train; DQO gets V(s_end) for exactly those rows, DRO (whose critic is fit
    at the prompt alone) scores them as terminal with their reward."""
    probs = arithmetic.make_problems(8, 4)
    torch.manual_seed(3)
    samples = generate(policy, tok, [p.prompt for p in probs], n=2, decoding=dec(4))
    rows = label_samples([p.prompt for p in probs], [p.answer for p in probs], samples,
                         always_right)
    exs, _ = D.tokenize_rows([D.check_row(r, "x") for r in rows], tok)
    assert [e.response_ids for e in exs] == [r["response_ids"] for r in rows]
    assert any(not e.finished for e in exs)
    compute_ref_logps(policy, exs, tok.pad_token_id)
    value = ValueModel.from_policy(policy)
    torch.nn.init.normal_(value.head.weight)
    seen, losses = [], []
    real = algos.base.values_and_bootstrap
    real_dqo, real_dro = algos.dqo.fused_dqo_loss, algos.dro.dro_loss

    def spy(engines, b):
        out = real(engines, b)
        seen.append((b.unfinished.clone(), out[1], b))
        return out

    def spy_dqo(*a, **k):  # the loss gets exactly that bootstrap
        losses.append(("dqo", k["bootstrap"], a[3]))
        return real_dqo(*a, **k)

    def spy_dro(*a, **k):  # the sequence reward alone
        losses.append(("dro", None, a[3]))
        return real_dro(*a, **k)

    def batches(self, engines, b, num_tokens):
        seen.append((b.unfinished.clone(), None, b))
        return real_dro_step(self, engines, b, num_tokens)

    real_dro_step = algos.dro.DRO.step
    monkeypatch.setattr(algos.dqo, "values_and_bootstrap", spy)
    monkeypatch.setattr(algos.dro.DRO, "step", batches)
    monkeypatch.setattr(algos.dqo, "fused_dqo_loss", spy_dqo)
    monkeypatch.setattr(algos.dro, "dro_loss", spy_dro)
    args = TrainConfig(out=str(tmp_path / "run"), algo=algo, lr=1e-3, value_lr=1e-2, batch_size=8,
                     micro_batch=4, max_steps=2, engine="torch", progress=False)
    train(args, tok, policy, value, exs)
    assert len(seen) == len(losses) == 4
    assert any(unfinished.any() for unfinished, _, _ in seen)
    for (unfinished, boot, b), (kind, passed, rewards) in zip(seen, losses):
        if kind == "dro":
            torch.testing.assert_close(rewards, (b.rewards * b.action_mask).sum(-1))
            continue
        if unfinished.any():
            assert bool((boot[unfinished] != 0).all()) and bool((boot[~unfinished] == 0).all())
        else:
            assert boot is None
        assert passed is boot


def test_evaluation_grades_cut_responses_wrong_and_reports_how_many(tok, policy):
    probs = arithmetic.make_problems(6, 5)
    torch.manual_seed(0)
    res = accuracy(policy, tok, [p.prompt for p in probs], [p.answer for p in probs],
                   always_right, decoding=dec(4), samples=2)
    assert res["greedy_cut"] > 0 and res["sampled_cut"] > 0
    assert res["greedy"] == pytest.approx(1 - res["greedy_cut"])
    assert res["sampled"] == pytest.approx(1 - res["sampled_cut"])


def test_a_finished_text_row_ends_with_the_chat_templates_end_of_turn():
    """SFT solutions and other text rows end as a chat model ends its answer: Gemma's
    <end_of_turn>, not its <eos> (which it never emits after an answer)."""
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    rows = D.sft_rows([{"prompt": "1+2=?", "solution": "#### 3", "reward": 0.0}], "d")
    plain, _ = D.tokenize_rows(rows, tok, strict=True)
    assert plain[0].response_ids[-1] == tok.eos_token_id  # no template: EOS
    tok.chat_template = ("{% for m in messages %}<start_of_turn>{{ m['content'] }}"
                         "<end_of_turn>{% endfor %}"
                         "{% if add_generation_prompt %}<start_of_turn>{% endif %}")
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    chat, _ = D.tokenize_rows(rows, tok, strict=True)
    assert chat[0].response_ids[-1] == eot and chat[0].finished
    assert chat[0].response_ids[:-1] == plain[0].response_ids[:-1]
    ex = D.tokenize_row(D.check_row({"prompt": "Q", "response": "4", "reward": 1}, "x"), tok)
    assert ex.response_ids[-1] == eot and ex.rewards[-1] == 1.0

"""Prompt templates (the paper's answer-format instruction): chosen once, recorded with the
data, and used by sampling, training's evaluation and dqo.evaluate alike."""
import json

import pytest

from dqo import data as D
from dqo.decoding import DecodingConfig
from dqo.errors import DataError, UsageError
from dqo.prompts import (
    TEMPLATES,
    apply_template,
    choose_template,
    prepare_prompt,
    render_prompt,
    resolve_template,
)
from dqo.tasks import arithmetic


def test_templates_resolve_and_apply(tmp_path):
    gsm8k = choose_template(None, None, "gsm8k")
    assert apply_template(gsm8k, "Q?") == ("Q?\nPlease reason step by step, and produce a final "
                                           "answer following 4 '#', like '#### 0'.")
    math = choose_template(None, None, "math")
    assert apply_template(math, "x?").endswith("within \\boxed{}.")  # braces kept literally
    assert choose_template(None, None, "arithmetic") is None
    assert choose_template(None, None, None) is None  # a reward function: as stored
    assert choose_template("none", math, "math") is None  # given beats recorded beats the task's
    assert choose_template(None, math, "gsm8k") == math
    f = tmp_path / "t.txt"
    f.write_text("<|q|> {prompt} <|a|>")
    assert apply_template(resolve_template(str(f)), "1+1") == "<|q|> 1+1 <|a|>"
    f.write_text("no placeholder")
    with pytest.raises(UsageError, match="one {prompt} placeholder, found 0"):
        resolve_template(str(f))
    with pytest.raises(UsageError, match="expected one of paper-gsm8k"):
        resolve_template("paper-gsm9k")
    with pytest.raises(ValueError, match="prompt_template"):
        DecodingConfig(prompt_template="no placeholder")
    assert set(TEMPLATES) == {"paper-gsm8k", "paper-math", "none"}


def test_sample_train_evaluate_use_the_recorded_template(tok, policy, tmp_path, monkeypatch,
                                                         capsys):
    import dqo.evaluate as evaluate
    import dqo.runs as runs
    from dqo import sample
    from dqo import train as train_cli
    model_dir = tmp_path / "base"
    policy.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    probs = arithmetic.make_problems(4, 9)
    prompts = tmp_path / "prompts.jsonl"
    D.write_jsonl(prompts, [dict(prompt=p.prompt, answer=p.answer) for p in probs])
    template = tmp_path / "template.txt"
    template.write_text("Q {prompt}#")  # characters the toy tokenizer has
    data = tmp_path / "data.jsonl"
    sample.main(["--model", str(model_dir), "--prompts", str(prompts), "--task", "arithmetic",
                 "--prompt-template", str(template), "--n", "2", "--max-new-tokens", "6",
                 "--out", str(data)])
    rows, _ = D.read_jsonl(data, strict=True)
    assert {r["prompt"] for r in rows} == {f"Q {p.prompt}#" for p in probs}
    assert DecodingConfig.load(tmp_path / "data.decoding.json").prompt_template == "Q {prompt}#"

    seen = []

    def spy(real):
        def accuracy(model, tok, prompts, *a, **k):
            seen.append(list(prompts))
            return real(model, tok, prompts, *a, **k)
        return accuracy

    monkeypatch.setattr(runs, "accuracy", spy(runs.accuracy))
    out = tmp_path / "run"
    train_cli.main(["--model", str(model_dir), "--data", str(data), "--task", "arithmetic",
                    "--eval-data", str(prompts), "--eval-samples", "0", "--max-steps", "1",
                    "--batch-size", "4", "--micro-batch", "4", "--engine", "torch",
                    "--out", str(out), "--no-progress"])
    assert seen and all(ps == [f"Q {p.prompt}#" for p in probs] for ps in seen)
    final = out / "final" / "policy"
    assert DecodingConfig.load(final / "decoding.json").prompt_template == "Q {prompt}#"
    seen.clear()
    monkeypatch.setattr(evaluate, "accuracy", spy(evaluate.accuracy))
    capsys.readouterr()
    evaluate.main(["--model", str(final), "--data", str(prompts), "--task", "arithmetic",
                   "--samples", "0"])
    evaluate.main(["--model", str(final), "--data", str(prompts), "--task", "arithmetic",
                   "--samples", "0", "--prompt-template", "none"])
    assert seen == [[f"Q {p.prompt}#" for p in probs], [p.prompt for p in probs]]
    res = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert res["decoding"]["prompt_template"] == "Q {prompt}#"


# --- conversational prompts (issue 22 item 3) ---------------------------------------------------
def chat_tok():
    """The toy tokenizer with a chat template that marks every role with a special token."""
    from dqo.tokenizer import char_tokenizer
    t = char_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<s>", "<u>", "<a>"]})
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}<s>{% elif "
                       "m['role'] == 'user' %}<u>{% else %}<a>{% endif %}{{ m['content'] }}"
                       "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")
    return t


CONV = [{"role": "system", "content": "Q1"}, {"role": "user", "content": "1+2=?"}]


def test_a_conversation_goes_through_the_chat_template_system_turn_kept():
    from dqo.decoding import encode_prompt
    t = chat_tok()
    ids = lambda text: t(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert encode_prompt(t, CONV) == ids("<s>Q1<u>1+2=?<a>")
    assert encode_prompt(t, "1+2=?") == ids("<u>1+2=?<a>")  # a plain string: one user turn
    # --system-prompt: in front of a prompt without a system turn, never a second one
    assert encode_prompt(t, "1+2=?", system_prompt="Q2") == ids("<s>Q2<u>1+2=?<a>")
    assert encode_prompt(t, CONV, system_prompt="Q2") == ids("<s>Q1<u>1+2=?<a>")
    # a template wraps the user's text (the last user turn), never the system turn
    assert render_prompt(t, CONV, template="Q {prompt}#") == "<s>Q1<u>Q 1+2=?#<a>"
    # the data rows' form (dqo.sample writes it, dqo.train adds --system-prompt with it)
    assert prepare_prompt("1+2=?", "Q {prompt}#") == "Q 1+2=?#"  # a string stays one
    assert prepare_prompt("1+2=?", None, "Q2") == [{"role": "system", "content": "Q2"},
                                                    {"role": "user", "content": "1+2=?"}]
    assert prepare_prompt(CONV, None, "Q2") == CONV
    # a data row holding a conversation trains on the chat template's tokens
    row = D.check_row({"prompt": CONV, "response": "3", "reward": 1.0}, "d.jsonl:1")
    ex = D.tokenize_row(row, t)
    assert ex.prompt_ids == ids("<s>Q1<u>1+2=?<a>") and ex.prompt == CONV
    # and groups by prompt (DPO's pairs), a list being no dict key
    from dqo.algos.dpo import DPO
    bad = D.tokenize_row(dict(row, reward=0.0, correct=False), t)
    good = D.tokenize_row(dict(row, correct=True), t)
    assert len(DPO().items([good, bad])) == 1


def test_a_prompt_column_is_kept_as_a_conversation_or_named_as_bad():
    row = D.prompt_row({"messages": CONV, "answer": "3"}, "p.jsonl:4", prompt_column="messages")
    assert row["prompt"] == CONV  # before: its Python repr, a string, trained on as text
    with pytest.raises(DataError, match=r"p.jsonl:2: prompt column 'question': expected a "
                                        r"string or a list of \{role, content\} messages"):
        D.prompt_row({"question": 5, "answer": "3"}, "p.jsonl:2")
    with pytest.raises(DataError, match=r"p.jsonl:3: prompt column 'prompt'.*list"):
        D.prompt_row({"prompt": [{"role": "user"}], "answer": "3"}, "p.jsonl:3")
    with pytest.raises(DataError, match=r"d.jsonl:7: 'prompt'"):
        D.check_row({"prompt": {"a": 1}, "response": "3", "reward": 1.0}, "d.jsonl:7")
    # a conversation needs a chat template: no silent flattening
    from dqo.tokenizer import char_tokenizer
    row = D.check_row({"prompt": CONV, "response": "3", "reward": 1.0}, "d.jsonl:8")
    with pytest.raises(DataError, match="d.jsonl:8.*needs a tokenizer with a chat template"):
        D.tokenize_row(row, char_tokenizer())


def test_sample_and_train_keep_conversations_and_the_system_prompt(policy, tmp_path,
                                                                  monkeypatch):
    import dqo.runs as runs
    from dqo import sample
    from dqo import train as train_cli
    from dqo.modeling import build_policy, tiny_config
    t = chat_tok()
    model_dir = tmp_path / "base"
    build_policy(tiny_config(t, hidden_size=16, layers=1, heads=1)).save_pretrained(model_dir)
    t.save_pretrained(model_dir)
    probs = arithmetic.make_problems(2, 5)
    prompts = tmp_path / "prompts.jsonl"
    D.write_jsonl(prompts, [dict(prompt=[{"role": "user", "content": p.prompt}],
                                 answer=p.answer) for p in probs])
    data = tmp_path / "data.jsonl"
    sample.main(["--model", str(model_dir), "--prompts", str(prompts), "--task", "arithmetic",
                 "--system-prompt", "Q1", "--n", "2", "--max-new-tokens", "4",
                 "--out", str(data)])
    rows, _ = D.read_jsonl(data, strict=True)
    assert [r["prompt"] for r in rows[::2]] == [
        [{"role": "system", "content": "Q1"}, {"role": "user", "content": p.prompt}]
        for p in probs]
    assert DecodingConfig.load(tmp_path / "data.decoding.json").system_prompt == "Q1"
    plain = tmp_path / "plain.jsonl"  # plain-string evaluation prompts get the recorded system turn
    D.write_jsonl(plain, [dict(prompt=p.prompt, answer=p.answer) for p in probs])
    seen = []

    def accuracy(model, tok, prompts, *a, **k):
        seen.append([render_prompt(tok, p) for p in prompts])
        return {}

    monkeypatch.setattr(runs, "accuracy", accuracy)
    train_cli.main(["--model", str(model_dir), "--data", str(data), "--task", "arithmetic",
                    "--eval-data", str(plain), "--eval-samples", "0", "--max-steps", "1",
                    "--batch-size", "4", "--micro-batch", "4", "--engine", "torch",
                    "--out", str(tmp_path / "run"), "--no-progress"])
    assert seen and seen[0] == [f"<s>Q1<u>{p.prompt}<a>" for p in probs]

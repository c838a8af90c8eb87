"""Prompt templates (the paper's answer-format instruction): chosen once, recorded with the
data, and used by sampling, training's evaluation and dqo.evaluate alike."""
import json

import pytest

from dqo import data as D
from dqo.decoding import DecodingConfig
from dqo.errors import UsageError
from dqo.prompts import TEMPLATES, apply_template, choose_template, resolve_template
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

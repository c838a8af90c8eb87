"""Prompt templates: the instruction around each problem that tells the model the answer format
its verifier reads (paper, appendix A). Without it an instruct model answers "The answer is 18"
or ``\\boxed{18}``, the GSM8K checker reads no ``#### N``, and every label and accuracy is wrong
without a word.

A template is text with one ``{prompt}`` placeholder (replaced literally: braces elsewhere, as in
``\\boxed{}``, stay as they are). The chosen template is recorded in the data's decoding config
(``data.decoding.json``, then ``final/policy/decoding.json``), so that training's and
``dqo.evaluate``'s prompts are the ones the data were sampled with.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import UsageError

PLACEHOLDER = "{prompt}"
TEMPLATES = {
    "paper-gsm8k": "{prompt}\nPlease reason step by step, and produce a final answer following "
                   "4 '#', like '#### 0'.",
    "paper-math": "{prompt}\nPlease reason step by step, and put your final answer within "
                  "\\boxed{}.",
    "none": PLACEHOLDER,
}
# the template a built-in task gets when none is named (a reward function: none)
TASK_TEMPLATES = {"gsm8k": "paper-gsm8k", "gsm8k-flexible": "paper-gsm8k", "math": "paper-math",
                  "arithmetic": "none"}


def resolve_template(spec: str) -> str:
    """The template text of a name in :data:`TEMPLATES` or of a file holding one."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(f"--prompt-template: expected one of {', '.join(TEMPLATES)} or a file, "
                         f"got {spec!r}")
    text = path.read_text(encoding="utf-8")
    check_template(text, f"--prompt-template: {spec}")
    return text


def check_template(text: str, where: str = "prompt_template") -> None:
    if text.count(PLACEHOLDER) != 1:
        raise UsageError(f"{where}: expected exactly one {PLACEHOLDER} placeholder, found "
                         f"{text.count(PLACEHOLDER)}")


def apply_template(template: Optional[str], prompt: str) -> str:
    """``prompt`` inside ``template`` (None: the prompt as it is)."""
    return prompt if template is None else template.replace(PLACEHOLDER, prompt, 1)


def choose_template(given: Optional[str], recorded: Optional[str],
                    task: Optional[str]) -> Optional[str]:
    """The template of a command: the one given (``--prompt-template``), else the one recorded
    with the data or model, else the task's (:data:`TASK_TEMPLATES`); None for none."""
    if given is not None:
        text = resolve_template(given)
    elif recorded is not None:
        text = recorded
    else:
        text = TEMPLATES[TASK_TEMPLATES.get(task or "", "none")]
    return None if text == PLACEHOLDER else text


def with_template(decoding, given: Optional[str], task: Optional[str]):
    """``decoding`` with the template a command uses (:func:`choose_template`) on record."""
    from dataclasses import replace
    return replace(decoding, prompt_template=choose_template(given, decoding.prompt_template,
                                                             task))

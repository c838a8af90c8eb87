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

import json
from pathlib import Path
from typing import Dict, List, Optional, Union

from .errors import DataError, UsageError

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


def with_template(decoding, given: Optional[str], task: Optional[str],
                  system_prompt: Optional[str] = None):
    """``decoding`` with the template a command uses (:func:`choose_template`) on record, and
    ``system_prompt`` (``--system-prompt``) when given, else the one recorded."""
    from dataclasses import replace
    return replace(decoding, prompt_template=choose_template(given, decoding.prompt_template,
                                                             task),
                   system_prompt=decoding.system_prompt if system_prompt is None
                   else system_prompt)


# --- conversational prompts -------------------------------------------------------------------
# A prompt is TRL's either/or: a plain string (one user turn) or a conversation, a list of
# {"role", "content"} messages that goes through the tokenizer's chat template as it is (system
# turns kept). Every path that turns a prompt into tokens (sampling, training rows, evaluation,
# dqo.hf) comes through render_prompt, so none of them can stringify a conversation.
Prompt = Union[str, List[Dict[str, str]]]


def check_prompt(prompt, where: str = "prompt") -> Prompt:
    """``prompt`` if it is a non-empty string or a non-empty list of ``{"role", "content"}``
    messages with string values; otherwise a DataError naming ``where`` (the column and row)."""
    if isinstance(prompt, str):
        if prompt:
            return prompt
        raise DataError(f"{where}: expected a non-empty string or a list of "
                        f"{{role, content}} messages, got an empty string")
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in prompt):
        return [dict(m) for m in prompt]
    raise DataError(f"{where}: expected a string or a list of {{role, content}} messages "
                    f"(strings), got {_describe(prompt)}")


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def prepare_prompt(prompt: Prompt, template: Optional[str] = None,
                   system_prompt: Optional[str] = None, where: str = "prompt") -> Prompt:
    """The prompt as the data rows store it: ``template`` applied to the user's text (the last
    user turn of a conversation), and a system turn with ``system_prompt`` in front of a prompt
    that has none (a conversation's own system turn is kept). A plain string with no system
    prompt stays a string."""
    prompt = check_prompt(prompt, where)
    if isinstance(prompt, str):
        text = apply_template(template, prompt)
        if system_prompt is None:
            return text
        prompt = [{"role": "user", "content": text}]
    elif template is not None:
        last = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=None)
        if last is None:
            raise DataError(f"{where}: the conversation has no user turn for the prompt "
                            f"template to wrap")
        prompt[last] = dict(prompt[last], content=apply_template(template, prompt[last]["content"]))
    if system_prompt is not None and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": system_prompt}] + prompt
    return prompt


def render_prompt(tokenizer, prompt: Prompt, system_prompt: Optional[str] = None,
                  template: Optional[str] = None, where: str = "prompt") -> str:
    """The text the model sees for ``prompt`` (:func:`prepare_prompt`), ending where its
    response begins: through the chat template with the generation prompt when the tokenizer
    has one; a plain string as it is when it has none. A conversation or a system prompt needs
    a chat template (a DataError otherwise: there is no honest way to flatten one)."""
    prompt = prepare_prompt(prompt, template, system_prompt, where)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        if not has_template:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    elif not has_template:
        raise DataError(f"{where}: a conversation (or --system-prompt) needs a tokenizer with a "
                        f"chat template, and this one has none")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def prompt_key(prompt: Prompt) -> str:
    """A hashable identity of a prompt (grouping responses by prompt: DPO pairs, SFT)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)

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


# --- prompts as the data rows hold them ---------------------------------------------------------
# A prompt is TRL's either/or: a plain string (one user turn) or a conversation, a list of
# {"role", "content"} messages that goes through the tokenizer's chat template as it is (system
# turns kept; render_prompt below). Every path that turns one into tokens comes through
# render_prompt, so none of them can stringify a conversation.
Prompt = Union[str, List[Dict[str, str]]]


def check_prompt(prompt, where: str = "prompt") -> Prompt:
    """``prompt`` if it is a non-empty string or a non-empty list of ``{"role", "content"}``
    messages with string values (a copy); otherwise a DataError naming ``where`` (the column
    and row)."""
    if isinstance(prompt, str):
        if prompt:
            return prompt
        raise DataError(f"{where}: expected a non-empty string or a list of "
                        f"{{role, content}} messages, got an empty string")
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in prompt):
        return [dict(m) for m in prompt]
    text = repr(prompt)
    raise DataError(f"{where}: expected a string or a list of {{role, content}} messages "
                    f"(strings), got {type(prompt).__name__} {text[:80]}"
                    f"{'...' if len(text) > 80 else ''}")


def prepare_prompt(prompt: Prompt, template: Optional[str] = None,
                   system_prompt: Optional[str] = None, where: str = "prompt") -> Prompt:
    """The prompt as data rows store it (what :func:`render_prompt` renders the same way):
    ``template`` applied to the user's text (a conversation's last user turn), and a first
    system turn with ``system_prompt`` where there is none. A plain string with no system
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
        prompt[last] = dict(prompt[last],
                            content=apply_template(template, prompt[last]["content"]))
    if system_prompt is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}] + prompt
    return prompt


def prompt_key(prompt: Prompt) -> str:
    """A hashable identity of a prompt (grouping responses by prompt: DPO pairs, KTO, SFT)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def with_system_prompt(decoding, given: Optional[str]):
    """``decoding`` with ``--system-prompt`` on record when given (else the one recorded)."""
    from dataclasses import replace
    return decoding if given is None else replace(decoding, system_prompt=given)


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


def render_prompt(tokenizer, prompt, system_prompt: Optional[str] = None,
                  template: Optional[str] = None) -> str:
    """A prompt as the model sees it, the one rule of sampling, training and evaluation.

    ``prompt`` is text (one user turn) or a conversation (a list of ``{"role", "content"}``
    messages, system turns kept). ``template`` (a :data:`TEMPLATES` text with one ``{prompt}``)
    wraps the text, or the last user turn's content; ``system_prompt`` becomes a first system
    turn when the conversation has none. With a chat template the conversation is rendered by
    it, ending in the assistant's generation prompt; without one a text prompt is used as it is,
    and a conversation or a system prompt is a UsageError (it is never stringified)."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": apply_template(template, prompt)}]
    else:
        messages = check_messages(prompt)
        if template is not None:
            last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last is None:
                raise UsageError("prompt_template: the conversation has no user turn to wrap")
            messages[last] = dict(messages[last],
                                  content=apply_template(template, messages[last]["content"]))
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    raise UsageError("prompt: a conversation (or a system prompt) needs a tokenizer with a chat "
                     "template, and this one has none")


def check_messages(messages) -> list:
    """A conversation: a non-empty list of ``{"role": str, "content": str}``; a copy of it."""
    if not (isinstance(messages, (list, tuple)) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages)):
        raise UsageError(f"prompt: expected text or a non-empty list of {{'role', 'content'}} "
                         f"messages, got {str(messages)[:80]!r}")
    return [dict(m) for m in messages]

"""A ``DQOTrainer`` dataset -> :class:`~dqo.data.Example` s, tokenized the way ``dqo.sample``
encodes prompts (:func:`dqo.decoding.encode_prompt`, one rule with ``dqo.train``'s data).

Two row formats, told apart by their columns:

- TRL's unpaired preference format: ``prompt`` and ``completion``, each text or a list of
  ``{"role", "content"}`` messages, with ``label`` (bool: desirable or not, reward 1 or 0) or
  ``reward`` (a number), and optionally ``step_rewards`` (one per line of the completion, or
  per entry of ``steps``);
- the rows ``dqo.sample`` writes (docs/data-format.md): ``prompt``, ``response``, ``reward``
  and ``response_ids``, ``behavior_logp``, ``finished``, trained on exactly as recorded.

A completion given as text ends with the chat template's end-of-turn token (what sampling
stops at), or with the EOS where the tokenizer has no chat template.

Rows already tokenized (``input_ids``, ``prompt_length``: :mod:`dqo.hf.modules`) are left as
they are. A bad row is a :class:`~dqo.errors.DataError` naming it (the dataset and its index).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from ..data import Example, apply_truncated_policy, check_row, split_steps, tokenize_row
from ..decoding import encode_prompt, end_of_turn_ids
from ..errors import DataError, UsageError
from ..prompts import check_messages


def is_tokenized(dataset) -> bool:
    """Rows of token ids already (``input_ids``), which the trainer takes as they are."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        columns = dataset[0].keys() if len(dataset) else ()
    return "input_ids" in columns


def completion_text(completion, where: str) -> str:
    """A completion's text: the text itself, or the content of its one assistant message."""
    if isinstance(completion, str):
        return completion
    try:
        messages = check_messages(completion)
    except UsageError:
        messages = None
    if not messages or len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"{where}: 'completion' must be text or one assistant message "
                        f"[{{'role': 'assistant', 'content': ...}}], got {str(completion)[:80]!r}")
    return messages[0]["content"]


def format_row(row: Dict, where: str) -> Dict:
    """A TRL unpaired row as a row of the data format (docs/data-format.md); a row of that
    format as it is."""
    row = dict(row)
    if "completion" in row:
        if "response" in row or "steps" in row:
            raise DataError(f"{where}: give 'completion' or 'response'/'steps', not both")
        row["response"] = completion_text(row.pop("completion"), where)
    label = row.pop("label", None)
    if label is not None:
        if not isinstance(label, bool):
            raise DataError(f"{where}: 'label' must be true or false, got {label!r}")
        row.setdefault("reward", float(label))
        row.setdefault("correct", label)
    if "reward" not in row:
        raise DataError(f"{where}: expected 'label' (true/false) or 'reward' (a number)")
    if row.get("step_rewards") is not None and "steps" not in row and "response" in row:
        row["steps"] = split_steps(row["response"])  # the data format's steps: its lines
    return row


def tokenize_dataset(dataset, tokenizer, args, *, stop_ids: Optional[Sequence[int]] = None,
                     max_length: Optional[int] = None, name: str = "train_dataset"
                     ) -> List[Example]:
    """Every row of ``dataset`` as an :class:`Example` (see the module docstring), then
    ``args.truncated`` applied to the unfinished ones. ``args``: a :class:`DQOConfig` (its
    ``system_prompt``, ``prompt_template``, ``max_prompt_length``, ``truncated``);
    ``max_length``: its ``max_length`` or the model's context."""
    template = args.template_text()
    end_turn = end_of_turn_ids(tokenizer)  # [] without a chat template: the EOS ends a text row
    examples = []
    for i, raw in enumerate(dataset):
        where = f"{name}[{i}]"
        row = format_row(raw, where)
        prompt = row.get("prompt")
        if not (isinstance(prompt, str) and prompt) and not isinstance(prompt, (list, tuple)):
            raise DataError(f"{where}: 'prompt' must be non-empty text or a list of messages, "
                            f"got {prompt!r}")
        try:
            prompt_ids = encode_prompt(tokenizer, prompt, system_prompt=args.system_prompt,
                                       template=template)
        except UsageError as e:
            raise DataError(f"{where}: {e}") from None
        if args.max_prompt_length is not None:
            prompt_ids = prompt_ids[-args.max_prompt_length:]  # the nearest context kept
        # the format's checks on everything but the prompt, which is encoded already
        checked = check_row(dict(row, prompt=tokenizer.decode(prompt_ids) or "?"), where)
        checked["prompt"] = prompt
        if end_turn and checked.get("response_ids") is None and checked.get("finished", True):
            # a chat model ends its turn with the template's token, which sampling stops at
            try:
                body = tokenizer(checked["response"], add_special_tokens=False)["input_ids"]
            except Exception as e:  # tokenizers raise many types
                raise DataError(f"{where}: the tokenizer failed on the completion ({e})") from None
            checked.update(response_ids=body + end_turn, finished=True)
        examples.append(tokenize_row(checked, tokenizer, max_length=max_length,
                                     stop_ids=stop_ids, prompt_ids=prompt_ids))
    if not examples:
        raise DataError(f"{name}: no rows")
    kept, _ = apply_truncated_policy(examples, args.truncated, args.truncated_reward)
    if not kept:
        raise DataError(f"{name}: every response is unfinished and truncated='drop' dropped "
                        f"them all")
    return kept

"""Rows -> :class:`~dqo.data.schema.Example`: token ids, per-token rewards (the outcome on the
last response token, process rewards on step ends) and behaviour log-probs; what unfinished
responses become (``--truncated``)."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

from ..decoding import encode_prompt, end_of_turn_ids
from ..errors import DataError
from .schema import Example

log = logging.getLogger(__name__)


def _encode(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenized(where: str, what: str, fn):
    """``fn()``; a tokenizer that fails on a row's text is a DataError naming the row."""
    try:
        return fn()
    except DataError:
        raise
    except Exception as e:  # tokenizers raise many types (unknown characters, huge inputs)
        raise DataError(f"{where}: the tokenizer failed on the {what} "
                        f"({type(e).__name__}: {e})") from None


def split_steps(response: str) -> List[str]:
    """A response's steps, as the data format defines them: its lines, blank ones included
    (``"\\n".join(steps) == response``), so that step i always means the same line."""
    return response.split("\n")


def step_end_tokens(tokenizer, steps: Sequence[str], response_ids: Sequence[int]) -> List[int]:
    """Index (in ``response_ids``) of the token that ends every step: the token that completes
    the step's last character (of a character split over byte tokens, the last piece; an empty
    step borrows the token before it, the first step's the first token).

    The tokens' character spans come from the tokenizer's own offsets (a fast tokenizer, when
    encoding the steps gives ``response_ids`` again), else from decoding growing prefixes of
    the ids. Decoding one token at a time would drift: SentencePiece decoders strip a lone
    token's leading space, and a byte token of a split character decodes to U+FFFD."""
    ends, pos = [], 0
    for s in steps:
        pos += len(s)
        ends.append(pos)  # the character offset just past the step's last character
        pos += 1  # the newline
    token_ends = (_offset_ends(tokenizer, "\n".join(steps), response_ids)
                  or _prefix_ends(tokenizer, response_ids))
    out = []
    for e in ends:
        # the first token whose text reaches e; an empty prefix (e = 0) is the first token's
        k = next((i for i, t in enumerate(token_ends) if t is not None and t >= e),
                 len(response_ids) - 1)
        out.append(max(k, 0))
    return out


def _offset_ends(tokenizer, text: str, ids: Sequence[int]) -> Optional[List[Optional[int]]]:
    """Where every token's text ends, from a fast tokenizer's offsets of ``text``; None when
    the tokenizer is slow or ``text`` does not encode to ``ids`` (sampled ids)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        return None
    spans = enc["offset_mapping"]
    # the pieces of a character split over byte tokens share its span: only the last one
    # completes it
    return [None if i + 1 < len(spans) and spans[i + 1][0] < end else end
            for i, (_, end) in enumerate(spans)]


def _prefix_ends(tokenizer, ids: Sequence[int]) -> List[Optional[int]]:
    """Where every token's text ends: the length of the decoded prefix up to it, None when that
    prefix is not a prefix of the whole decoding (it ends in part of a character)."""
    full = tokenizer.decode(list(ids), skip_special_tokens=True)
    out = []
    for k in range(len(ids)):
        prefix = tokenizer.decode(list(ids[:k + 1]), skip_special_tokens=True)
        out.append(len(prefix) if full.startswith(prefix) else None)
    return out


def text_end_id(tokenizer) -> int:
    """The token a finished text row ends with: the chat template's end of turn when there is
    one (what a chat model emits after its answer: Gemma's ``<end_of_turn>``, not its
    ``<eos>``), else the tokenizer's EOS."""
    return (end_of_turn_ids(tokenizer) or [tokenizer.eos_token_id])[0]


def tokenize_row(row: Dict, tokenizer, *, max_length: Optional[int] = None,
                 stop_ids: Optional[Sequence[int]] = None,
                 end_id: Optional[int] = None,
                 prompt_ids: Optional[Sequence[int]] = None) -> Example:
    """One row as token ids, per-token rewards and behaviour log-probs (see the module
    docstring). ``stop_ids``: the tokens that end a response (default: the tokenizer's EOS).
    ``end_id``: the token a finished text row ends with (default: :func:`text_end_id`).
    ``prompt_ids``: the prompt's ids when the caller encoded it (default: ``encode_prompt``).
    A row over ``max_length`` keeps its whole prompt and as much of its response as fits, and
    is then unfinished; a prompt that alone does not fit is a DataError."""
    where = row.get("_source", "row")
    if prompt_ids is None:
        prompt_ids = _tokenized(where, "prompt", lambda: encode_prompt(tokenizer, row["prompt"]))
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise DataError(f"{where}: the prompt tokenizes to nothing")
    eos = tokenizer.eos_token_id
    stops = set(stop_ids) if stop_ids is not None else {eos}
    if row.get("response_ids") is not None:
        response_ids = list(row["response_ids"])
        vocab = len(tokenizer)
        if max(response_ids) >= vocab:
            bad = next(i for i in response_ids if i >= vocab)
            raise DataError(f"{where}: 'response_ids' holds {bad}, outside the tokenizer's "
                            f"vocabulary of {vocab} (sampled with another model?)")
        finished = row.get("finished", response_ids[-1] in stops)
        body = response_ids[:-1] if response_ids[-1] in stops else response_ids
    else:
        body = _tokenized(where, "response", lambda: _encode(tokenizer, row["response"]))
        finished = row.get("finished", True)
        end = text_end_id(tokenizer) if end_id is None else end_id
        response_ids = body + [end] if finished else list(body)
        if not response_ids:
            raise DataError(f"{where}: the response tokenizes to nothing and did not finish")
    behavior = row.get("behavior_logp")
    if behavior is not None and len(behavior) != len(response_ids):
        raise DataError(f"{where}: 'behavior_logp' has {len(behavior)} entries but the "
                        f"response has {len(response_ids)} tokens"
                        + (" (with the end token of a finished text row)"
                           if "response_ids" not in row and finished else "")
                        + "; store 'response_ids' with it (dqo.sample does)")
    rewards = [0.0] * len(response_ids)
    rewards[-1] += float(row["reward"])
    if row.get("step_rewards") is not None:
        ends = step_end_tokens(tokenizer, row["steps"], body)
        for e, r in zip(ends, row["step_rewards"]):
            rewards[e] += float(r)
    ex = Example(prompt_ids, response_ids, rewards, None if behavior is None else list(behavior),
                 row["prompt"], row["response"], row.get("answer"), where,
                 reward=float(row["reward"]), labelled_correct=row.get("correct"),
                 finished=bool(finished), truncated=not finished)
    if max_length is not None and len(ex) > max_length:
        fits = max_length - len(prompt_ids)
        if fits < 1:
            raise DataError(f"{where}: the prompt alone has {len(prompt_ids)} tokens, "
                            f"max_length={max_length} leaves no room for a response")
        ex.response_ids, ex.rewards = ex.response_ids[:fits], ex.rewards[:fits]
        if ex.behavior_logp is not None:
            ex.behavior_logp = ex.behavior_logp[:fits]
        ex.finished, ex.cut_to_fit, ex.truncated = False, True, True
    return ex


def tokenize_rows(rows: Sequence[Dict], tokenizer, *, max_length=None, strict=False,
                  stop_ids=None):
    out, errors = [], []
    end_id = text_end_id(tokenizer)  # once: it renders the chat template
    for row in rows:
        try:
            out.append(tokenize_row(row, tokenizer, max_length=max_length, stop_ids=stop_ids,
                                    end_id=end_id))
        except DataError as e:
            if strict:
                raise
            log.warning("skipped bad row: %s", e)
            errors.append(str(e))
    cut = sum(e.cut_to_fit for e in out)
    if cut:
        log.warning("%d of %d responses cut to fit max_length=%s (trained as unfinished)", cut,
                    len(out), max_length)
    return out, errors


TRUNCATED_POLICIES = ("bootstrap", "drop", "penalize")


def apply_truncated_policy(examples: List[Example], policy: str = "bootstrap",
                           reward: float = 0.0) -> Tuple[List[Example], Dict[str, int]]:
    """What unfinished responses (cut when sampled, or to fit max_length) become:
    ``bootstrap``: kept as they are, their return bootstraps from V of the state after their
    last token; ``drop``: removed (DAPO's overlong filtering); ``penalize``: their last token is
    terminal with ``reward`` added to it. Returns the examples and counts for the summary."""
    if policy not in TRUNCATED_POLICIES:
        raise ValueError(f"truncated: expected one of {TRUNCATED_POLICIES}, got {policy!r}")
    unfinished = [e for e in examples if not e.finished]
    counts = dict(examples=len(examples), unfinished=len(unfinished),
                  cut_to_fit=sum(e.cut_to_fit for e in examples))
    if policy == "drop":
        examples = [e for e in examples if e.finished]
    elif policy == "penalize":
        examples = [e if e.finished else replace(
            e, rewards=e.rewards[:-1] + [e.rewards[-1] + float(reward)], finished=True)
            for e in examples]
    return examples, counts

"""How responses are decoded, in one place: the sampling settings of the offline data, of the
Monte-Carlo process scores and of evaluation, the tokens that end a response, and how a prompt
becomes token ids.

One :class:`DecodingConfig` is written beside the data that ``dqo.sample`` writes
(``data.jsonl`` -> ``data.decoding.json``), read back by ``dqo.train`` (its evaluation, and
``final/policy/decoding.json``) and by ``dqo.evaluate``, so that a run is evaluated the way its
data were sampled (the paper evaluates with its sampling settings) and the length limit used
is on record.

``generate`` gets a complete generation config and the model's own ``generation_config`` is
set aside while it runs: transformers fills every unset field of an explicit config from the
checkpoint's ``generation_config.json`` (a ``repetition_penalty`` of 1.05, a ``top_k`` of 20),
which would change what is sampled and make the recorded behaviour log-probs wrong.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

# the paper's sampling settings (appendix A): the data, and its sampled evaluation
PAPER_TOP_P, PAPER_TOP_K = 0.9, 16


@dataclass
class DecodingConfig:
    temperature: float = 1.0
    top_p: float = PAPER_TOP_P
    top_k: int = PAPER_TOP_K  # 0: no top-k truncation
    # tokens below min_p x the top token's probability are cut; 0: off (the paper's third
    # setting, "threshold=0.01", is 0.01)
    min_p: float = 0.0
    max_new_tokens: int = 512
    stop_ids: Optional[List[int]] = None  # None: stop_token_ids() of the tokenizer and model
    # the text around each prompt ({prompt}: the problem), dqo.prompts; None: prompts as stored
    prompt_template: Optional[str] = None
    # the model that sampled the data (dqo.sample's --model): its log-probs are the behaviour's
    sampled_by: Optional[str] = None
    # the system turn in front of every prompt that has none (--system-prompt); None: none
    system_prompt: Optional[str] = None

    def __post_init__(self):
        check_decoding(self)

    def with_stop_ids(self, tokenizer, model=None) -> "DecodingConfig":
        """This config with ``stop_ids`` filled in (kept if already set)."""
        if self.stop_ids is not None:
            return self
        return DecodingConfig(**{**asdict(self), "stop_ids": stop_token_ids(tokenizer, model)})

    def generation_config(self, tokenizer, *, greedy: bool = False):
        """A transformers ``GenerationConfig`` with every knob that changes what is generated
        set explicitly (see the module docstring)."""
        from transformers import GenerationConfig

        if self.stop_ids is None:
            raise ValueError("stop_ids: call with_stop_ids(tokenizer, model) first")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # greedy: the sampling knobs stay unset (transformers warns about set ones it ignores);
        # with the model's own config set aside they can only take the global defaults
        sampling = {} if greedy else dict(temperature=self.temperature, top_p=self.top_p,
                                          top_k=self.top_k, min_p=self.min_p or None)
        return GenerationConfig(
            do_sample=not greedy, num_beams=1, max_new_tokens=self.max_new_tokens,
            min_new_tokens=0, eos_token_id=list(self.stop_ids), pad_token_id=pad,
            repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
            length_penalty=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
            diversity_penalty=0.0, renormalize_logits=False, remove_invalid_values=False,
            output_logits=True, return_dict_in_generate=True, use_cache=True, **sampling)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path) -> None:
        from .atomic import atomic_write
        atomic_write(path, lambda f: f.write(self.to_json() + "\n"))

    @classmethod
    def load(cls, path) -> "DecodingConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable decoding config ({exc})") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) - names:
            raise ValueError(f"{path}: expected an object with fields among {sorted(names)}, "
                             f"got {d!r}")
        return cls(**d)


def check_decoding(d: DecodingConfig) -> None:
    """The same checks at parse time and on a config read from disk."""
    if not (isinstance(d.temperature, (int, float)) and math.isfinite(d.temperature)
            and d.temperature > 0):
        raise ValueError(f"temperature: expected a finite value > 0, got {d.temperature!r}")
    if not (isinstance(d.top_p, (int, float)) and 0 < d.top_p <= 1):
        raise ValueError(f"top_p: expected a value in (0, 1], got {d.top_p!r}")
    if not (isinstance(d.top_k, int) and d.top_k >= 0):
        raise ValueError(f"top_k: expected an integer >= 0 (0: off), got {d.top_k!r}")
    if not (isinstance(d.min_p, (int, float)) and 0 <= d.min_p < 1):
        raise ValueError(f"min_p: expected a value in [0, 1) (0: off), got {d.min_p!r}")
    if not (isinstance(d.max_new_tokens, int) and d.max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens: expected an integer >= 1, got {d.max_new_tokens!r}")
    if d.prompt_template is not None and not (isinstance(d.prompt_template, str)
                                              and d.prompt_template.count("{prompt}") == 1):
        raise ValueError(f"prompt_template: expected text with one {{prompt}} placeholder, got "
                         f"{d.prompt_template!r}")
    if d.system_prompt is not None and not isinstance(d.system_prompt, str):
        raise ValueError(f"system_prompt: expected text, got {d.system_prompt!r}")
    if d.stop_ids is not None and not (isinstance(d.stop_ids, list) and d.stop_ids and all(
            isinstance(i, int) and i >= 0 for i in d.stop_ids)):
        raise ValueError(f"stop_ids: expected a non-empty list of token ids, got {d.stop_ids!r}")


def model_id(model: str) -> str:
    """A model as the decoding record names it: a local directory by its absolute path, a Hub
    id as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def sidecar(data_path) -> Path:
    """Where the decoding config of a data file lives: ``data.jsonl`` -> ``data.decoding.json``."""
    return Path(data_path).with_suffix(".decoding.json")


def find_decoding(*candidates) -> Optional[DecodingConfig]:
    """The first decoding config found at ``candidates`` (files, or directories holding
    ``decoding.json``); None if there is none."""
    for c in candidates:
        if c is None:
            continue
        c = Path(c)
        path = c / "decoding.json" if c.is_dir() else c
        if path.is_file():
            return DecodingConfig.load(path)
    return None


def _ids(x) -> List[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [int(i) for i in x]


def end_of_turn_ids(tokenizer) -> List[int]:
    """The special token the chat template puts after an assistant message (``<|im_end|>``,
    ``<end_of_turn>``, ``<|eot_id|>``...), found by rendering one; [] without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    marker = "Zq7MarkerXv"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False)
    except Exception:  # a template that refuses this conversation: nothing learned from it
        return []
    if marker not in text:
        return []
    after = text.split(marker)[-1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(t, "special", False)}
    for i in ids:
        if i in special:
            return [i]
        if tokenizer.decode([i]).strip():  # text before any special token: no end-of-turn
            return []
    return []


def stop_token_ids(tokenizer, model=None) -> List[int]:
    """Every token that ends a response: the tokenizer's EOS, the EOS ids of the model's
    generation config, and the chat template's end of turn (deduplicated, in that order)."""
    ids = _ids(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    ids += _ids(getattr(gen, "eos_token_id", None))
    ids += end_of_turn_ids(tokenizer)
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model no eos_token_id: "
                         "responses could never end")
    return ids


@contextlib.contextmanager
def own_generation_config(model) -> Iterator[None]:
    """While it runs, the model's ``generation_config`` is an empty one, so that nothing of the
    checkpoint's fills what an explicit config left unset."""
    from transformers import GenerationConfig

    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def format_prompt(tokenizer, prompt, **render) -> str:
    """The prompt as the model sees it: wrapped in the chat template when there is one
    (:func:`dqo.prompts.render_prompt`: ``prompt`` text or messages, ``system_prompt``,
    ``template``)."""
    from .prompts import render_prompt
    return render_prompt(tokenizer, prompt, **render)


def adds_bos(tokenizer) -> bool:
    """True if the tokenizer starts its encodings with BOS (Llama, Gemma; not GPT-2, Qwen)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    # the empty text: a probe every vocabulary can encode (a character may be unknown)
    return bos is not None and tokenizer("")["input_ids"][:1] == [bos]


def encode_prompt(tokenizer, prompt, prefix: str = "", **render) -> List[int]:
    """Token ids of a prompt (and an optional response prefix), as in sampling and training:
    the chat template's text when there is one (it carries its own BOS), else the prompt with
    BOS in front where the tokenizer adds one. ``render``: :func:`format_prompt`'s options."""
    ids = tokenizer(format_prompt(tokenizer, prompt, **render) + prefix,
                    add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if (not getattr(tokenizer, "chat_template", None) and adds_bos(tokenizer)
            and ids[:1] != [bos]):
        ids = [bos] + ids
    return ids


def split_at_stop(ids: Sequence[int], stop_ids: Iterable[int]):
    """(ids up to and including the first stop token, finished?)."""
    stops = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return list(ids[:i + 1]), True
    return list(ids), False

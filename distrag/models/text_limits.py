"""How much text a model can take: characters that safely cover a token limit, cutting token ids,
tokenizing within a budget (:func:`tokenize_within`, the generator's prompts), and the longest answer that
leaves room for a prompt (:func:`check_answer_length`).

Tokenizing a text of megabytes costs seconds even when only the first ``max_length`` tokens are kept, so
texts are cut by characters first: no token is longer than the tokenizer's longest vocabulary entry, so
``max_length`` tokens never span more than ``max_length`` x that many characters; :func:`char_limit`
keeps twice that, so the tokens that are kept are the same as without the cut.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache

from distrag.errors import GeneratorError

log = logging.getLogger(__name__)

MIN_PROMPT_TOKENS = 64
"""Positions an answer must leave to the prompt (chat template, passages, question): ``max_new_tokens`` is at
most the model's ``max_position_embeddings`` minus this. More cannot work (the prompt could not be cut to fit)
and ran for minutes with no warning (issue 19: 100000 new tokens on a 4096-position model)."""


@lru_cache(maxsize=16)
def _longest_token(tokenizer) -> int:
    """Characters of the longest entry of ``tokenizer``'s vocabulary (at least 1)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def char_limit(tokenizer, n_tokens: int) -> int:
    """Characters a text may be cut to without changing its first ``n_tokens`` tokens."""
    return 2 * n_tokens * _longest_token(tokenizer) + 64


def cut_chars(text: str, limit: int, *, keep_tail: bool = False) -> str:
    """``text`` if it fits in ``limit`` characters; else its head, or with ``keep_tail`` its head and its last
    quarter (the middle goes)."""
    if len(text) <= limit:
        return text
    if not keep_tail:
        return text[:limit]
    tail = limit // 4
    return text[:limit - tail] + text[len(text) - tail:]


def cut_middle(ids: list[int], budget: int) -> list[int]:
    """``ids`` if they fit in ``budget``; else the head and the last quarter of the budget (the middle goes)."""
    if len(ids) <= budget:
        return ids
    tail = budget // 4
    return ids[:budget - tail] + ids[len(ids) - tail:]


def tokenize_within(tokenizer, texts: Sequence[str], budget: int | None, *, add_special_tokens: bool = True,
                    name: str = "") -> list[list[int]]:
    """Token ids of ``texts``, each at most ``budget`` long (None: no limit): cut by characters first (see
    the module docstring), then by ids, the middle going (the head, e.g. a prompt's instructions and
    passages, and the last quarter, the question's end and the answer's start, stay); a warning says so."""
    if budget is not None and budget >= 8:
        limit = char_limit(tokenizer, budget)
        texts = [cut_chars(t, limit, keep_tail=True) for t in texts]
    rows = [list(x) for x in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]
    if budget is not None and budget >= 8 and any(len(r) > budget for r in rows):
        log.warning("%s: a prompt of %d tokens was cut to the model's limit of %d (its middle)", name,
                    max(map(len, rows)), budget)
        rows = [cut_middle(r, budget) for r in rows]
    return rows


def answer_length_problem(max_new_tokens: int, model_config, what: str = "generator.max_new_tokens") -> str | None:
    """Why ``max_new_tokens`` cannot fit a model of ``model_config``'s positions; None when it fits or the model
    does not say how many positions it has."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0 or max_new_tokens <= positions - MIN_PROMPT_TOKENS:
        return None
    return (f"{what}={max_new_tokens} but the model holds {positions} positions (prompt + answer): use at most "
            f"{max(positions - MIN_PROMPT_TOKENS, 1)}, leaving {MIN_PROMPT_TOKENS} for the prompt")


def check_answer_length(max_new_tokens: int, model_config, name: str, what: str = "max_new_tokens") -> int:
    """``max_new_tokens``, or a :class:`GeneratorError` naming the model ``name`` (:func:`answer_length_problem`)."""
    if problem := answer_length_problem(max_new_tokens, model_config, what):
        raise GeneratorError(f"{name}: {problem}")
    return max_new_tokens

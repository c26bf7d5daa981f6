"""Cutting texts of megabytes before tokenizing keeps the tokens a model would keep; cutting ids keeps the
head and the last quarter."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from distrag.models.text_limits import char_limit, cut_chars, cut_middle


@pytest.fixture(scope="module")
def tok(tiny_encoder_dir):
    return AutoTokenizer.from_pretrained(tiny_encoder_dir)


def test_the_character_cut_keeps_the_first_tokens(tok):
    text = "Which city was she born in? " * 20_000 + "the end"
    limit = char_limit(tok, 64)
    cut = cut_chars(text, limit)
    assert len(cut) == limit < len(text)
    full = tok(text, truncation=True, max_length=64)["input_ids"]
    assert tok(cut, truncation=True, max_length=64)["input_ids"] == full


def test_short_texts_and_ids_are_kept_whole():
    assert cut_chars("abc", 3) == "abc" and cut_middle([1, 2, 3], 3) == [1, 2, 3]


def test_cutting_the_middle():
    assert cut_chars("a" * 10 + "b" * 10, 8, keep_tail=True) == "aaaaaabb"
    assert cut_middle(list(range(100)), 8) == [0, 1, 2, 3, 4, 5, 98, 99]


def test_the_answer_must_leave_room_for_a_prompt():
    from types import SimpleNamespace

    from distrag.errors import GeneratorError
    from distrag.models.text_limits import MIN_PROMPT_TOKENS, answer_length_problem, check_answer_length

    model = SimpleNamespace(max_position_embeddings=512)
    assert answer_length_problem(512 - MIN_PROMPT_TOKENS, model) is None
    assert "at most 448" in answer_length_problem(449, model)
    assert answer_length_problem(10**6, SimpleNamespace()) is None  # a model that does not say: nothing to check
    with pytest.raises(GeneratorError, match=r"tiny: max_new_tokens=600 but the model holds 512 positions"):
        check_answer_length(600, model, "tiny")

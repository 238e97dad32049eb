"""fm.words: the true/false words of command lines, and parse_bool."""

from __future__ import annotations

import pytest

from fm.words import FALSE_WORDS, TRUE_WORDS, parse_bool


def test_the_words():
    assert TRUE_WORDS == {"true", "1", "yes", "on", "t", "y"}
    assert FALSE_WORDS == {"false", "0", "no", "off", "f", "n"}
    assert isinstance(TRUE_WORDS, frozenset) and isinstance(FALSE_WORDS, frozenset)


@pytest.mark.parametrize("text", ["true", "True", " YES ", "1", "on", "t", "Y"])
def test_true(text):
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["false", "False", " no ", "0", "OFF", "f", "n", "", "  "])
def test_false_and_empty(text):
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["2", "maybe", "truee", "-1", "none"])
def test_anything_else_is_none(text):
    assert parse_bool(text) is None

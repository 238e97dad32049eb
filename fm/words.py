"""The words a command line may write a boolean with (``--streamer False``, ``--offload yes``): one list for every
parser of such text."""

from __future__ import annotations

TRUE_WORDS = frozenset({"true", "1", "yes", "on", "t", "y"})
FALSE_WORDS = frozenset({"false", "0", "no", "off", "f", "n"})


def parse_bool(text: str) -> bool | None:
    """True or False for a word of :data:`TRUE_WORDS` or :data:`FALSE_WORDS` (any case, blanks around it
    ignored); an empty value (``--flag ''``) is False. None for any other text: the caller refuses it in its own
    words."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if not word or word in FALSE_WORDS:
        return False
    return None

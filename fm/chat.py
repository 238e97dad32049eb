"""Chat formats: the text a conversation becomes for the model, in one place.

:func:`render` is what ``fm generate --template`` (and the SFT transforms' format) feeds the model;
:func:`jinja_template` is the same format as the Jinja ``chat_template`` an export carries in
``tokenizer_config.json``, so ``tokenizer.apply_chat_template`` and vLLM's ``/v1/chat/completions`` build
exactly the same token ids (the template starts with the BOS token, which fm prepends; tokenizers apply a
chat template without adding special tokens). tests/unit/test_chat.py pins the two against each other.

* ``fm9g``: upstream FM9G's ``<用户>question<AI>answer<用户>question<AI>…`` (MiniCPM's markers); a system
  message is put in front as it is.
* ``spark``: iFlytekSpark's ``<User> question<end><Bot> answer<end><User> …<end><Bot> `` with newlines and
  tabs written as Spark's tokenizer expects them (``<ret>``, ``<tab>``).
* ``none``: the contents back to back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

FORMATS = ("none", "fm9g", "spark")
ROLES = ("system", "user", "assistant")


def spark_text(text: str) -> str:
    """Newlines and tabs as Spark's tokenizer spells them."""
    return text.replace("\r\n", "\n").replace("\n", "<ret>").replace("\t", "<tab>")


def from_spark_text(text: str) -> str:
    """Spark's ``<ret>`` / ``<tab>`` back as newlines and tabs (in what the model generates)."""
    return text.replace("<ret>", "\n").replace("<tab>", "\t")


def _check(messages: Sequence[Mapping[str, str]], fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown chat format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: expected {{'role': one of {', '.join(ROLES)}, 'content': str}}, got {m!r}")


def render(messages: Sequence[Mapping[str, str]], fmt: str) -> str:
    """The text of a conversation (without BOS) that the model continues with the next assistant turn."""
    _check(messages, fmt)
    parts = []
    for m in messages:
        role, content = m["role"], m["content"]
        if fmt == "fm9g":
            parts.append(f"<用户>{content}<AI>" if role == "user" else content)
        elif fmt == "spark":
            content = spark_text(content)
            parts.append(f"<User> {content}<end><Bot> " if role == "user" else
                         f"{content}<end>" if role == "assistant" else content)
        else:
            parts.append(content)
    return "".join(parts)


def render_prompt(question: str, fmt: str) -> str:
    """One user turn: what ``fm generate --template FMT --prompt QUESTION`` feeds the model."""
    return render([{"role": "user", "content": question}], fmt)


_JINJA = {
    "none": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "fm9g": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<用户>' + m['content'] + '<AI>' }}"
            "{% else %}{{ m['content'] }}{% endif %}{% endfor %}",
    "spark": "{{ bos_token }}{% for m in messages %}"
             "{% set c = m['content'] | replace('\\r\\n', '\\n') | replace('\\n', '<ret>') | replace('\\t', '<tab>') %}"
             "{% if m['role'] == 'user' %}{{ '<User> ' + c + '<end><Bot> ' }}"
             "{% elif m['role'] == 'assistant' %}{{ c + '<end>' }}{% else %}{{ c }}{% endif %}{% endfor %}",
}


def jinja_template(fmt: str) -> str:
    """The Jinja ``chat_template`` of format ``fmt`` (its text is :func:`render`'s, after the BOS token).

    The generation prompt is part of every user turn in these formats, so ``add_generation_prompt`` changes
    nothing.
    """
    if fmt not in _JINJA:
        raise ValueError(f"unknown chat format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return _JINJA[fmt]

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

And a tokenizer's own Jinja ``chat_template`` (a Hugging Face tokenizer carries one in ``tokenizer_config.json``):
:func:`render_jinja` renders it as transformers' ``apply_chat_template`` does (``fm generate --template auto``,
SFT data in ``messages`` form: docs/mixtures.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

FORMATS = ("none", "fm9g", "spark")
AUTO = "auto"  # fm generate --template auto: the tokenizer's chat_template if it has one, else "none"
TEMPLATE = "template"  # what AUTO resolves to when the tokenizer carries a Jinja chat_template


def resolve_format(fmt: str, chat_template: str | None) -> str:
    """``auto`` → :data:`TEMPLATE` when the tokenizer has a ``chat_template``, else ``none``; other formats as given."""
    if fmt == AUTO:
        return TEMPLATE if chat_template else "none"
    return fmt
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


# ------------------------------------------------------------------------------------------------ Jinja templates
_COMPILED: dict[str, object] = {}


def _compile(template: str):
    """A chat template compiled as transformers compiles it (utils/chat_template_utils.py): a sandboxed, immutable
    environment with ``trim_blocks``/``lstrip_blocks``, the loop controls, ``raise_exception``, ``strftime_now`` and
    a ``tojson`` that keeps non-ASCII text."""
    compiled = _COMPILED.get(template)
    if compiled is not None:
        return compiled
    import json
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    compiled = _COMPILED[template] = env.from_string(template)
    return compiled


# Chat templates that put today's date into the prompt (Llama-3.2/3.3: ``strftime_now("%d %b %Y")``) render the
# same text every day for training (exact resume, the same sample on every epoch): the date transformers' Llama
# templates fall back to when strftime_now is not defined. fm generate renders with the real date.
TRAINING_DATE = (2024, 7, 26)  # "26 Jul 2024"


def training_strftime_now(fmt: str) -> str:
    """``strftime_now`` for training renders: :data:`TRAINING_DATE` (noon), whatever the day."""
    from datetime import datetime

    return datetime(*TRAINING_DATE, 12, 0, 0).strftime(fmt)


def render_jinja(template: str, messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool = False,
                 **variables: object) -> str:
    """A conversation rendered with the Jinja chat ``template``, as transformers'
    ``apply_chat_template(..., tokenize=False)`` renders it: keys whose value is None are dropped from the messages
    (transformers does: templates test ``is defined``), ``tools`` and ``documents`` are None unless ``variables``
    give them (``{% if tools is not none %}`` is then false, as in transformers: an undefined variable would make it
    true), then ``variables`` as given (``bos_token``, ``eos_token``, ...; a variable whose value is None is passed
    as None, not dropped). ``strftime_now`` in ``variables``
    replaces the real clock (:func:`training_strftime_now`). A template that calls ``raise_exception`` raises
    ValueError with its message."""
    import jinja2

    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i}: expected {{'role': str, 'content': ...}}, got {m!r}")
        msgs.append({k: v for k, v in m.items() if v is not None})
    context = {"tools": None, "documents": None, **variables}
    try:
        return _compile(template).render(messages=msgs, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e}") from e

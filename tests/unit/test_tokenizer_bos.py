"""BOS and EOS as transformers makes them, for each Hugging Face convention (tests.support.hf_fixtures styles):

* plain text (the packer, ``fm generate`` without a template, eval scoring) gets a BOS iff the tokenizer's own
  post-processor adds one (``add_bos``: Llama-3 yes; GPT-2 with bos = eos = ``<|endoftext|>``, Qwen: no);
* a chat-template conversation (``messages_key`` samples, ``fm generate`` with a template) is exactly the template's
  ids (``apply_chat_template``: the rendered text tokenized without special tokens), a BOS only if it writes one;
* a ``messages_key`` answer ends at its last EOS, which the packer's EOS label replaces (trained once);
* training renders are dated :data:`fm.chat.TRAINING_DATE` (exact resume); ``fm generate`` renders today's date;
* :func:`fm.chat.render_jinja` passes ``tools``/``documents`` None and keeps None-valued keys, as transformers does.
"""

from __future__ import annotations

import json

import pytest

from fm.constants import IGNORE_INDEX
from fm.tokenizer import load_tokenizer
from tests.helpers import make_mixture, record_generate_prompts
from tests.support.hf_fixtures import BEGIN, ENDOFTEXT, EOT, IM_END, build_hf_tokenizer

transformers = pytest.importorskip("transformers")

TEXT = "Hello, world! 你好"
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! 你好。"}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("styles")
    return {style: build_hf_tokenizer(root / style, style=style) for style in ("qwen", "llama3", "gpt2")}


def _auto(d):
    return transformers.AutoTokenizer.from_pretrained(str(d))


def _rows(batch):
    out = []
    cu = batch["cu_seqlens"].tolist()
    flat_in, flat_tg = batch["inputs"].reshape(-1).tolist(), batch["targets"].reshape(-1).tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        if batch["task_ids"].reshape(-1)[a] >= 0:
            out.append((flat_in[a:b], flat_tg[a:b]))
    return out


@pytest.mark.parametrize("style,adds", [("llama3", True), ("gpt2", False), ("qwen", False)])
def test_add_bos_is_what_the_post_processor_adds(dirs, style, adds):
    tok, auto = load_tokenizer(dirs[style]), _auto(dirs[style])
    assert tok.add_bos is adds
    assert tok.encode(TEXT, bos=True) == auto(TEXT).input_ids  # add_special_tokens=True: transformers' BOS
    assert tok.encode(TEXT) == auto(TEXT, add_special_tokens=False).input_ids
    if style == "gpt2":
        assert tok.bos_id == tok.eos_id == tok.piece_to_id(ENDOFTEXT)  # it has a BOS, but adds none
    if style == "llama3":
        assert tok.bos_id == tok.piece_to_id(BEGIN)


@pytest.mark.parametrize("style", ["llama3", "gpt2"])
def test_plain_text_samples_and_eval_scoring_bos(dirs, style, tmp_path):
    from fm.data.loader import build_train_loader
    from fm.eval.scoring import sample_tokens

    tok, auto = load_tokenizer(dirs[style]), _auto(dirs[style])
    cfg = make_mixture(tmp_path, {"t": ([{"input": "", "output": TEXT}], {"allow_repeat": False})})
    (tokens, targets), = [s for b in build_train_loader(cfg, tok, batch_size=1, max_length=64, seed=0)
                          for s in _rows(b)]
    assert tokens == auto(TEXT).input_ids and targets == tokens[1:] + [tok.eos_id]
    src, tgt = sample_tokens(tok, {"input": "Q: ", "output": TEXT}, "x")
    want = auto("Q: ").input_ids + auto(TEXT, add_special_tokens=False).input_ids
    assert src == want and len(tgt) == len(src) and tgt[-1] == tok.eos_id
    n_in = len(auto("Q: ").input_ids)
    assert tgt[:n_in - 1] == [IGNORE_INDEX] * (n_in - 1) and tgt[n_in - 1] == src[n_in]


def test_llama3_conversation_is_the_templates_ids_one_bos_eos_once(dirs, tmp_path, monkeypatch):
    from datetime import datetime

    import transformers.utils.chat_template_utils as ctu

    from fm.chat import TRAINING_DATE
    from fm.data.loader import build_train_loader

    class Then(datetime):  # transformers' strftime_now on the training date
        @classmethod
        def now(cls, tz=None):
            return datetime(*TRAINING_DATE, 12)

    monkeypatch.setattr(ctu, "datetime", Then)

    tok, auto = load_tokenizer(dirs["llama3"]), _auto(dirs["llama3"])
    cfg = make_mixture(tmp_path, {"chat": ([{"messages": CONV}], {"allow_repeat": False, "messages_key": "messages"})})
    (tokens, targets), = [s for b in build_train_loader(cfg, tok, batch_size=1, max_length=128, seed=0)
                          for s in _rows(b)]
    # transformers with the training date; its ids end in the answer's <|eot_id|> (the EOS): nothing to drop
    want = auto.apply_chat_template(CONV, tokenize=True, return_dict=False)
    prompt = auto.apply_chat_template(CONV[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert want[0] == tok.bos_id and want[1] != tok.bos_id and want[-1] == tok.eos_id == tok.piece_to_id(EOT)
    assert tokens == want[:-1]  # one BOS (the template's), the packer adds none
    k = len(prompt)
    assert targets[:k - 1] == [IGNORE_INDEX] * (k - 1) and targets[k - 1:] == want[k:]
    assert "Today Date: 26 Jul 2024" in tok.decode(tokens)  # fixed: the same sample every day (exact resume)


def test_output_without_the_eos_is_kept(dirs, tmp_path):
    """Qwen base: EOS <|endoftext|>, turns end with <|im_end|>: the answer keeps its <|im_end|>\\n, then the EOS."""
    from fm.data.loader import build_train_loader

    tok = load_tokenizer(dirs["qwen"])
    tok.eos_id = tok.piece_to_id(ENDOFTEXT)
    cfg = make_mixture(tmp_path, {"chat": ([{"messages": CONV}], {"allow_repeat": False, "messages_key": "messages"})})
    (tokens, targets), = [s for b in build_train_loader(cfg, tok, batch_size=1, max_length=128, seed=0)
                          for s in _rows(b)]
    assert tokens == tok.encode(tok.apply_chat_template(CONV))
    assert tokens[-2:] == tok.encode(f"{IM_END}\n") and targets[-1] == tok.eos_id


def test_generate_bos_with_and_without_a_template(dirs, tmp_path, monkeypatch, capsys):
    from datetime import datetime

    from fm import generate as gen
    from tests.unit.test_generate import DRAGONFLY

    seen = record_generate_prompts(monkeypatch)
    (tmp_path / "m.json").write_text(json.dumps({**DRAGONFLY, "vocab_size": 600}))
    for style in ("llama3", "gpt2"):
        d = dirs[style]
        auto = _auto(d)
        args = ["--config", str(tmp_path / "m.json"), "--tokenizer", str(d), "--max-new-tokens", "2", "--device",
                "cpu", "--seed", "0", "--prompt", "Hello"]
        seen.clear()
        assert gen.main([*args, "--template", "none"]) == 0
        assert gen._to_prompts(seen, load_tokenizer(d), True) == [auto("Hello").input_ids]  # BOS iff add_bos
        if style == "llama3":
            seen.clear()
            assert gen.main([*args, "--template", "auto"]) == 0
            want = auto.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=True,
                                            add_generation_prompt=True, return_dict=False)
            assert seen == [want] and want.count(load_tokenizer(d).bos_id) == 1
            assert datetime.now().strftime("%d %b %Y") in load_tokenizer(d).decode(want)  # generate: today's date
    capsys.readouterr()


MISTRAL_LIKE = (
    "{%- if tools is not none %}{{- '[AVAILABLE_TOOLS]' + tools|tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['tool_calls'] is defined %}{{- '[CALLS:' + (m['tool_calls'] is none)|string + ']' }}{%- endif %}"
    "{{- '[' + m['role'] + ']' + m['content'] }}{%- endfor %}"
    "{%- if documents is not none %}{{- '[DOCS]' }}{%- endif %}"
)


def test_render_jinja_as_transformers_tools_documents_and_none_keys(dirs, tmp_path):
    import shutil

    from fm.chat import render_jinja

    d = tmp_path / "mistral"
    shutil.copytree(dirs["qwen"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = MISTRAL_LIKE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    auto = _auto(d)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "tool_calls": None}]
    want = auto.apply_chat_template(msgs, tokenize=False)
    assert render_jinja(MISTRAL_LIKE, msgs) == want == "[user]hi[assistant]yo"  # the None key dropped, as there
    assert load_tokenizer(d).apply_chat_template(msgs) == want
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert render_jinja(MISTRAL_LIKE, msgs, tools=tools) == auto.apply_chat_template(msgs, tools=tools,
                                                                                     tokenize=False)
    assert render_jinja("{{ x is none }}|{{ y is defined }}", msgs, x=None) == "True|False"  # None kept as None


# ------------------------------------------------------------------------------------------- threads
class _Counting:
    """A tokenizers.Tokenizer stand-in that counts batch calls (the library's thread pool) and forwards the rest."""

    def __init__(self, tk):
        self.tk, self.batches = tk, 0

    def encode_batch(self, *a, **kw):
        self.batches += 1
        return self.tk.encode_batch(*a, **kw)

    def encode_batch_fast(self, *a, **kw):
        self.batches += 1
        return self.tk.encode_batch_fast(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.tk, name)


def test_one_thread_never_uses_the_librarys_pool(dirs, monkeypatch):
    tok = load_tokenizer(dirs["qwen"])
    texts = [TEXT, "two words", "中文 and more", ""]
    want = [tok.tk.encode(t, add_special_tokens=False).ids for t in texts]
    spy = _Counting(tok.tk)
    tok.tk, tok._batch = spy, spy.encode_batch_fast
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    assert [a.tolist() for a in tok.encode_batch_arrays(texts)] == want  # threads=1: one text at a time
    assert [a.tolist() + b.tolist() for a, b in tok.encode_split(texts, [3] * 4)] == want
    assert spy.batches == 0
    assert [a.tolist() for a in tok.encode_batch_arrays(texts, threads=4)] == want and spy.batches == 1
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # the pool is off: one batch call, in this thread
    assert [a.tolist() for a in tok.encode_batch_arrays(texts)] == want and spy.batches == 2


def test_loader_workers_turn_the_librarys_pool_off(dirs, tmp_path, monkeypatch):
    from fm.data.loader import build_train_loader

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    script = tmp_path / "env.py"
    script.write_text("import os\n\ndef transform(data, num_sample, r):\n"
                      "    return {'input': '', 'output': os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}\n")
    cfg = make_mixture(tmp_path, {"t": ([{"x": 1}], {"allow_repeat": False, "transforms": str(script)})})
    tok = load_tokenizer(dirs["qwen"])
    for workers, seen in ((1, "false"), (0, "unset")):  # in-process: the process's setting is left alone
        (tokens, _), = [s for b in build_train_loader(cfg, tok, batch_size=1, max_length=16, seed=0,
                                                      num_workers=workers) for s in _rows(b)]
        assert tok.decode(tokens) == seen

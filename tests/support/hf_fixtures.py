"""A small Hugging Face tokenizer directory built on the spot, for tests (and benchmarks) that need one.

:func:`build_hf_tokenizer` trains a byte-level BPE with the ``tokenizers`` library on a few KB of English and Chinese
text and writes a Qwen-style tokenizer directory: ``tokenizer.json`` with the added special tokens
``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (ids :data:`ENDOFTEXT`, :data:`IM_START`, :data:`IM_END`: the
first three ids), and ``tokenizer_config.json`` with no BOS (``bos_token: null``), EOS ``<|im_end|>``, pad
``<|endoftext|>``, the added tokens and a ChatML ``chat_template`` (:data:`CHATML`). Deterministic: the same
arguments give the same files. Only ``tokenizers`` is needed (transformers can load the result:
``AutoTokenizer.from_pretrained(dir)``).

    from tests.support.hf_fixtures import build_hf_tokenizer
    tok_dir = build_hf_tokenizer(tmp_path / "tok")          # -> tmp_path / "tok" (a directory)
    tok_dir = build_hf_tokenizer(tmp_path / "tok", vocab_size=8000, texts=my_lines)

``style`` picks the BOS convention (what fm's ``add_bos`` follows, as transformers does):

* ``"qwen"`` (default): no BOS at all;
* ``"llama3"``: BOS ``<|begin_of_text|>`` added by the post-processor (``TemplateProcessing``), EOS ``<|eot_id|>``, a
  Llama-3.2-style template that writes ``{{ bos_token }}`` and today's date (``strftime_now``) in the system header
  (:data:`LLAMA3`);
* ``"gpt2"``: ``bos_token = eos_token = <|endoftext|>`` and no post-processor (nothing added to text), no template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = (ENDOFTEXT, IM_START, IM_END)

# Qwen2's ChatML template, shortened (no tools): a default system message, <|im_start|>role\ncontent<|im_end|>\n.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BEGIN, END_TEXT, HEADER_START, HEADER_END, EOT = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                  "<|end_header_id|>", "<|eot_id|>")
LLAMA3_SPECIALS = (BEGIN, END_TEXT, HEADER_START, HEADER_END, EOT)

# Llama-3.2's template, shortened (no tools): the BOS, a system header with today's date, the turns.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Training a language model needs data, a tokenizer, a model and an optimizer.",
    "def main(argv):\n    return 0\n\nif __name__ == '__main__':\n    main(None)\n",
    "中国的首都是北京。北京是一座历史悠久的城市，有很多名胜古迹。",
    "今天天气很好，我们去公园散步吧。机器学习和深度学习是人工智能的重要方向。",
    "你好，世界！大语言模型的训练需要大量的数据和计算资源。",
    "Numbers 0123456789, punctuation: !?;:'\"()[]{} and tabs\there.",
    "Hello, how are you? I am fine, thank you. 你好吗？我很好，谢谢。",
]


def build_hf_tokenizer(directory: str | Path, vocab_size: int = 600, texts: Iterable[str] | None = None,
                       style: str = "qwen") -> Path:
    """Write an HF tokenizer directory at ``directory`` (created) and return it.

    ``vocab_size``: the BPE's target size (the added tokens included; the corpus must be large enough to reach it);
    ``texts``: the training text (default: :data:`SAMPLE_TEXT` repeated, a few KB of English and Chinese);
    ``style``: ``qwen``, ``llama3`` or ``gpt2`` (the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = {"qwen": SPECIALS, "llama3": LLAMA3_SPECIALS, "gpt2": (ENDOFTEXT,)}[style]
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) if texts is not None else SAMPLE_TEXT * 20, trainer=trainer)
    if style == "llama3":
        bos = tok.token_to_id(BEGIN)
        tok.post_processor = processors.TemplateProcessing(single=f"{BEGIN} $A", pair=f"{BEGIN} $A {BEGIN} $B:1",
                                                           special_tokens=[(BEGIN, bos)])
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in specials}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHATML,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
    }
    if style == "llama3":
        config.update(bos_token=BEGIN, eos_token=EOT, pad_token=None, additional_special_tokens=[],
                      chat_template=LLAMA3)
    elif style == "gpt2":
        config.update(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=None, additional_special_tokens=[])
        del config["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return out

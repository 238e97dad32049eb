"""Generation: logits processors against Hugging Face, Spark's penalty, the streaming detokenizer,
and KV-cache decoding against full recomputation on tiny dragonfly and spark models."""

from __future__ import annotations

import random

import pytest
import torch

from fm.generate import (
    GenerationConfig,
    StreamingDetokenizer,
    apply_subtractive_penalty,
    process_logits,
)

# ------------------------------------------------------------------------------ processors


def _hf_process(logits, input_ids, cfg):
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    if cfg.repetition_penalty is not None:
        logits = RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(input_ids, logits)
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            logits = TemperatureLogitsWarper(cfg.temperature)(input_ids, logits)
        if cfg.top_k:
            logits = TopKLogitsWarper(cfg.top_k)(input_ids, logits)
        if cfg.top_p < 1.0:
            logits = TopPLogitsWarper(cfg.top_p)(input_ids, logits)
    return logits


@pytest.mark.parametrize("opts", [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),
    dict(do_sample=True, temperature=0.7, top_k=5),
    dict(do_sample=True, top_p=0.8),
    dict(do_sample=True, temperature=1.5, top_k=20, top_p=0.9, repetition_penalty=1.2),
])
def test_processors_match_hugging_face(opts):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    input_ids = torch.randint(0, 50, (3, 12), generator=g)
    cfg = GenerationConfig(**opts)
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen.scatter_(1, input_ids, True)
    ours = process_logits(logits, cfg, seen=seen)
    ref = _hf_process(logits.clone(), input_ids, cfg)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=0, atol=1e-6)


def test_subtractive_penalty_counts_generated_tokens():
    logits = torch.zeros(1, 6)
    counts = torch.tensor([[0, 1, 2, 3, 0, 1]])
    out = apply_subtractive_penalty(logits, counts, 1.0, 0.1)
    torch.testing.assert_close(out, torch.tensor([[0.0, -1.0, -1.1, -1.2, 0.0, -1.0]]))
    out = apply_subtractive_penalty(logits, counts, 0.5, 0.25)
    torch.testing.assert_close(out, torch.tensor([[0.0, -0.5, -0.75, -1.0, 0.0, -0.5]]))


# ------------------------------------------------------------------------------ detokenizer

TEXTS = [
    "Hello world, 你好，世界！ 😀 emoji ∑ math é à",
    "  two leading spaces\n\tand tabs\n新的一行：中文测试。",
    "<用户>hi<AI>答：好的<end>",
    "def f(x):\n    return x ** 2  # comment",
]


def test_streaming_detokenizer_never_splits_characters(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=True)
        assert any(tokenizer.is_byte(i) for i in ids) or "<" in text
        det = StreamingDetokenizer(tokenizer)
        pieces = [det.push(i) for i in ids] + [det.flush()]
        assert "".join(pieces) == tokenizer.decode(ids)
        assert all("\ufffd" not in p for p in pieces)
        # every non-empty piece is valid text that the full decode continues
        acc = ""
        for p in pieces:
            acc += p
            assert tokenizer.decode(ids).startswith(acc)


def test_streaming_detokenizer_holds_back_byte_pieces(tokenizer):
    ids = tokenizer.encode("😀", bos=False)
    byte_ids = [i for i in ids if tokenizer.is_byte(i)]
    assert len(byte_ids) == 4  # the demo vocabulary has no emoji: 4 byte-fallback pieces
    det = StreamingDetokenizer(tokenizer)
    outs = [det.push(i) for i in ids]
    assert outs[:-1] == ["", "", ""] and outs[-1] == "😀"


def test_streaming_detokenizer_random_ids(tokenizer):
    rng = random.Random(0)
    byte_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_byte(i)]
    for _ in range(30):
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(tokenizer.vocab_size)
               for _ in range(rng.randrange(1, 40))]
        det = StreamingDetokenizer(tokenizer)
        text = "".join(det.push(i) for i in ids) + det.flush()
        assert text == tokenizer.decode(ids)


def test_streaming_detokenizer_continues_after_flush(tokenizer):
    ids = tokenizer.encode("Hello world again", bos=False)
    det = StreamingDetokenizer(tokenizer)
    text = "".join(det.push(i) for i in ids[:1]) + det.flush()
    text += "".join(det.push(i) for i in ids[1:]) + det.flush()
    assert text == tokenizer.decode(ids)

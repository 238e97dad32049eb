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
    generate,
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


# ------------------------------------------------------------------------------ decoding with models

DRAGONFLY = {"vocab_size": 8000, "dim_model": 64, "dim_ff": 96, "dim_head": 16, "num_heads": 4, "num_kv_heads": 2,
             "num_layers": 2, "init_std": 0.5, "scale": True, "scale_emb": 4.0, "scale_depth": 1.4,
             "dim_model_base": 32, "tie_lm_head": True, "dtype": "fp32"}
SPARK = {"vocab_size": 8000, "dim_model": 64, "dim_ff": 96, "dim_head": 16, "num_heads": 4, "num_kv_heads": 4,
         "num_layers": 2, "sliding_window": 8, "init_std": 0.5, "dtype": "fp32"}


def _tiny(family, seed=0, **overrides):
    from fm.models.registry import build_model, load_model_config

    cfg = load_model_config({**(DRAGONFLY if family == "dragonfly" else SPARK), **overrides}, family)
    torch.manual_seed(seed)
    return build_model(cfg, device="cpu", dtype=torch.float32).eval()


def _prompts(lengths, seed=0, vocab=8000):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(10, vocab, (n - 1,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _naive(model, prompt, n, penalty=None):
    """Independent reference: full recomputation, one prompt at a time, penalty applied by hand."""
    ids = list(prompt)
    counts: dict[int, int] = {}
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1].float().clone()
        if penalty == "hf":
            for t in set(ids):
                logits[t] = logits[t] / 1.8 if logits[t] > 0 else logits[t] * 1.8
        elif penalty == "spark":
            for t, c in counts.items():
                logits[t] -= 2.0 + 0.5 * (c - 1)
        tok = int(logits.argmax())
        ids.append(tok)
        out.append(tok)
        counts[tok] = counts.get(tok, 0) + 1
    return out


@pytest.mark.parametrize("family,lengths", [("dragonfly", [3, 9, 5]), ("spark", [4, 19, 13])])
def test_cached_greedy_equals_recompute(family, lengths):
    model = _tiny(family)
    prompts = _prompts(lengths)
    cached = generate(model, prompts, max_new_tokens=20)
    recomputed = generate(model, prompts, max_new_tokens=20, use_cache=False)
    assert cached == recomputed
    assert all(len(o) == 20 for o in cached)
    # each row alone (no padding at all) gives the same tokens as the batch
    for p, o in zip(prompts, cached):
        assert generate(model, [p], max_new_tokens=20) == [o]
    assert cached[0] == _naive(model, prompts[0], 20)


def test_spark_rolling_cache_beyond_window():
    model = _tiny("spark", seed=1)
    prompt = _prompts([30], seed=3)[0]  # 30 > window 8: the rolling buffer wraps in prefill and decode
    assert generate(model, [prompt], max_new_tokens=15) == [_naive(model, prompt, 15)]


@pytest.mark.parametrize("mode", ["hf", "spark"])
def test_repetition_penalties_in_the_loop(mode):
    model = _tiny("dragonfly", seed=2, vocab_size=40)  # a small vocabulary repeats within 16 tokens
    prompt = _prompts([6], seed=4, vocab=40)[0]
    opts = (dict(repetition_penalty=1.8) if mode == "hf" else
            dict(repetition_penalty=2.0, repetition_penalty_mode="subtractive", repetition_penalty_increase=0.5))
    ref = _naive(model, prompt, 16, penalty=mode)
    assert generate(model, [prompt], max_new_tokens=16, **opts) == [ref]
    assert generate(model, [prompt], max_new_tokens=16, use_cache=False, **opts) == [ref]
    assert ref != _naive(model, prompt, 16)  # the penalty changed something


def test_stop_tokens_and_max_new_tokens():
    model = _tiny("dragonfly")
    prompts = _prompts([4, 7])
    full = generate(model, prompts, max_new_tokens=10)
    stop = full[0][3]
    out = generate(model, prompts, max_new_tokens=10, stop_token_ids=(stop,))
    assert out[0] == full[0][:full[0].index(stop)]
    assert out[1] == (full[1][:full[1].index(stop)] if stop in full[1] else full[1])
    assert generate(model, prompts, max_new_tokens=0) == [[], []]


def test_seeded_sampling_is_deterministic():
    model = _tiny("spark")
    prompts = _prompts([5, 12])
    opts = dict(do_sample=True, temperature=1.3, top_k=50, top_p=0.95, max_new_tokens=12)
    a = generate(model, prompts, seed=7, **opts)
    assert a == generate(model, prompts, seed=7, **opts)
    assert a != generate(model, prompts, seed=8, **opts)
    # top_k=1 sampling is greedy
    assert generate(model, prompts, do_sample=True, top_k=1, seed=1, max_new_tokens=12) == \
        generate(model, prompts, max_new_tokens=12)


def test_text_prompts_and_streaming(tokenizer):
    model = _tiny("dragonfly")
    texts = ["你好，世界", "Hello there, how are you"]
    pieces: dict[int, list[str]] = {0: [], 1: []}
    ends = []

    def stream(row, tid, text):
        pieces[row].append(text)
        if tid is None:
            ends.append(row)

    outs = generate(model, texts, tokenizer=tokenizer, max_new_tokens=25, stream=stream)
    assert sorted(ends) == [0, 1]
    for row, out in enumerate(outs):
        assert "".join(pieces[row]) == tokenizer.decode(out)
        assert all("\ufffd" not in p for p in pieces[row][:-1])
    assert outs == generate(model, [tokenizer.encode(t, bos=True) for t in texts], max_new_tokens=25)


def test_cli_spark_template_batch_file(tmp_path, tokenizer, tokenizer_path):
    import json

    from fm.generate import main

    out = tmp_path / "out.jsonl"
    assert main(["--config", "spark_13b/tiny", "--tokenizer", tokenizer_path, "--template", "spark",
                 "--predict-data", "你好##What is 2+2?", "--max-new-tokens", "6", "--output", str(out),
                 "--device", "cpu", "--seed", "0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in rows] == ["你好", "What is 2+2?"]
    assert all(isinstance(r["generate"], str) for r in rows)
    assert not list(tmp_path.glob("*.tmp*"))


def test_cli_loads_checkpoint(tmp_path, tokenizer, tokenizer_path, capsys):
    import json

    from fm.generate import generate_text, main

    model = _tiny("dragonfly", seed=5)
    ckpt = tmp_path / "7"
    ckpt.mkdir()
    torch.save(model.state_dict(), ckpt / "fm9g_live_checkpoint-7.pt")
    (ckpt / "model_config.json").write_text(json.dumps(DRAGONFLY))
    assert main(["--checkpoint", str(ckpt), "--tokenizer", tokenizer_path, "--prompt", "Hello", "--template",
                 "fm9g", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = generate_text(model, ["<用户>Hello<AI>"], tokenizer, max_new_tokens=8, stop_token_ids=(2,))[0]
    assert printed == {"input": "Hello", "generate": expected}

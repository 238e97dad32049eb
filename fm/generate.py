"""Text generation: KV-cache decoding, sampling, repetition penalties and a streaming detokenizer.

Batched prompts of different lengths run in lockstep without padding (the LLaMA reference way):
every row starts decoding at the shortest prompt length, and a row whose prompt is longer is fed
its own next prompt token instead of a sampled one until its prompt is used up. So the cache of
every row only ever holds real tokens at positions 0..t, all rows share one position per step,
and no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch

PenaltyMode = Literal["multiplicative", "subtractive"]


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class GenerationConfig:
    """Decoding options.

    ``repetition_penalty_mode``: ``"multiplicative"`` is Hugging Face's rule (over prompt and
    generated tokens: a positive logit is divided by the penalty, a negative one multiplied;
    1.0 disables). ``"subtractive"`` is iFlytekSpark's rule (generated tokens only: a token
    generated n times loses ``repetition_penalty + repetition_penalty_increase * (n - 1)``;
    0.0 disables).
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float | None = None  # None: off (1.0 multiplicative / 0.0 subtractive also off)
    repetition_penalty_mode: PenaltyMode = "multiplicative"
    repetition_penalty_increase: float = 0.1
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} (use do_sample=False)")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty_mode not in ("multiplicative", "subtractive"):
            raise ValueError(f"repetition_penalty_mode must be 'multiplicative' or 'subtractive', "
                             f"got {self.repetition_penalty_mode!r}")
        if (self.repetition_penalty is not None and self.repetition_penalty_mode == "multiplicative"
                and self.repetition_penalty <= 0):
            raise ValueError(f"a multiplicative repetition_penalty must be > 0, got {self.repetition_penalty}")


# ---------------------------------------------------------------------------------------------
# logits processors (each works on fp32 logits [B, V] and returns a new tensor)


def apply_multiplicative_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face ``RepetitionPenaltyLogitsProcessor``: ``seen`` is a bool mask [B, V] of tokens
    that occur in the prompt or the generated text."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_subtractive_penalty(logits: torch.Tensor, counts: torch.Tensor, penalty: float,
                              increase: float = 0.1) -> torch.Tensor:
    """iFlytekSpark's penalty: ``counts`` [B, V] is how often each token was generated (the prompt
    does not count); a token generated n >= 1 times loses ``penalty + increase * (n - 1)``."""
    amount = penalty + increase * (counts.to(logits.dtype) - 1)
    return torch.where(counts > 0, logits - amount, logits)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (ties with the k-th kept, as in HF)."""
    if top_k <= 0 or top_k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering, HF ``TopPLogitsWarper`` rule: drop the low tail whose total probability
    is at most 1 - top_p; the most likely token always stays."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, cfg: GenerationConfig, *, seen: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """Penalty, then (when sampling) temperature, top-k and top-p: Hugging Face's order."""
    logits = logits.float()
    rp = cfg.repetition_penalty
    if rp is not None:
        if cfg.repetition_penalty_mode == "multiplicative" and rp != 1.0 and seen is not None:
            logits = apply_multiplicative_penalty(logits, seen, rp)
        elif cfg.repetition_penalty_mode == "subtractive" and (rp != 0.0 or cfg.repetition_penalty_increase != 0.0) \
                and counts is not None:
            logits = apply_subtractive_penalty(logits, counts, rp, cfg.repetition_penalty_increase)
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            logits = logits / cfg.temperature
        logits = apply_top_k(logits, cfg.top_k)
        logits = apply_top_p(logits, cfg.top_p)
    return logits


def select_tokens(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] processed logits → [B] next tokens (argmax, or a draw when sampling)."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# streaming detokenizer


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces that never split a UTF-8 character.

    SentencePiece byte-fallback pieces (``<0xE4>`` …) carry one byte each; a CJK character is three
    of them. ``push`` decodes a short window of recent ids and returns only the new text once it no
    longer ends in an incomplete character (which decodes to U+FFFD); ``flush`` returns whatever is
    held back. The concatenation of all returned pieces equals ``tokenizer.decode(all_ids)``.
    The window trick (decode ``ids[prefix:]`` and drop the text of ``ids[prefix:read]``) keeps
    word-boundary spaces right, because SentencePiece drops the leading space of the first piece.
    """

    # A UTF-8 character has at most 4 bytes: a replacement char still pending after this many
    # tokens is a genuinely invalid byte sequence, emitted as decode() would render it.
    _MAX_PENDING = 4

    def __init__(self, tokenizer: _Decoder, skip_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.skip_ids = set(int(t) for t in skip_ids)
        self.reset()

    def reset(self) -> None:
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self.skip_ids:
            return ""
        self._ids.append(token_id)
        prefix_text = self.tokenizer.decode(self._ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self._ids[self._prefix:])
        pending = len(self._ids) - self._read
        if len(new_text) > len(prefix_text) and (not new_text.endswith("\ufffd") or pending >= self._MAX_PENDING):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        prefix_text = self.tokenizer.decode(self._ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self._ids[self._prefix:])
        # Keep the last id as context so a later push still gets its word-boundary space.
        self._ids = self._ids[-1:]
        self._prefix, self._read = 0, len(self._ids)
        return new_text[len(prefix_text):]


# ---------------------------------------------------------------------------------------------
# decoding loop

# stream(row, token_id, text): called for every generated token of every unfinished row
# (text = the new detokenized text, possibly ""), and once per row with token_id None and the
# held-back text when that row ends.
StreamCallback = Callable[[int, "int | None", str], None]


@dataclass
class _RowState:
    prompt: list[int]
    out: list[int] = field(default_factory=list)
    done: bool = False


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _to_prompts(prompts: Any, tokenizer: Any, add_bos: bool) -> list[list[int]]:
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    out: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer: generate(model, texts, tokenizer=Tokenizer(...))")
            ids = tokenizer.encode(p, bos=add_bos)
        else:
            ids = [int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)]
        if not ids:
            raise ValueError("empty prompt: give at least one token (e.g. BOS)")
        out.append(ids)
    return out


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Any, *, tokenizer: Any = None,
             config: GenerationConfig | None = None, stream: StreamCallback | None = None,
             add_bos: bool = True, **options: Any) -> list[list[int]]:
    """Generate continuations for a batch of prompts.

    ``prompts``: a string, a list of strings (encoded with ``tokenizer``, BOS added unless
    ``add_bos=False``), a list of token ids, or a list of token-id lists (taken as they are).
    ``config`` and/or keyword ``options`` (fields of :class:`GenerationConfig`) set decoding.
    Returns the new tokens of every prompt, without the prompt and without the stop token.
    With ``tokenizer`` and ``stream``, ``stream(row, token_id, text)`` receives text as it forms.
    """
    cfg = replace(config or GenerationConfig(), **options)
    rows = [_RowState(p) for p in _to_prompts(prompts, tokenizer, add_bos)]
    if cfg.max_new_tokens == 0:
        return [[] for _ in rows]
    device, dtype = _model_device_dtype(model)
    vocab = int(model.config.vocab_size)
    bsz = len(rows)
    lengths = [len(r.prompt) for r in rows]
    min_len, total = min(lengths), max(lengths) + cfg.max_new_tokens
    tokens = torch.zeros(bsz, total, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        tokens[i, :len(r.prompt)] = torch.tensor(r.prompt, dtype=torch.long)
    in_prompt = torch.tensor(lengths, device=device).unsqueeze(1) > torch.arange(total, device=device)
    stop = torch.tensor(cfg.stop_token_ids, dtype=torch.long, device=device)

    seen = counts = None
    if cfg.repetition_penalty is not None and cfg.repetition_penalty_mode == "multiplicative":
        seen = torch.zeros(bsz, vocab, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            seen[i, torch.tensor(r.prompt, device=device)] = True
    elif cfg.repetition_penalty is not None:
        counts = torch.zeros(bsz, vocab, dtype=torch.long, device=device)

    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)
    detoks = [StreamingDetokenizer(tokenizer) for _ in rows] if (stream and tokenizer is not None) else None

    cache = model.new_kv_cache(bsz, total, device, dtype) if cfg.use_cache else None
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    n_new = torch.zeros(bsz, dtype=torch.long, device=device)
    prev = 0
    for cur in range(min_len, total):
        if cache is not None:
            step_ids = tokens[:, prev:cur]
            positions = torch.arange(prev, cur, device=device).unsqueeze(0).expand(bsz, -1)
            logits = model(step_ids, positions, kv_cache=cache)
        else:
            positions = torch.arange(0, cur, device=device).unsqueeze(0).expand(bsz, -1)
            logits = model(tokens[:, :cur], positions)
        logits = process_logits(logits[:, -1, :], cfg, seen=seen, counts=counts)
        nxt = select_tokens(logits, cfg, generator)
        forced = in_prompt[:, cur]
        nxt = torch.where(forced, tokens[:, cur], nxt)
        tokens[:, cur] = nxt
        prev = cur
        generating = ~forced & ~done
        if not bool(generating.any()):
            continue
        is_stop = torch.isin(nxt, stop) if stop.numel() else torch.zeros_like(done)
        emit = generating & ~is_stop
        if seen is not None:
            seen[emit, nxt[emit]] = True
        if counts is not None:
            counts[emit, nxt[emit]] += 1
        n_new += generating.long()
        finished_now = generating & (is_stop | (n_new >= cfg.max_new_tokens))
        for i in torch.nonzero(generating).flatten().tolist():
            row = rows[i]
            if bool(emit[i]):
                tid = int(nxt[i])
                row.out.append(tid)
                if stream is not None:
                    stream(i, tid, detoks[i].push(tid) if detoks else "")
            if bool(finished_now[i]):
                row.done = True
                if stream is not None:
                    stream(i, None, detoks[i].flush() if detoks else "")
        done |= finished_now
        if bool(done.all()):
            break
    return [r.out for r in rows]


def generate_text(model: torch.nn.Module, prompts: str | Sequence[str], tokenizer: Any,
                  config: GenerationConfig | None = None, **options: Any) -> list[str]:
    """Strings in, strings out (decoded continuations)."""
    outs = generate(model, prompts, tokenizer=tokenizer, config=config, **options)
    return [tokenizer.decode(o) for o in outs]

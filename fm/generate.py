"""Text generation: KV-cache decoding, sampling, repetition penalties and a streaming detokenizer.

With the KV cache, prompts of different lengths are prefilled together, left-padded: a pad has
position -1, which the cache never stores nor attends to, so every row then decodes one token per
step at its own position. Without the cache (the reference path) rows run in lockstep from the
shortest prompt and a longer prompt feeds its own next token until it is used up.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch

from fm.chat import AUTO, FORMATS, TEMPLATE, from_spark_text, render, render_prompt, resolve_format

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


class _Sampler:
    """Per-step bookkeeping shared by the cached and the uncached loop: penalties state, stop
    tokens, per-row outputs and the stream callback."""

    def __init__(self, rows: list[_RowState], cfg: GenerationConfig, vocab: int, device: torch.device,
                 tokenizer: Any, stream: StreamCallback | None):
        self.rows, self.cfg = rows, cfg
        bsz = len(rows)
        self.seen = self.counts = None
        if cfg.repetition_penalty is not None and cfg.repetition_penalty_mode == "multiplicative":
            self.seen = torch.zeros(bsz, vocab, dtype=torch.bool, device=device)
            for i, r in enumerate(rows):
                self.seen[i, torch.tensor(r.prompt, device=device)] = True
        elif cfg.repetition_penalty is not None:
            self.counts = torch.zeros(bsz, vocab, dtype=torch.long, device=device)
        self.generator = None
        if cfg.do_sample and cfg.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(cfg.seed)
        self.stop = torch.tensor(cfg.stop_token_ids, dtype=torch.long, device=device)
        self.stream = stream
        self.detoks = [StreamingDetokenizer(tokenizer) for _ in rows] if (stream and tokenizer is not None) else None
        self.done = torch.zeros(bsz, dtype=torch.bool, device=device)
        self.n_new = torch.zeros(bsz, dtype=torch.long, device=device)

    def step(self, last_logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Choose the next token of every row from ``last_logits [B, V]``; rows where ``active``
        is False (still reading their prompt in the uncached loop) or already done are not
        recorded. Returns the chosen tokens [B]."""
        cfg = self.cfg
        logits = process_logits(last_logits, cfg, seen=self.seen, counts=self.counts)
        nxt = select_tokens(logits, cfg, self.generator)
        generating = active & ~self.done
        is_stop = torch.isin(nxt, self.stop) if self.stop.numel() else torch.zeros_like(self.done)
        emit = generating & ~is_stop
        col = nxt[:, None]
        if self.seen is not None:  # scatter, not boolean indexing: no device sync
            self.seen.scatter_(1, col, self.seen.gather(1, col) | emit[:, None])
        if self.counts is not None:
            self.counts.scatter_add_(1, col, emit[:, None].long())
        self.n_new += generating.long()
        finished = generating & (is_stop | (self.n_new >= cfg.max_new_tokens))
        # one device→host copy per step (not one sync per row)
        host = torch.stack([nxt, generating.long(), emit.long(), finished.long()]).tolist()
        for i, (tid, gen, emitted, fin) in enumerate(zip(*host)):
            if not gen:
                continue
            row = self.rows[i]
            if emitted:
                row.out.append(tid)
                if self.stream is not None:
                    self.stream(i, tid, self.detoks[i].push(tid) if self.detoks else "")
            if fin:
                row.done = True
                if self.stream is not None:
                    self.stream(i, None, self.detoks[i].flush() if self.detoks else "")
        self.done |= finished
        return nxt

    @property
    def all_done(self) -> bool:
        return all(r.done for r in self.rows)  # host-side: no device sync


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Any, *, tokenizer: Any = None,
             config: GenerationConfig | None = None, stream: StreamCallback | None = None,
             add_bos: bool = True, **options: Any) -> list[list[int]]:
    """Generate continuations for a batch of prompts.

    ``prompts``: a string, a list of strings (encoded with ``tokenizer``; a BOS added where the tokenizer puts one
    before text, its ``add_bos``, unless ``add_bos=False``), a list of token ids, or a list of token-id lists (taken
    as they are).
    ``config`` and/or keyword ``options`` (fields of :class:`GenerationConfig`) set decoding.
    Returns the new tokens of every prompt, without the prompt and without the stop token.
    With ``tokenizer`` and ``stream``, ``stream(row, token_id, text)`` receives text as it forms.
    """
    cfg = replace(config or GenerationConfig(), **options)
    rows = [_RowState(p) for p in _to_prompts(prompts, tokenizer, add_bos)]
    if cfg.max_new_tokens == 0:
        return [[] for _ in rows]
    device, dtype = _model_device_dtype(model)
    sampler = _Sampler(rows, cfg, int(model.config.vocab_size), device, tokenizer, stream)
    if cfg.use_cache:
        _decode_cached(model, rows, cfg, sampler, device, dtype)
    else:
        _decode_recompute(model, rows, cfg, sampler, device)
    return [r.out for r in rows]


def _decode_cached(model, rows, cfg, sampler: _Sampler, device, dtype) -> None:
    """Prefill all prompts at once, left-padded (padding has position -1, which the KV cache never
    stores nor attends to), then one token per row per step at each row's own position."""
    bsz = len(rows)
    lengths = torch.tensor([len(r.prompt) for r in rows], device=device)
    width = int(lengths.max())
    ids = torch.zeros(bsz, width, dtype=torch.long, device=device)
    pos = torch.full((bsz, width), -1, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        n = len(r.prompt)
        ids[i, width - n:] = torch.tensor(r.prompt, dtype=torch.long, device=device)
        pos[i, width - n:] = torch.arange(n, device=device)
    cache = model.new_kv_cache(bsz, width + cfg.max_new_tokens, device, dtype)
    logits = model(ids, pos, kv_cache=cache)[:, -1, :]
    active = torch.ones(bsz, dtype=torch.bool, device=device)
    for step in range(cfg.max_new_tokens):
        nxt = sampler.step(logits, active)
        if sampler.all_done or step == cfg.max_new_tokens - 1:
            break
        logits = model(nxt[:, None], (lengths + step)[:, None], kv_cache=cache)[:, -1, :]


def _decode_recompute(model, rows, cfg, sampler: _Sampler, device) -> None:
    """The reference loop: recompute the whole sequence every step, no cache. Rows run in
    lockstep from the shortest prompt; a longer prompt feeds its own next token until it is used
    up, so no row ever holds padding."""
    bsz = len(rows)
    lengths = [len(r.prompt) for r in rows]
    total = max(lengths) + cfg.max_new_tokens
    tokens = torch.zeros(bsz, total, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        tokens[i, :len(r.prompt)] = torch.tensor(r.prompt, dtype=torch.long, device=device)
    in_prompt = torch.tensor(lengths, device=device)[:, None] > torch.arange(total, device=device)
    for cur in range(min(lengths), total):
        positions = torch.arange(cur, device=device).unsqueeze(0).expand(bsz, -1)
        logits = model(tokens[:, :cur], positions)[:, -1, :]
        forced = in_prompt[:, cur]
        nxt = sampler.step(logits, ~forced)
        tokens[:, cur] = torch.where(forced, tokens[:, cur], nxt)
        if sampler.all_done:
            break


def generate_text(model: torch.nn.Module, prompts: str | Sequence[str], tokenizer: Any,
                  config: GenerationConfig | None = None, **options: Any) -> list[str]:
    """Strings in, strings out (decoded continuations)."""
    outs = generate(model, prompts, tokenizer=tokenizer, config=config, **options)
    return [tokenizer.decode(o) for o in outs]


# ---------------------------------------------------------------------------------------------
# CLI: fm generate --checkpoint CKPT --prompt "…" (python -m fm.generate)



def _read_questions(args: Any) -> list[dict[str, Any]]:
    """``--prompt`` (repeatable), ``--predict-data "q1##q2"`` (Spark's habit) or ``--input-file``
    (json list / jsonl records with an ``input`` field; other fields are kept in the output)."""
    import json

    records: list[dict[str, Any]] = [{"input": p} for p in args.prompt or []]
    if args.predict_data:
        records += [{"input": q} for q in args.predict_data.split("##") if q]
    if args.input_file:
        with open(args.input_file, encoding="utf-8") as f:
            text = f.read()
        items = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
        for n, item in enumerate(items, 1):
            if not isinstance(item, dict) or not (isinstance(item.get("input"), str)
                                                  or isinstance(item.get("messages"), list)):
                raise ValueError(f"{args.input_file}: record {n} has neither a string 'input' field nor a "
                                 "'messages' list (a conversation: [{\"role\": \"user\", \"content\": ...}, ...])")
            records.append(dict(item))
    if not records:
        raise ValueError("nothing to generate: give --prompt, --predict-data or --input-file")
    return records


def _load_model(args: Any) -> tuple[torch.nn.Module, str | None]:
    """(model, the checkpoint's tokenizer or None) for ``--checkpoint`` in any form fm.checkpoint.open opens."""
    from fm.models.config import resolve_dtype

    dtype = resolve_dtype(args.dtype) if args.dtype else None
    if args.checkpoint:
        from fm.checkpoint.open import open_checkpoint

        ck = open_checkpoint(args.checkpoint, model_config=args.config, base=args.base)
        model = ck.build_model(device=args.device, dtype=dtype)
        return model, str(ck.tokenizer) if ck.tokenizer else None
    if args.config is None:
        raise ValueError("give --checkpoint, or --config (a model config json or a shipped name such as 2.4b) to "
                         "generate with random weights")
    from fm.models.registry import build_model, load_model_config

    logging.getLogger("fm.generate").warning("no --checkpoint: generating with random weights")
    return build_model(load_model_config(args.config), device=args.device, dtype=dtype).eval(), None


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    from fm.tokenizer import load_tokenizer

    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        records = _read_questions(args)
        model, own_tokenizer = _load_model(args)
        tok_path = args.tokenizer or own_tokenizer
        if tok_path is None:
            raise ValueError(f"{args.checkpoint or args.config}: no tokenizer in the checkpoint (tokenizer.model or "
                             "tokenizer/); give --tokenizer")
        tok = load_tokenizer(tok_path)
    except (OSError, ValueError, KeyError) as e:  # bad input: the message names it and says how to fix it
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _run(args, model, tok, records)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fm generate", description="Generate text with a dragonfly or Spark model.")
    p.add_argument("--checkpoint", help="run or step directory, .pt state dict, LoRA adapter directory (folded into "
                   "its base) or Hugging Face export; its model config and tokenizer come with it")
    p.add_argument("--config", help="model config json or shipped name (default: the checkpoint's own; without "
                   "--checkpoint: random weights of this config)")
    p.add_argument("--base", help="LoRA adapter only: the base weights "
                   "(default: the adapter's base_model_name_or_path)")
    p.add_argument("--tokenizer", help="SentencePiece .model, tokenizer.json or HF tokenizer directory (default: the "
                   "checkpoint's own)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--predict-data", help="questions joined by '##' (Spark's predict_data)")
    p.add_argument("--input-file", help="json/jsonl with an 'input' field per record, or a 'messages' list (a "
                   "multi-turn conversation of {role: system|user|assistant, content}) rendered with --template")
    p.add_argument("--output", help="jsonl to write: the input records plus a 'generate' field")
    p.add_argument("--template", choices=(AUTO, *FORMATS), default=AUTO,
                   help="chat format around each input (fm.chat; the same as the chat_template fm export writes); "
                        "auto (default): the tokenizer's own chat_template (a Hugging Face tokenizer's "
                        "tokenizer_config.json) if it has one, else none")
    p.add_argument("--max-new-tokens", "--predict-length", dest="max_new_tokens", type=int, default=128)
    p.add_argument("--batch-size", "--predict-batch", dest="batch_size", type=int, default=8)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--repetition-penalty-mode", choices=["multiplicative", "subtractive"], default="multiplicative")
    p.add_argument("--repetition-penalty-increase", type=float, default=0.1)
    p.add_argument("--stop", action="append", default=[], help="extra stop piece, e.g. '<end>' (EOS always stops)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-cache", action="store_true", help="recompute the full sequence each step (reference)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (batch size 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="bf16 | fp16 | fp32 (default: the model config's)")
    return p


def _run(args: Any, model: torch.nn.Module, tok: Any, records: list[dict[str, Any]]) -> int:
    import json
    import sys

    from fm.io import atomic_write

    fmt = resolve_format(args.template, tok.chat_template)
    # the EOS, and the eos_token_id of a Hugging Face model directory's generation_config.json
    stops = list(getattr(tok, "stop_ids", None) or ([tok.eos_id] if tok.eos_id is not None else []))
    for piece in args.stop + (["<end>"] if fmt == "spark" else []):
        tid = tok.piece_to_id(piece)
        if tid is None:
            print(f"error: stop piece {piece!r} is not in {tok.path}", file=sys.stderr)
            return 2
        stops.append(tid)
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        repetition_penalty_mode=args.repetition_penalty_mode,
        repetition_penalty_increase=args.repetition_penalty_increase, stop_token_ids=tuple(stops),
        seed=args.seed, use_cache=not args.no_cache)
    spark = fmt == "spark"

    def prompts_of(chunk: list[dict[str, Any]]) -> list:
        if fmt == TEMPLATE:  # the tokenizer's template: its text decides about BOS; its special tokens stay whole
            convs = [r["messages"] if "messages" in r else [{"role": "user", "content": r["input"]}] for r in chunk]
            return [tok.encode(tok.apply_chat_template(c, add_generation_prompt=True)) for c in convs]
        # Spark's format writes newlines and tabs as its tokenizer expects them (<ret>, <tab>)
        return [render(r["messages"], fmt) if "messages" in r else render_prompt(r["input"], fmt) for r in chunk]

    def run(out_f: Any) -> None:
        batch = 1 if args.stream else max(1, args.batch_size)
        for start in range(0, len(records), batch):
            chunk = records[start:start + batch]
            texts = prompts_of(chunk)

            def stream(row: int, tid: int | None, text: str) -> None:
                sys.stdout.write(from_spark_text(text) if spark else text)
                sys.stdout.flush()

            outs = generate(model, texts, tokenizer=tok, config=cfg, stream=stream if args.stream else None)
            for rec, ids in zip(chunk, outs):
                text = tok.decode(ids)
                if spark:
                    text = from_spark_text(text)
                rec = {**rec, "generate": text}
                if args.stream:
                    sys.stdout.write("\n")
                else:
                    print(json.dumps(rec, ensure_ascii=False))
                if out_f:
                    out_f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))

    if args.output:
        atomic_write(args.output, run)  # the output jsonl appears under its name only when complete
    else:
        run(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Scoring: answer-letter log-likelihood for multiple choice, exact match for GSM8K, perplexity.

Multiple choice. The prompt ends with the answer prefix (``Answer:`` for MMLU, ``答案：`` for C-Eval,
``答案是：`` for CMMLU) and the model's next-token logits are compared on the answer letters only;
the arg-max letter is the prediction. The letter tokens are found by tokenising the answer prefix
with and without the letter exactly as the few-shot examples write it (``"Answer: A"``,
``"答案：A"``) and taking the tokens the letter adds. With SentencePiece that is ``▁A`` after
``Answer:`` (a space starts a new word) but plain ``A`` after the full-width colon, which a fixed
``" A"`` would get wrong. If the letter adds more than one token (e.g. ``▁`` + ``A`` when the
vocabulary has no ``▁A``), the shared leading tokens are appended to every prompt and the last one
is compared, so the scored position is always the one the few-shot examples taught.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fm.constants import IGNORE_INDEX
from fm.eval.tasks import (
    GSM8K_STOP,
    LETTERS,
    NUMBER_RE,
    GenExample,
    MCSubject,
    MCTask,
    gsm8k_prompt,
    normalize_number,
)

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ model calls


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Right-padded [B, max_len] ids. Causal attention means padding after a row never changes its logits."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out.to(device)


def forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    return model(ids, positions)


def _batches(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start:start + size]


# -------------------------------------------------------------------------------- multiple choice


@dataclass
class LetterTokens:
    extra: list[int]  # tokens appended to every prompt before the scored position
    ids: list[int]  # one candidate token per letter


def letter_tokens(tokenizer: Any, task: MCTask, letters: Sequence[str] = LETTERS) -> LetterTokens:
    probe = "x\n" + task.answer_prefix
    base = tokenizer.encode(probe)
    conts = []
    for letter in letters:
        full = tokenizer.encode(probe + task.answer_sep + letter)
        conts.append(full[len(base):] if full[: len(base)] == base and len(full) > len(base) else None)
    if all(c is not None for c in conts):
        extra = conts[0][:-1]
        ids = [c[-1] for c in conts]
        if all(c[:-1] == extra for c in conts) and len(set(ids)) == len(ids):
            return LetterTokens(extra, ids)
    # The letter merges with the answer prefix (or tokenises unevenly): fall back to the letter pieces
    # themselves, word-initial after a space, as the few-shot examples write them.
    pieces = [("▁" if task.answer_sep == " " else "") + letter for letter in letters]
    ids = [tokenizer.piece_to_id(p) for p in pieces]
    if any(i is None for i in ids):  # not SentencePiece pieces (a byte-level BPE): the letter as it encodes alone
        alone = [tokenizer.encode(task.answer_sep + letter) for letter in letters]
        ids = [a[0] if len(a) == 1 else None for a in alone]
    if any(i is None or i == tokenizer.unk_id for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"{task.name}: cannot find one token per answer letter after {task.answer_prefix!r} "
                         f"(tokenised continuations {conts}, pieces {pieces} -> {ids})")
    log.warning("%s: the answer letters merge with %r in this tokenizer; scoring the pieces %s instead",
                task.name, task.answer_prefix, pieces)
    return LetterTokens([], ids)


@dataclass
class MCPrompt:
    ids: list[int]
    shots_used: int
    truncated: bool


def encode_mc_prompt(tokenizer: Any, task: MCTask, subject: MCSubject, index: int, letters: LetterTokens,
                     max_length: int) -> MCPrompt:
    """BOS + prompt + letter prefix; drops few-shot examples from the end until it fits, then keeps the tail."""
    q = subject.questions[index]
    k = len(subject.shots)
    while True:
        ids = tokenizer.encode(task.build_prompt(q, subject.shots[:k]), bos=True) + letters.extra
        if len(ids) <= max_length or k == 0:
            break
        k -= 1
    truncated = len(ids) > max_length
    if truncated:  # keep the question end and the answer prefix: that is where the answer is read
        ids = ids[-max_length:]
    return MCPrompt(ids, k, truncated)


@torch.no_grad()
def next_token_choice(model: torch.nn.Module, prompts: Sequence[Sequence[int]], candidates: Sequence[int], *,
                      batch_size: int, pad_id: int) -> list[int]:
    """Index into ``candidates`` of the highest next-token logit after each prompt (batched, longest first)."""
    device = model_device(model)
    cand = torch.tensor(list(candidates), dtype=torch.long, device=device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [0] * len(prompts)
    for idx in _batches(order, batch_size):
        ids = pad_batch([prompts[i] for i in idx], pad_id, device)
        logits = forward(model, ids)
        last = torch.tensor([len(prompts[i]) - 1 for i in idx], device=device)
        scores = logits[torch.arange(len(idx), device=device), last][:, cand].float()
        for i, choice in zip(idx, scores.argmax(dim=-1).tolist()):
            out[i] = choice
    return out


@dataclass
class SubjectScore:
    correct: int
    total: int
    predictions: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None


def summarize_mc(scores: dict[str, SubjectScore], *, predictions: bool = False) -> dict[str, Any]:
    """Per-subject accuracy; macro = mean over subjects, micro = all questions pooled."""
    scored = {s: v for s, v in scores.items() if v.total}
    correct = sum(v.correct for v in scored.values())
    total = sum(v.total for v in scored.values())
    out: dict[str, Any] = {
        "subjects": {s: {"correct": v.correct, "total": v.total, "accuracy": v.accuracy,
                         **({"predictions": v.predictions} if predictions else {})}
                     for s, v in scores.items()},
        "correct": correct,
        "total": total,
        "micro_accuracy": correct / total if total else None,
        "macro_accuracy": sum(v.accuracy for v in scored.values()) / len(scored) if scored else None,
    }
    return out


def evaluate_mc(model: torch.nn.Module, tokenizer: Any, task: MCTask, subjects: list[MCSubject], *,
                batch_size: int = 8, max_length: int = 4096, save_predictions: bool = False,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    letters = letter_tokens(tokenizer, task)
    scores: dict[str, SubjectScore] = {}
    truncated = reduced = 0
    for subject in subjects:
        prompts = [encode_mc_prompt(tokenizer, task, subject, i, letters, max_length)
                   for i in range(len(subject.questions))]
        truncated += sum(p.truncated for p in prompts)
        reduced += sum(p.shots_used < len(subject.shots) for p in prompts)
        choice = next_token_choice(model, [p.ids for p in prompts], letters.ids, batch_size=batch_size,
                                   pad_id=tokenizer.pad_id)
        preds = [LETTERS[c] for c in choice]
        labelled = [(p, q.answer) for p, q in zip(preds, subject.questions) if q.answer is not None]
        scores[subject.name] = SubjectScore(sum(p == a for p, a in labelled), len(labelled), preds)
        if progress is not None:
            progress(f"{task.name}/{subject.name}: {scores[subject.name].correct}/{scores[subject.name].total}")
    if reduced or truncated:
        log.warning("%s: to fit max_length=%d, %d prompts got fewer few-shot examples and %d were cut at the "
                    "front (raise --max-length or lower --shots)", task.name, max_length, reduced, truncated)
    no_labels = all(q.answer is None for s in subjects for q in s.questions)
    out = summarize_mc(scores, predictions=save_predictions or no_labels)
    out.update(split=task.eval_split, shots=max((len(s.shots) for s in subjects), default=0),
               prompts_with_fewer_shots=reduced, prompts_truncated=truncated,
               letter_token_ids=dict(zip(LETTERS, letters.ids)))
    return out


# ------------------------------------------------------------------------------------------ GSM8K

def extract_answer(output: str, stop: str = GSM8K_STOP) -> str | None:
    """The model's final number: the output is cut at the next few-shot ``Question:``; the number after
    ``####`` if the model wrote one, else the last number in the text (commas removed)."""
    output = output.split(stop, 1)[0]
    if "####" in output:
        found = normalize_number(output.rsplit("####", 1)[1])
        if found is not None:
            return found
    numbers = NUMBER_RE.findall(output.replace(",", ""))
    return normalize_number(numbers[-1]) if numbers else None


def greedy_generate(model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int,
                    batch_size: int) -> list[list[int]]:
    """Greedy continuations (KV cache when the model has one) via ``fm.generate.generate``."""
    from fm.generate import generate

    use_cache = hasattr(model, "new_kv_cache")
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths run in lockstep
    for idx in _batches(order, batch_size):
        gen = generate(model, [prompts[i] for i in idx], add_bos=False, max_new_tokens=max_new_tokens,
                       do_sample=False, stop_token_ids=(eos_id,), use_cache=use_cache)
        for i, g in zip(idx, gen):
            out[i] = g
    return out


def evaluate_gsm8k(model: torch.nn.Module, tokenizer: Any, examples: list[GenExample], shots: list[GenExample], *,
                   max_new_tokens: int = 256, batch_size: int = 8, max_length: int = 4096,
                   save_predictions: bool = False) -> dict[str, Any]:
    prompts = []
    for ex in examples:
        k = len(shots)
        while True:
            ids = tokenizer.encode(gsm8k_prompt(ex.question, shots[:k]), bos=True)
            if len(ids) + max_new_tokens <= max_length or k == 0:
                break
            k -= 1
        prompts.append(ids[-max(1, max_length - max_new_tokens):])
    outputs = greedy_generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                              batch_size=batch_size)
    texts = [tokenizer.decode(o) for o in outputs]
    preds = [extract_answer(t) for t in texts]
    correct = sum(p is not None and p == ex.target for p, ex in zip(preds, examples))
    out: dict[str, Any] = {"correct": correct, "total": len(examples),
                           "accuracy": correct / len(examples) if examples else None,
                           "shots": len(shots), "max_new_tokens": max_new_tokens}
    if save_predictions:
        out["predictions"] = [{"source": ex.source, "target": ex.target, "prediction": p, "output": t}
                              for ex, p, t in zip(examples, preds, texts)]
    return out


# ------------------------------------------------------------------------------------- perplexity


def sample_tokens(tokenizer: Any, record: dict, where: str) -> tuple[list[int], list[int]]:
    """Upstream's rule: ``[BOS] + input + output`` with labels on the output tokens and EOS (a tokenizer that adds
    no BOS to text, ``add_bos`` False: ``input + output``, the last input token labelled with the first output
    token, as the packer does)."""
    inp, out = record.get("input", ""), record.get("output", record.get("text"))
    if not isinstance(inp, str) or not isinstance(out, str):
        raise ValueError(f"{where}: expected string keys 'input' and 'output' (or 'text'), got keys {sorted(record)}")
    inp_ids = tokenizer.encode(inp) if inp else []
    out_ids = tokenizer.encode(out)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and getattr(tokenizer, "add_bos", True) else []
    src = bos + inp_ids + out_ids
    tgt = [IGNORE_INDEX] * len(inp_ids) + out_ids + [tokenizer.eos_id]
    return src, tgt[1 - len(bos):]


def windows(src: list[int], tgt: list[int], max_length: int) -> Iterator[tuple[list[int], list[int]]]:
    """Non-overlapping ``max_length`` windows, each scored on its own (no context carried over)."""
    for start in range(0, len(src), max_length):
        yield src[start:start + max_length], tgt[start:start + max_length]


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, tokenizer: Any, path: str, *, max_length: int = 4096,
                        batch_size: int = 8, max_lines: int | None = None) -> dict[str, Any]:
    """Token-weighted loss and perplexity over an index directory (``data.jsonl`` + offsets)."""
    from fm.data.indexed import IndexedDataset
    from fm.eval.validation import token_losses

    ds = IndexedDataset(path)
    n = len(ds) if max_lines is None else min(len(ds), max_lines)
    device = model_device(model)
    loss_sum, tokens, pending = 0.0, 0, []

    def flush() -> None:
        nonlocal loss_sum, tokens
        ids = pad_batch([s for s, _ in pending], tokenizer.pad_id, device)
        tgt = pad_batch([t for _, t in pending], IGNORE_INDEX, device)
        losses = token_losses(forward(model, ids), tgt)
        loss_sum += float(losses.sum().double())
        tokens += int((tgt != IGNORE_INDEX).sum())
        pending.clear()

    for i in range(n):
        src, tgt = sample_tokens(tokenizer, ds.record(i), f"{path}/data.jsonl line {i + 1}")
        for window in windows(src, tgt, max_length):
            pending.append(window)
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    loss = loss_sum / tokens if tokens else float("nan")
    return {"path": path, "lines": n, "tokens": tokens, "loss_sum": loss_sum, "loss": loss, "ppl": safe_exp(loss),
            "max_length": max_length}


def safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")

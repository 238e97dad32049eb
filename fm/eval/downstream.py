"""Downstream accuracy during training: a fixed subset of C-Eval / CMMLU / MMLU, scored as ``fm eval`` scores it.

The files are read and the prompts built once (:func:`prepare`), with ``fm eval``'s functions
(:func:`fm.eval.tasks.load_mc`, :func:`fm.eval.scoring.encode_mc_prompt`, :func:`fm.eval.scoring.letter_tokens`), so
the subset ``eval.downstream_limit`` N is ``fm eval --limit N``'s and the accuracy is the one ``fm eval`` reports on
the same weights.

On a sharded engine every forward is a collective, so :func:`score` runs on every rank: each rank scores every
``world_size``-th question of a task (rank r the questions r, r + W, ...), padded with repeats of the task's first
prompt to the same count on every rank (so every rank runs the same number of forwards; the repeats are not
counted), and one all-reduce sums the per-subject counts. Each rank thus does 1/W of the work, where scoring
every question on every rank would do all of it W times over for the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fm.eval import scoring, tasks


@dataclass
class PreparedTask:
    """One benchmark's subset, tokenised: a prompt, its subject and its answer per question."""

    name: str
    letter_ids: list[int]
    subjects: list[str]
    prompts: list[list[int]]
    subject_of: list[int]
    answers: list[str | None]


def load(*, ceval_dir: str = "", cmmlu_dir: str = "", mmlu_dir: str = "", limit: int | None = None, shots: int = 0,
         subjects: str = "") -> dict[str, tuple[tasks.MCTask, list[tasks.MCSubject]]]:
    """The benchmarks given, as ``fm eval`` loads them (C-Eval's ``val`` split; ``subjects`` comma-separated)."""
    wanted = [s.strip() for s in subjects.split(",") if s.strip()] or None
    out = {}
    for name, path in (("ceval", ceval_dir), ("mmlu", mmlu_dir), ("cmmlu", cmmlu_dir)):  # fm eval's order
        if path:
            out[name] = tasks.load_mc(name, path, shots=shots, subjects=wanted, limit=limit)
    return out


def prepare(tokenizer: Any, loaded: dict[str, tuple[tasks.MCTask, list[tasks.MCSubject]]],
            max_length: int) -> list[PreparedTask]:
    out = []
    for name, (task, subjects) in loaded.items():
        letters = scoring.letter_tokens(tokenizer, task)
        prompts, subject_of, answers = [], [], []
        for si, subject in enumerate(subjects):
            for qi, q in enumerate(subject.questions):
                prompts.append(scoring.encode_mc_prompt(tokenizer, task, subject, qi, letters, max_length).ids)
                subject_of.append(si)
                answers.append(q.answer)
        out.append(PreparedTask(name, letters.ids, [s.name for s in subjects], prompts, subject_of, answers))
    return out


@torch.no_grad()
def score(model: torch.nn.Module, prepared: list[PreparedTask], *, rank: int, world_size: int,
          all_reduce: Callable[[torch.Tensor, str], torch.Tensor], device: torch.device, batch_size: int,
          pad_id: int) -> dict[str, Any]:
    """Accuracy per task (:func:`fm.eval.scoring.summarize_mc`'s dict: ``micro_accuracy``, ``macro_accuracy``,
    ``correct``, ``total``, ``subjects``) over every rank's share. Eval mode for the call (the mode is restored).
    Collective: every rank calls it with the same ``prepared``."""
    prepared = [t for t in prepared if t.prompts]  # a task with no questions has nothing to score (the same on
    # every rank: ``prepared`` is); the preflight refuses such a benchmark directory, the callback warns
    was_training = model.training
    model.eval()
    counts = []
    try:
        for t in prepared:
            n = len(t.prompts)
            mine = list(range(rank, n, world_size))
            share = math.ceil(n / world_size)
            padded = [t.prompts[i] for i in mine] + [t.prompts[0]] * (share - len(mine))
            choice = scoring.next_token_choice(model, padded, t.letter_ids, batch_size=batch_size, pad_id=pad_id)
            c = torch.zeros(2, len(t.subjects), dtype=torch.float64)
            for i, pick in zip(mine, choice):  # the padding's choices are left out
                if t.answers[i] is not None:
                    c[1, t.subject_of[i]] += 1
                    c[0, t.subject_of[i]] += float(tasks.LETTERS[pick] == t.answers[i])
            counts.append(c.flatten())
    finally:
        model.train(was_training)
    if not counts:
        return {}
    total = all_reduce(torch.cat(counts).to(device), "sum").cpu().tolist()
    out, at = {}, 0
    for t in prepared:
        k = len(t.subjects)
        correct, seen = total[at:at + k], total[at + k:at + 2 * k]
        at += 2 * k
        out[t.name] = scoring.summarize_mc({s: scoring.SubjectScore(round(c), round(n)) for s, c, n in
                                            zip(t.subjects, correct, seen)})
    return out

"""Benchmark files in their official layouts, and the prompts built from them.

Nothing is downloaded: the user points at a local directory laid out as the benchmark ships it.

* C-Eval (``ceval-exam.zip``): ``DIR/{dev,val,test}/{subject}_{split}.csv``, header
  ``id,question,A,B,C,D,answer`` (dev adds ``explanation``; test has no ``answer``). Optional
  ``DIR/subject_mapping.json`` (from the C-Eval GitHub repo: ``{subject: [English, 中文, category]}``)
  gives the Chinese subject name the official prompt uses.
* MMLU (hendrycks ``data.tar``): ``DIR/{dev,val,test}/{subject}_{split}.csv``, no header, six fields
  ``question,A,B,C,D,answer``. ``DIR`` may be the ``data`` folder or its parent.
* CMMLU: ``DIR/{dev,test}/{subject}.csv``, header ``,Question,A,B,C,D,Answer``. Optional
  ``DIR/subject_mapping.json`` (``{subject: 中文名}``) as for C-Eval.
* GSM8K: jsonl ``{"question": ..., "answer": "... #### 42"}``; a directory holds ``test.jsonl``
  (scored) and ``train.jsonl`` (few-shot examples).

The prompts are the ones the benchmarks' own evaluation scripts use, so scores are comparable.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal

from fm.errors import FmError

LETTERS = ("A", "B", "C", "D")


class EvalDataError(FmError, ValueError):
    """A benchmark file is missing or malformed; the message names the file (and line/column)."""


@dataclass
class MCQuestion:
    """One multiple-choice question. ``answer`` is None where the split has no labels (C-Eval test)."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str | None
    source: str = ""  # "file:line", for error messages and predictions


@dataclass
class MCTask:
    """How a multiple-choice benchmark is laid out and prompted."""

    name: str
    header: str  # format string with {subject}
    question_prefix: str
    answer_prefix: str  # ends the prompt; the answer letter follows
    answer_sep: str  # between answer_prefix and the letter in few-shot examples (" " for MMLU)
    eval_split: str
    subject_names: dict[str, str] = field(default_factory=dict)

    def subject_name(self, subject: str) -> str:
        return self.subject_names.get(subject, subject.replace("_", " "))

    def format_question(self, q: MCQuestion, with_answer: bool) -> str:
        text = self.question_prefix + q.question
        for letter, choice in zip(LETTERS, q.choices):
            text += f"\n{letter}. {choice}"
        text += "\n" + self.answer_prefix
        if with_answer:
            text += f"{self.answer_sep}{q.answer}\n\n"
        return text

    def build_prompt(self, q: MCQuestion, shots: list[MCQuestion]) -> str:
        """The official prompt: task header, the few-shot examples with answers, the question."""
        prompt = self.header.format(subject=self.subject_name(q.subject))
        for shot in shots:
            prompt += self.format_question(shot, with_answer=True)
        return prompt + self.format_question(q, with_answer=False)


CEVAL = MCTask("ceval", "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "", "答案：", "", "val")
MMLU = MCTask("mmlu", "The following are multiple choice questions (with answers) about {subject}.\n\n", "",
              "Answer:", " ", "test")
CMMLU = MCTask("cmmlu", "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "题目：",
               "答案是：", "", "test")
MC_TASKS = {t.name: t for t in (CEVAL, MMLU, CMMLU)}


# ---------------------------------------------------------------------------------------------- CSV
def _read_rows(path: str) -> list[tuple[int, list[str]]]:
    """(line number where the row starts, fields) for every row; utf-8 with or without BOM."""
    if not os.path.isfile(path):
        raise EvalDataError(f"{path}: file not found")
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            start = 1
            for row in reader:
                rows.append((start, row))
                start = reader.line_num + 1
    except (UnicodeDecodeError, csv.Error) as e:
        raise EvalDataError(f"{path}: cannot parse as UTF-8 CSV ({e})") from e
    return rows


def _columns(path: str, header: list[str], wanted: list[str], optional: set[str]) -> dict[str, int]:
    norm = [h.strip().lower() for h in header]
    cols = {}
    for name in wanted:
        if name.lower() in norm:
            cols[name] = norm.index(name.lower())
        elif name not in optional:
            raise EvalDataError(f"{path}:1: header {header} has no column {name!r} "
                                f"(expected the official header with columns {wanted})")
    return cols


def _question(path: str, line: int, row: list[str], n_fields: int, cols: dict[str, int],
              subject: str, need_answer: bool) -> MCQuestion:
    if len(row) != n_fields:
        raise EvalDataError(f"{path}:{line}: expected {n_fields} fields, got {len(row)} "
                            "(an unquoted comma or newline in a field?)")
    answer = None
    if "answer" in cols:
        answer = row[cols["answer"]].strip().upper()
        if answer not in LETTERS:
            if need_answer or answer:
                raise EvalDataError(f"{path}:{line}: column {cols['answer'] + 1} (answer) is {row[cols['answer']]!r}, "
                                    "expected one of A, B, C, D")
            answer = None
    elif need_answer:
        raise EvalDataError(f"{path}: no answer column; this split cannot be scored")
    choices = tuple(row[cols[letter]] for letter in LETTERS)
    return MCQuestion(subject, row[cols["question"]], choices, answer, f"{path}:{line}")  # type: ignore[arg-type]


def read_mc_csv(path: str, task: str, subject: str, *, need_answer: bool = True) -> list[MCQuestion]:
    """Questions of one subject file of ``task`` ("ceval", "mmlu" or "cmmlu")."""
    rows = _read_rows(path)
    if task == "mmlu":  # no header
        cols = {"question": 0, "A": 1, "B": 2, "C": 3, "D": 4, "answer": 5}
        return [_question(path, line, row, 6, cols, subject, need_answer) for line, row in rows if row]
    if not rows:
        raise EvalDataError(f"{path}: empty file (expected a header line)")
    header = rows[0][1]
    cols = _columns(path, header, ["question", *LETTERS, "answer"], optional=set() if need_answer else {"answer"})
    return [_question(path, line, row, len(header), cols, subject, need_answer) for line, row in rows[1:] if row]


def _split_file(task: str, root: str, split: str, subject: str) -> str:
    name = f"{subject}.csv" if task == "cmmlu" else f"{subject}_{split}.csv"
    return os.path.join(root, split, name)


def mc_root(task: str, path: str) -> str:
    """The directory holding ``dev/`` and the eval split; MMLU also accepts the parent of ``data/``."""
    if not os.path.isdir(path):
        raise EvalDataError(f"--{task}-dir {path}: not a directory")
    if task == "mmlu" and not os.path.isdir(os.path.join(path, "test")) and os.path.isdir(os.path.join(path, "data")):
        path = os.path.join(path, "data")
    return path


def list_subjects(task: str, root: str, split: str) -> list[str]:
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise EvalDataError(f"{split_dir}: directory not found (the {task} layout is {layout_hint(task)})")
    suffix = ".csv" if task == "cmmlu" else f"_{split}.csv"
    files = sorted(glob.glob(os.path.join(split_dir, "*" + suffix)))
    if not files:
        raise EvalDataError(f"{split_dir}: no *{suffix} files (the {task} layout is {layout_hint(task)})")
    return [os.path.basename(f)[: -len(suffix)] for f in files]


def layout_hint(task: str) -> str:
    return {"ceval": "DIR/{dev,val,test}/{subject}_{split}.csv",
            "mmlu": "DIR/{dev,test}/{subject}_{split}.csv (DIR may be the data/ folder or its parent)",
            "cmmlu": "DIR/{dev,test}/{subject}.csv"}[task]


def load_subject_names(root: str) -> dict[str, str]:
    """``subject_mapping.json`` if present: C-Eval's ``{subject: [en, zh, category]}`` or ``{subject: name}``."""
    path = os.path.join(root, "subject_mapping.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(mapping, dict):
        raise EvalDataError(f"{path}: expected a JSON object subject -> name")
    names = {}
    for subject, value in mapping.items():
        if isinstance(value, list) and len(value) >= 2:
            names[subject] = str(value[1])
        elif isinstance(value, str):
            names[subject] = value
        else:
            raise EvalDataError(f"{path}: key {subject!r}: expected a name or [English, 中文, category]")
    return names


@dataclass
class MCSubject:
    name: str
    questions: list[MCQuestion]
    shots: list[MCQuestion]


def load_mc(task_name: str, path: str, *, shots: int = 0, split: str | None = None,
            subjects: list[str] | None = None, limit: int | None = None) -> tuple[MCTask, list[MCSubject]]:
    """Load a multiple-choice benchmark: per subject, the eval questions and the first ``shots`` dev examples."""
    base = MC_TASKS[task_name]
    root = mc_root(task_name, path)
    task = MCTask(**{**base.__dict__, "eval_split": split or base.eval_split,
                     "subject_names": load_subject_names(root)})
    available = list_subjects(task_name, root, task.eval_split)
    if subjects:
        missing = [s for s in subjects if s not in available]
        if missing:
            raise EvalDataError(f"{task_name}: subjects {missing} not found under "
                                f"{os.path.join(root, task.eval_split)}; available: {available}")
        available = [s for s in available if s in subjects]
    need_answer = not (task_name == "ceval" and task.eval_split == "test")
    out = []
    for subject in available:
        questions = read_mc_csv(_split_file(task_name, root, task.eval_split, subject), task_name, subject,
                                need_answer=need_answer)
        if limit is not None:
            questions = questions[:limit]
        dev: list[MCQuestion] = []
        if shots > 0:
            dev = read_mc_csv(_split_file(task_name, root, "dev", subject), task_name, subject)
            if len(dev) < shots:
                raise EvalDataError(f"{_split_file(task_name, root, 'dev', subject)}: {len(dev)} examples, "
                                    f"fewer than --shots {shots}")
            dev = dev[:shots]
        out.append(MCSubject(subject, questions, dev))
    return task, out


# ------------------------------------------------------------------------------------------- GSM8K
@dataclass
class GenExample:
    question: str
    answer: str  # the reference answer text (``... #### 42``)
    target: str  # the normalised final number
    source: str = ""


GSM8K_STOP = "\n\nQuestion:"  # where a model that goes on to the next few-shot question is cut

NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """The first number in ``text``, canonical: ``"1,234"`` → ``"1234"``, ``"3.50"`` → ``"3.5"``,
    ``"7.0"`` → ``"7"``, ``"$5."`` → ``"5"``; None when there is no number."""
    m = NUMBER_RE.search(text.replace(",", ""))
    if m is None:
        return None
    d = Decimal(m.group(0))
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def gsm8k_reference(answer: str) -> str | None:
    """The number after the last ``####`` of a reference answer."""
    if "####" not in answer:
        return None
    return normalize_number(answer.rsplit("####", 1)[1])


def read_gsm8k(path: str) -> list[GenExample]:
    if not os.path.isfile(path):
        raise EvalDataError(f"{path}: file not found (GSM8K-style jsonl with 'question' and 'answer')")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) \
                    or not isinstance(obj.get("answer"), str):
                raise EvalDataError(f"{path}:{lineno}: expected an object with string keys 'question' and 'answer'")
            target = gsm8k_reference(obj["answer"])
            if target is None:
                raise EvalDataError(f"{path}:{lineno}: answer does not end with '#### <number>'")
            out.append(GenExample(obj["question"], obj["answer"], target, f"{path}:{lineno}"))
    return out


def gsm8k_files(path: str) -> tuple[str, str | None]:
    """(eval file, few-shot file or None): a jsonl file, or a directory with test.jsonl (+ train.jsonl)."""
    if os.path.isdir(path):
        test = os.path.join(path, "test.jsonl")
        if not os.path.isfile(test):
            raise EvalDataError(f"{path}: directory has no test.jsonl (pass the jsonl file itself, or a directory "
                                "with test.jsonl and train.jsonl)")
        train = os.path.join(path, "train.jsonl")
        return test, train if os.path.isfile(train) else None
    if not os.path.isfile(path):
        raise EvalDataError(f"--gsm8k {path}: file not found")
    return path, None


def gsm8k_prompt(question: str, shots: list[GenExample]) -> str:
    """``Question: …\\nAnswer: … #### n`` examples separated by blank lines, then the question."""
    text = "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots)
    return text + f"Question: {question}\nAnswer:"


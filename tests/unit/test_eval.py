"""fm.eval: benchmark layouts, letter-logit scoring arithmetic, GSM8K extraction, perplexity, validation loss, CLI."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fm.eval import scoring, tasks
from fm.eval.scoring import extract_answer
from fm.eval.tasks import EvalDataError, gsm8k_reference, normalize_number
from fm.eval.validation import evaluate_loss, from_sums_tensor, sums_tensor
from fm.models.registry import build_model, load_model_config

# ------------------------------------------------------------------------------------------- fixtures

QUESTIONS = {  # subject -> [(question, answer)]; "Q<n>" markers let the stub model recognise the question
    "alpha_beta": [("Q1 first, with a comma?", "A"), ("Q2 second", "B"), ("Q3 third", "C"), ("Q4 fourth", "D")],
    "gamma": [("Q5 fifth", "B"), ("Q6 sixth\nspans two lines", "D")],
}
DEV = {s: [(f"D{i} dev question {i} of {s}", "ABCD"[i % 4]) for i in range(3)] for s in QUESTIONS}


def _write(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


def _choices(q: str) -> list[str]:
    return [f"{q[:2]} option {letter}" for letter in "ABCD"]


def make_ceval(root: Path) -> Path:
    for subject, qs in QUESTIONS.items():
        _write(root / "val" / f"{subject}_val.csv", [["id", "question", "A", "B", "C", "D", "answer"]] +
               [[str(i), q, *_choices(q), a] for i, (q, a) in enumerate(qs)])
        _write(root / "test" / f"{subject}_test.csv", [["id", "question", "A", "B", "C", "D"]] +
               [[str(i), q, *_choices(q)] for i, (q, _) in enumerate(qs)])
        _write(root / "dev" / f"{subject}_dev.csv", [["id", "question", "A", "B", "C", "D", "answer", "explanation"]] +
               [[str(i), q, *_choices(q), a, "because"] for i, (q, a) in enumerate(DEV[subject])])
    return root


def make_mmlu(root: Path) -> Path:
    for subject, qs in QUESTIONS.items():
        _write(root / "data" / "test" / f"{subject}_test.csv", [[q, *_choices(q), a] for q, a in qs])
        _write(root / "data" / "dev" / f"{subject}_dev.csv", [[q, *_choices(q), a] for q, a in DEV[subject]])
    return root


def make_cmmlu(root: Path) -> Path:
    for subject, qs in QUESTIONS.items():
        _write(root / "test" / f"{subject}.csv", [["", "Question", "A", "B", "C", "D", "Answer"]] +
               [[str(i), q, *_choices(q), a] for i, (q, a) in enumerate(qs)])
        _write(root / "dev" / f"{subject}.csv", [["", "Question", "A", "B", "C", "D", "Answer"]] +
               [[str(i), q, *_choices(q), a] for i, (q, a) in enumerate(DEV[subject])])
    return root


MAKERS = {"ceval": make_ceval, "mmlu": make_mmlu, "cmmlu": make_cmmlu}


class LetterStub(nn.Module):
    """Puts a high logit on the letter ``pick(question number)`` at every position of a row.

    The question is the last ``Q<n>`` marker in the row's decoded text (few-shot examples use ``D<n>``).
    """

    def __init__(self, tokenizer, letter_ids: list[int], pick):
        super().__init__()
        self.tok, self.letter_ids, self.pick = tokenizer, letter_ids, pick
        self.config = SimpleNamespace(vocab_size=tokenizer.vocab_size)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls: list[list[int]] = []

    def forward(self, ids, position_ids=None, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        logits = torch.zeros(*ids.shape, self.config.vocab_size)
        for b, row in enumerate(ids.tolist()):
            text = self.tok.decode([t for t in row if t != self.tok.pad_id])
            self.calls.append(row)
            qnum = int(re.findall(r"Q(\d+)", text)[-1])
            logits[b, :, self.letter_ids["ABCD".index(self.pick(qnum))]] = 10.0
        return logits


def _answers() -> dict[int, str]:
    return {int(q[1:q.index(" ")]): a for qs in QUESTIONS.values() for q, a in qs}


def _run_mc(tokenizer, task_name, root, pick, shots=0, **kw):
    task, subjects = tasks.load_mc(task_name, str(root), shots=shots, **kw)
    letters = scoring.letter_tokens(tokenizer, task)
    model = LetterStub(tokenizer, letters.ids, pick)
    return scoring.evaluate_mc(model, tokenizer, task, subjects, batch_size=3, max_length=512), model


# --------------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize("task_name", ["ceval", "mmlu", "cmmlu"])
def test_mc_scoring_arithmetic(tmp_path, tokenizer, task_name):
    root = MAKERS[task_name](tmp_path / task_name)
    answers = _answers()
    right, _ = _run_mc(tokenizer, task_name, root, lambda q: answers[q])
    assert (right["correct"], right["total"], right["micro_accuracy"], right["macro_accuracy"]) == (6, 6, 1.0, 1.0)

    wrong, _ = _run_mc(tokenizer, task_name, root, lambda q: "ABCD"[("ABCD".index(answers[q]) + 1) % 4])
    assert (wrong["correct"], wrong["micro_accuracy"], wrong["macro_accuracy"]) == (0, 0.0, 0.0)

    # Known mix: alpha_beta 3/4 right (Q4 wrong), gamma 1/2 (Q6 wrong).
    mix, _ = _run_mc(tokenizer, task_name, root, lambda q: "A" if q in (4, 6) else answers[q])
    assert mix["subjects"]["alpha_beta"] == {"correct": 3, "total": 4, "accuracy": 0.75}
    assert mix["subjects"]["gamma"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert mix["micro_accuracy"] == 4 / 6
    assert mix["macro_accuracy"] == (0.75 + 0.5) / 2
    assert mix["split"] == {"ceval": "val", "mmlu": "test", "cmmlu": "test"}[task_name]


def test_mc_few_shot_and_batching_match_single(tmp_path, tokenizer):
    root = make_mmlu(tmp_path / "mmlu")
    answers = _answers()
    res, model = _run_mc(tokenizer, "mmlu", root, lambda q: answers[q], shots=2)
    assert res["micro_accuracy"] == 1.0 and res["shots"] == 2 and res["prompts_with_fewer_shots"] == 0
    # Every prompt the model saw starts with BOS and ends with "Answer:" (pad stripped).
    task, subjects = tasks.load_mc("mmlu", str(root), shots=2)
    letters = scoring.letter_tokens(tokenizer, task)
    want = scoring.encode_mc_prompt(tokenizer, task, subjects[0], 0, letters, 512).ids
    seen = [[t for t in row if t != tokenizer.pad_id] for row in model.calls]
    assert want in seen and want[0] == tokenizer.bos_id


def test_ceval_test_split_gives_predictions_only(tmp_path, tokenizer):
    root = make_ceval(tmp_path / "ceval")
    res, _ = _run_mc(tokenizer, "ceval", root, lambda q: "C", split="test")
    assert res["total"] == 0 and res["micro_accuracy"] is None
    assert res["subjects"]["gamma"]["predictions"] == ["C", "C"]


def test_few_shot_prompts_exact(tmp_path):
    mmlu_task, mmlu = tasks.load_mc("mmlu", str(make_mmlu(tmp_path / "m")), shots=1, subjects=["gamma"])
    q = mmlu[0].questions[0]
    assert mmlu_task.build_prompt(q, mmlu[0].shots) == (
        "The following are multiple choice questions (with answers) about gamma.\n\n"
        "D0 dev question 0 of gamma\nA. D0 option A\nB. D0 option B\nC. D0 option C\nD. D0 option D\nAnswer: A\n\n"
        "Q5 fifth\nA. Q5 option A\nB. Q5 option B\nC. Q5 option C\nD. Q5 option D\nAnswer:")
    ceval_task, ceval = tasks.load_mc("ceval", str(make_ceval(tmp_path / "c")), shots=2, subjects=["alpha_beta"])
    assert ceval_task.build_prompt(ceval[0].questions[1], ceval[0].shots) == (
        "以下是中国关于alpha beta考试的单项选择题，请选出其中的正确答案。\n\n"
        "D0 dev question 0 of alpha_beta\nA. D0 option A\nB. D0 option B\nC. D0 option C\nD. D0 option D\n答案：A\n\n"
        "D1 dev question 1 of alpha_beta\nA. D1 option A\nB. D1 option B\nC. D1 option C\nD. D1 option D\n答案：B\n\n"
        "Q2 second\nA. Q2 option A\nB. Q2 option B\nC. Q2 option C\nD. Q2 option D\n答案：")
    cm_task, cm = tasks.load_mc("cmmlu", str(make_cmmlu(tmp_path / "cm")), shots=0, subjects=["gamma"])
    assert cm_task.build_prompt(cm[0].questions[1], []) == (
        "以下是关于gamma的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：Q6 sixth\nspans two lines\nA. Q6 option A\nB. Q6 option B\nC. Q6 option C\nD. Q6 option D\n答案是：")


def test_subject_mapping_json(tmp_path):
    root = make_ceval(tmp_path / "c")
    (root / "subject_mapping.json").write_text(json.dumps({"gamma": ["Gamma", "伽马", "STEM"]}), encoding="utf-8")
    task, subs = tasks.load_mc("ceval", str(root), subjects=["gamma"])
    assert task.build_prompt(subs[0].questions[0], []).startswith("以下是中国关于伽马考试的单项选择题")


def test_letter_tokens_follow_the_prompt_style(tokenizer):
    mmlu = scoring.letter_tokens(tokenizer, tasks.MMLU)
    assert [tokenizer.id_to_piece(i) for i in mmlu.ids] == ["▁A", "▁B", "▁C", "▁D"] and mmlu.extra == []
    ceval = scoring.letter_tokens(tokenizer, tasks.CEVAL)
    assert [tokenizer.id_to_piece(i) for i in ceval.ids] == ["A", "B", "C", "D"] and ceval.extra == []
    # "Answer: A" tokenises as the prompt's tokens + the letter token: what the model is scored on.
    assert tokenizer.encode("Answer: C") == tokenizer.encode("Answer:") + [mmlu.ids[2]]


def test_letter_tokens_fallback_when_letter_merges(tokenizer):
    class Merging:  # a tokenizer that merges "：A" into one piece, like some large Chinese vocabularies
        unk_id = 0

        def encode(self, text):
            if text[-2:-1] == "：" and text[-1] in "ABCD":
                return [ord(c) for c in text[:-2]] + [5000 + ord(text[-1])]  # "：A" is one piece
            return [ord(c) for c in text]

        def piece_to_id(self, piece):
            return {"A": 65, "B": 66, "C": 67, "D": 68}.get(piece, 0)

    got = scoring.letter_tokens(Merging(), tasks.CEVAL)
    assert got.ids == [65, 66, 67, 68] and got.extra == []


def test_too_long_prompt_drops_shots_then_truncates(tmp_path, tokenizer):
    task, subs = tasks.load_mc("mmlu", str(make_mmlu(tmp_path / "m")), shots=3, subjects=["gamma"])
    letters = scoring.letter_tokens(tokenizer, task)
    full = scoring.encode_mc_prompt(tokenizer, task, subs[0], 0, letters, 10_000)
    zero_ids = [tokenizer.bos_id] + tokenizer.encode(task.build_prompt(subs[0].questions[0], []))
    zero = len(zero_ids)
    fewer = scoring.encode_mc_prompt(tokenizer, task, subs[0], 0, letters, len(full.ids) - 1)
    assert full.shots_used == 3 and fewer.shots_used == 2 and not fewer.truncated
    cut = scoring.encode_mc_prompt(tokenizer, task, subs[0], 0, letters, zero - 5)
    assert cut.shots_used == 0 and cut.truncated and cut.ids == zero_ids[5:]


# ------------------------------------------------------------------------------------------ CSV errors


def test_csv_wrong_field_count_names_file_and_line(tmp_path):
    root = make_ceval(tmp_path / "c")
    bad = root / "val" / "gamma_val.csv"
    _write(bad, [["id", "question", "A", "B", "C", "D", "answer"], ["0", "multi\nline", "a", "b", "c", "d", "A"],
                 ["1", "q", "a", "b", "c", "A"]])
    with pytest.raises(EvalDataError, match=re.escape(f"{bad}:4: expected 7 fields, got 6")):
        tasks.load_mc("ceval", str(root))


def test_csv_bad_answer_names_file_line_column(tmp_path):
    root = make_mmlu(tmp_path / "m")
    bad = root / "data" / "test" / "gamma_test.csv"
    _write(bad, [["q1", "a", "b", "c", "d", "B"], ["q2", "a", "b", "c", "d", "E"]])
    msg = f"{bad}:2: column 6 (answer) is 'E', expected one of A, B, C, D"
    with pytest.raises(EvalDataError, match=re.escape(msg)):
        tasks.load_mc("mmlu", str(root))


def test_missing_files_and_dirs_are_named(tmp_path):
    root = make_cmmlu(tmp_path / "cm")
    (root / "dev" / "gamma.csv").unlink()
    with pytest.raises(EvalDataError, match=re.escape(f"{root / 'dev' / 'gamma.csv'}: file not found")):
        tasks.load_mc("cmmlu", str(root), shots=1)
    with pytest.raises(EvalDataError, match="not a directory"):
        tasks.load_mc("cmmlu", str(tmp_path / "nope"))
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(EvalDataError, match=r"no \*\.csv files"):
        tasks.load_mc("cmmlu", str(tmp_path / "empty"))
    hdr = root / "test" / "alpha_beta.csv"
    _write(hdr, [["", "Q", "A", "B", "C", "D", "Answer"], ["0", "q", "a", "b", "c", "d", "A"]])
    with pytest.raises(EvalDataError, match=re.escape(f"{hdr}:1: header") + ".*no column 'question'"):
        tasks.load_mc("cmmlu", str(root))
    with pytest.raises(EvalDataError, match="fewer than --shots 5"):
        tasks.load_mc("mmlu", str(make_mmlu(tmp_path / "m")), shots=5)


# ------------------------------------------------------------------------------------------------ GSM8K


@pytest.mark.parametrize("text, want", [
    ("She pays 3 + 4 = 7 dollars.\nThe answer is 1,234.", "1234"),
    ("so 10 - 2 = 8 #### 8", "8"),
    ("#### 1,000.00\n\nQuestion: how many 5 apples", "1000"),
    ("The total is $3.50.", "3.5"),
    ("It drops by -12 degrees", "-12"),
    ("no number here", None),
    ("7.0 cookies", "7"),
    ("answer 0.5 then 2.", "2"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_gsm8k_reference_and_normalisation():
    assert gsm8k_reference("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gsm8k_reference("#### 1,250") == "1250"
    assert gsm8k_reference("no marker 5") is None
    assert normalize_number("-0.0") == "0" and normalize_number(".25") == "0.25"


def _gsm_file(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_gsm8k_reader_errors(tmp_path):
    bad = _gsm_file(tmp_path / "a.jsonl", [{"question": "q", "answer": "#### 3"}, {"question": "q", "answer": "3"}])
    with pytest.raises(EvalDataError, match=re.escape(f"{bad}:2: answer does not end with '#### <number>'")):
        tasks.read_gsm8k(str(bad))
    bad.write_text('{"question": "q", "answer": "#### 3"}\n{"question": \n', encoding="utf-8")
    with pytest.raises(EvalDataError, match=re.escape(f"{bad}:2: not valid JSON")):
        tasks.read_gsm8k(str(bad))
    with pytest.raises(EvalDataError, match="no test.jsonl"):
        tasks.gsm8k_files(str(tmp_path))


def test_gsm8k_prompt_and_scoring(tmp_path, tokenizer, monkeypatch):
    shots = [tasks.GenExample("1+1?", "1+1=2\n#### 2", "2")]
    assert tasks.gsm8k_prompt("2+3?", shots) == "Question: 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: 2+3?\nAnswer:"
    examples = [tasks.GenExample(f"q{i}", f"#### {i}", str(i)) for i in range(4)]
    outputs = [" 0 #### 0", " it is 7\n\nQuestion: 1", " 2,000 no: 2", " nothing"]  # right, wrong, right, none
    seen = {}

    def fake_generate(model, prompts, *, max_new_tokens, eos_id, batch_size):
        seen["prompts"] = prompts
        return [tokenizer.encode(o) for o in outputs]

    monkeypatch.setattr(scoring, "greedy_generate", fake_generate)
    res = scoring.evaluate_gsm8k(None, tokenizer, examples, shots, max_new_tokens=8, save_predictions=True)
    assert (res["correct"], res["total"], res["accuracy"]) == (2, 4, 0.5)
    assert [p["prediction"] for p in res["predictions"]] == ["0", "7", "2", None]
    assert seen["prompts"][1] == [tokenizer.bos_id] + tokenizer.encode(tasks.gsm8k_prompt("q1", shots))


# ------------------------------------------------------------------------------------ perplexity


class TinyLM(nn.Module):
    """A deterministic causal LM with our call signature (logits depend on the current and previous token)."""

    def __init__(self, vocab: int, dim: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.out = nn.Parameter(torch.randn(dim, vocab, generator=g) * 0.3)
        self.config = SimpleNamespace(vocab_size=vocab)

    def forward(self, ids, position_ids=None, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        h = self.emb[ids]
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        if position_ids is not None:  # a new sample starts at position 0: no previous token
            prev = prev * (position_ids > 0).unsqueeze(-1)
        return torch.tanh(h + 0.5 * prev) @ self.out


def _index_dir(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True)
    lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records]
    (path / "data.jsonl").write_bytes(b"".join(lines))
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    (path / "index").write_text("".join(f"{o}\n" for o in offsets))
    return path


def test_perplexity_equals_direct_computation(tmp_path, tokenizer):
    records = [{"input": "", "output": "The quick brown fox jumps over the lazy dog. " * 3},
               {"input": "Translate: hello", "output": "你好"},
               {"input": "", "output": "short"}]
    path = _index_dir(tmp_path / "idx", records)
    model = TinyLM(tokenizer.vocab_size)
    max_length = 16
    total, count = 0.0, 0
    for r in records:  # upstream rule: [BOS]+input+output, labels on output + EOS; 16-token windows
        inp = tokenizer.encode(r["input"]) if r["input"] else []
        out = tokenizer.encode(r["output"])
        src, tgt = [tokenizer.bos_id] + inp + out, [-100] * len(inp) + out + [tokenizer.eos_id]
        for s in range(0, len(src), max_length):
            ids, lab = torch.tensor([src[s:s + max_length]]), torch.tensor(tgt[s:s + max_length])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0].double(), -1)
            for t, y in enumerate(lab.tolist()):
                if y != -100:
                    total -= float(logp[t, y])
                    count += 1
    res = scoring.evaluate_perplexity(model, tokenizer, str(path), max_length=max_length, batch_size=3)
    assert res["tokens"] == count and res["lines"] == 3
    assert res["loss"] == pytest.approx(total / count, rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
    two = scoring.evaluate_perplexity(model, tokenizer, str(path), max_length=max_length, max_lines=2)
    assert two["lines"] == 2 and two["tokens"] == count - len(tokenizer.encode("short")) - 1


# ------------------------------------------------------------------------------------ validation loss


def _packed_batch(samples: list[tuple[list[int], list[int], int]], rows: int, length: int, names: list[str]) -> dict:
    """Contract-2 batch from (src, tgt, task_id) samples packed greedily into ``rows`` rows."""
    inputs = torch.zeros(rows, length, dtype=torch.long)
    targets = torch.full((rows, length), -100, dtype=torch.long)
    task_ids = torch.full((rows, length), -1, dtype=torch.long)
    pos = torch.zeros(rows, length, dtype=torch.long)
    segs: list[list[int]] = [[] for _ in range(rows)]
    fill, row = [0] * rows, 0
    for src, tgt, tid in samples:
        if fill[row] + len(src) > length:
            row += 1
        a, b = fill[row], fill[row] + len(src)
        inputs[row, a:b], targets[row, a:b] = torch.tensor(src), torch.tensor(tgt)
        task_ids[row, a:b], pos[row, a:b] = tid, torch.arange(len(src))
        fill[row] = b
        segs[row].append(len(src))
    cu = [0]
    for r in range(rows):  # the padding tail of a row is its own segment
        for n in segs[r] + ([length - fill[r]] if fill[r] < length else []):
            cu.append(cu[-1] + n)
    lengths = torch.tensor(fill)
    return {"inputs": inputs, "targets": targets, "task_ids": task_ids, "position_ids": pos,
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32), "max_seqlen": max(b - a for a, b in zip(cu, cu[1:])),
            "lengths": lengths, "num_tokens": int(lengths.sum()), "task_names": names, "indexes": {}}


def _tiny_dragonfly_config(tokenizer) -> dict:
    return {"vocab_size": tokenizer.vocab_size, "dim_model": 32, "dim_ff": 64, "dim_head": 8, "num_heads": 4,
            "num_kv_heads": 2, "num_layers": 2, "max_length": 64, "dtype": "float32", "scale": True,
            "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 16, "tie_lm_head": True}


def _tiny_dragonfly(tokenizer):
    torch.manual_seed(0)
    model = build_model(load_model_config(_tiny_dragonfly_config(tokenizer), "dragonfly"), device="cpu",
                        dtype=torch.float32)
    return model.eval()


def _samples(tokenizer) -> list[tuple[list[int], list[int], int]]:
    out = []
    for i, (inp, txt) in enumerate([("", "alpha beta gamma delta"), ("Q:", "an answer"), ("", "one two three"),
                                    ("say", "hi there friend"), ("", "last sample here")]):
        a = tokenizer.encode(inp) if inp else []
        b = tokenizer.encode(txt)
        out.append(([tokenizer.bos_id] + a + b, [-100] * len(a) + b + [tokenizer.eos_id], i % 2))
    return out


def test_evaluate_loss_equals_plain_cross_entropy(tokenizer):
    model = _tiny_dragonfly(tokenizer)
    samples = _samples(tokenizer)
    names = ["web", "sft"]
    batches = [_packed_batch(samples[:3], 2, 24, names), _packed_batch(samples[3:], 2, 24, names)]
    sums = {0: 0.0, 1: 0.0}
    counts = {0: 0, 1: 0}
    for src, tgt, tid in samples:  # each sample alone, unpacked: packing must not change the loss
        with torch.no_grad():
            logits = model(torch.tensor([src]), torch.arange(len(src)).unsqueeze(0))
        losses = F.cross_entropy(logits[0].double(), torch.tensor(tgt), ignore_index=-100, reduction="none")
        sums[tid] += float(losses.sum())
        counts[tid] += sum(t != -100 for t in tgt)
    model.train()
    res = evaluate_loss(model, batches)
    assert model.training  # mode restored
    total = counts[0] + counts[1]
    assert res["tokens"] == total
    assert res["loss"] == pytest.approx((sums[0] + sums[1]) / total, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]), rel=1e-9)
    for tid, name in enumerate(names):
        assert res["per_task"][name]["tokens"] == counts[tid]
        assert res["per_task"][name]["loss"] == pytest.approx(sums[tid] / counts[tid], rel=1e-5)
    assert evaluate_loss(model, batches) == res  # deterministic

    # Two "ranks" each evaluating one batch, summed the way the trainer all-reduces, give the same result.
    parts = [sums_tensor(evaluate_loss(model, [b]), names) for b in batches]
    merged = from_sums_tensor(parts[0] + parts[1], names)
    assert merged["tokens"] == res["tokens"]
    assert merged["loss"] == pytest.approx(res["loss"], rel=1e-12)
    assert merged["per_task"]["sft"]["loss"] == pytest.approx(res["per_task"]["sft"]["loss"], rel=1e-12)


def test_evaluate_loss_custom_loss_fn_and_empty_task(tokenizer):
    model = TinyLM(tokenizer.vocab_size)
    batch = _packed_batch(_samples(tokenizer)[:2], 1, 40, ["a", "b", "never"])
    res = evaluate_loss(model, [batch], loss_fn=lambda logits, t: (t != -100).float() * 2.0)
    assert res["loss"] == 2.0 and set(res["per_task"]) == {"a", "b"} and res["task_names"] == ["a", "b", "never"]
    assert sums_tensor(res, ["a", "b", "never"])[1, 2] == 0


def test_fixed_batches_are_deterministic(tmp_path, tokenizer):
    from fm.eval.validation import fixed_batches

    _index_dir(tmp_path / "d", [{"input": "", "output": f"validation text number {i} " * 3} for i in range(20)])
    cfg = tmp_path / "eval.json"
    cfg.write_text(json.dumps([{"task_name": "valid", "abs_weight": 1.0, "path": "d", "allow_repeat": True}]))
    a = fixed_batches(str(cfg), tokenizer, batch_size=2, max_length=32, n_batches=3)
    b = fixed_batches(str(cfg), tokenizer, batch_size=2, max_length=32, n_batches=3)
    assert len(a) == 3
    for x, y in zip(a, b):
        assert torch.equal(x["inputs"], y["inputs"]) and torch.equal(x["targets"], y["targets"])
    model = TinyLM(tokenizer.vocab_size)
    assert evaluate_loss(model, a) == evaluate_loss(model, b)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_on_tiny_dragonfly_pt(tmp_path, tokenizer, tokenizer_path, capsys):
    model = _tiny_dragonfly(tokenizer)
    run = tmp_path / "save" / "run1"
    (tmp_path / "model.json").write_text(json.dumps(_tiny_dragonfly_config(tokenizer)))
    for step in (10, 20):  # 20 has no completion marker (a crashed save): 10 is used
        (run / str(step)).mkdir(parents=True)
        torch.save(model.state_dict(), run / str(step) / f"fm9g_live_checkpoint-{step}.pt")
        # what the trainer saves: the train config, whose "config" key names the model config
        (run / str(step) / "config.json").write_text(json.dumps({"config": "../../../model.json", "lr": 0.01}))
    (run / "10" / ".complete").write_text("10")
    mmlu = make_mmlu(tmp_path / "mmlu")
    gsm = _gsm_file(tmp_path / "gsm" / "test.jsonl", [{"question": "1+1?", "answer": "2 #### 2"},
                                                      {"question": "2+2?", "answer": "4 #### 4"}])
    _gsm_file(tmp_path / "gsm" / "train.jsonl", [{"question": "3+3?", "answer": "6 #### 6"}])
    idx = _index_dir(tmp_path / "idx", [{"input": "", "output": "some text to score"}, {"input": "a", "output": "b"}])
    out = tmp_path / "results.json"

    from fm.eval.__main__ import main

    rc = main(["--checkpoint", str(tmp_path / "save" / "run1"), "--tokenizer", tokenizer_path,
               "--mmlu-dir", str(mmlu), "--shots", "1", "--gsm8k", str(gsm.parent), "--gsm8k-shots", "1",
               "--max-new-tokens", "4", "--ppl-data", str(idx), "--output", str(out), "--batch-size", "2",
               "--max-length", "64"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["weights"].endswith("fm9g_live_checkpoint-10.pt")
    assert res["model_config"].endswith("config.json:config=../../../model.json")
    assert res["tasks"]["mmlu"]["total"] == 6 and set(res["tasks"]["mmlu"]["subjects"]) == set(QUESTIONS)
    assert res["tasks"]["gsm8k"]["total"] == 2 and res["tasks"]["gsm8k"]["shots"] == 1
    direct = scoring.evaluate_perplexity(model, tokenizer, str(idx), max_length=64)
    assert res["tasks"][f"ppl:{idx}"]["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    printed = capsys.readouterr().out
    assert "mmlu" in printed and "gsm8k" in printed and "perplexity data" in printed

    # The plain form: a .pt file and --model-config.
    pt = run / "10" / "fm9g_live_checkpoint-10.pt"
    assert main(["--checkpoint", str(pt), "--model-config", str(tmp_path / "model.json"), "--tokenizer",
                 tokenizer_path, "--ppl-data", str(idx), "--output", str(out)]) == 0
    res2 = json.loads(out.read_text())
    assert res2["model_config"] == str(tmp_path / "model.json")
    assert res2["tasks"][f"ppl:{idx}"]["loss"] == pytest.approx(direct["loss"], rel=1e-6)


def test_model_config_beside_checkpoint(tmp_path, tokenizer):
    from fm.checkpoint.open import CheckpointFormError, open_checkpoint

    pt = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    with pytest.raises(CheckpointFormError, match="give it with --config"):
        _ = open_checkpoint(pt).model_config
    (tmp_path / "config.json").write_text(json.dumps({"config": "tiny", "train_iters": 3}))
    ck = open_checkpoint(pt)
    assert type(ck.model_config).__name__ == "DragonflyConfig" and ck.config_source.endswith("config.json:config=tiny")
    (tmp_path / "config.json").write_text(json.dumps({"model": _tiny_dragonfly_config(tokenizer)}))
    ck = open_checkpoint(pt)
    assert ck.model_config.dim_model == 32 and ck.config_source.endswith("config.json:model")
    (tmp_path / "model_config.json").write_text(json.dumps(_tiny_dragonfly_config(tokenizer) | {"num_layers": 3}))
    assert open_checkpoint(pt).model_config.num_layers == 3  # model_config.json comes first
    (tmp_path / "m.json").write_text(json.dumps(_tiny_dragonfly_config(tokenizer) | {"num_layers": 4}))
    assert open_checkpoint(pt).model_config.num_layers == 4  # then <stem>.json beside a lone .pt


def test_token_losses_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 11, generator=g, dtype=torch.bfloat16)
    targets = torch.randint(0, 11, (2, 7), generator=g)
    targets[0, :3] = -100
    want = F.cross_entropy(logits.float().reshape(-1, 11), targets.reshape(-1), reduction="none").view(2, 7)
    from fm.eval.validation import token_losses

    assert torch.equal(token_losses(logits, targets, chunk=3), want)


def test_cli_on_hf_directory(tmp_path, tokenizer, tokenizer_path):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    idx = _index_dir(tmp_path / "idx", [{"input": "", "output": "some text to score here"}])
    from fm.eval.__main__ import main

    out = tmp_path / "r.json"
    assert main(["--checkpoint", str(tmp_path / "hf"), "--tokenizer", tokenizer_path, "--ppl-data", str(idx),
                 "--output", str(out)]) == 0
    src, tgt = scoring.sample_tokens(tokenizer, {"input": "", "output": "some text to score here"}, "x")
    with torch.no_grad():
        want = F.cross_entropy(hf(torch.tensor([src])).logits[0].double(), torch.tensor(tgt))
    assert json.loads(out.read_text())["tasks"][f"ppl:{idx}"]["loss"] == pytest.approx(float(want), rel=1e-5)


def test_cli_errors_are_clear(tmp_path, tokenizer_path, capsys):
    from fm.eval.__main__ import main

    root = make_mmlu(tmp_path / "m")
    _write(root / "data" / "test" / "gamma_test.csv", [["q", "a", "b", "c", "d"]])
    assert main(["--checkpoint", str(tmp_path), "--tokenizer", tokenizer_path, "--mmlu-dir", str(root)]) == 2
    assert "gamma_test.csv:1: expected 6 fields, got 5" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--tokenizer", tokenizer_path, "--ppl-data", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err

"""Data stages in one run, end to end: 2 processes (torchrun, FSDP2 on gloo, tiny dragonfly), 20 steps of 2
micro-batches each with a loader worker per rank, the mixture switching at iteration 10 (stage 0: a 2 : b 1; stage 1:
a 1 : c 3). Per-task token shares follow each stage's weights; a run killed after the boundary and resumed trains
exactly the uninterrupted run's batches; a run resumed before the boundary switches at the same step."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.helpers import WORDS, _write_run, launch, stats, write_index

BOUNDARY, STEPS = 10, 20


def _run(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    for name, n in (("a", 400), ("b", 200), ("c", 300)):  # plain text: every token is trained on (targets = tokens)
        write_index(tmp / "data" / name,
                    [{"input": "", "output": f"{name}{i} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 9)))}
                     for i in range(n)])
    (tmp / "data" / "decay.json").write_text(json.dumps([{"task_name": "a", "abs_weight": 1.0, "path": "a"},
                                                         {"task_name": "c", "abs_weight": 3.0, "path": "c"}]))
    mixture = [{"task_name": "a", "abs_weight": 2.0, "path": "a"}, {"task_name": "b", "abs_weight": 1.0, "path": "b"}]
    cfg = {"train_iters": STEPS, "save_iters": 4, "lr": 0.01, "warmup_iters": 2, "lr_scheduler": "warmupstabledrop",
           "drop_iters": STEPS - BOUNDARY, "inspect_iters": 0, "seed": 7, "grad_accum": 2,
           "dataloader_num_workers": 1, "save": str(tmp / "ckpt"), "tensorboard": str(tmp / "tb"),
           "resume_ckpt": "latest",
           "data_stages": [{"start_iter": "decay", "dataset_config": str(tmp / "data" / "decay.json")}]}
    return _write_run(tmp, mixture, cfg, {})


def _batches(rec: Path) -> dict[tuple[int, int], list[dict]]:
    """(rank, iteration) → that step's micro-batches' data lines, as the RecordIndexes fault wrote them."""
    out: dict[tuple[int, int], list[dict]] = {}
    for f in sorted(rec.glob("rank-*.jsonl")):
        rank = int(f.stem.split("-")[1])
        for line in f.read_text().splitlines():
            row = json.loads(line)
            out.setdefault((rank, row["iter"]), []).append(row["indexes"])
    return out


@pytest.mark.slow
def test_two_stage_run_shares_and_exact_resume_around_the_switch(tmp_path):
    cfg = _run(tmp_path / "ref")
    rc, out = launch(cfg, faults={"record_indexes": tmp_path / "rec_ref"})
    assert rc == 0, out
    assert "stage 1 from iteration 10" in out and "| stage 1 |" in out
    ref_run = tmp_path / "ref" / "ckpt" / "run"
    ref, ref_batches = stats(ref_run), _batches(tmp_path / "rec_ref")
    assert sorted(ref) == list(range(1, STEPS + 1)) and len(ref_batches) == 2 * STEPS
    assert [ref[i]["stage"] for i in ref] == [0] * BOUNDARY + [1] * (STEPS - BOUNDARY)
    # the switch is at the step, on both ranks, for both micro-batches: b only before it, c only after it
    for (rank, it), micros in ref_batches.items():
        assert len(micros) == 2
        tasks = set().union(*micros)
        assert tasks <= ({"a", "b"} if it <= BOUNDARY else {"a", "c"}) and "a" in tasks, (rank, it, tasks)
    # per-task token shares of each stage (all ranks; plain text, so target tokens are the tokens)
    for stage, rows, want in ((0, range(1, BOUNDARY + 1), {"a": 2 / 3, "b": 1 / 3, "c": 0.0}),
                              (1, range(BOUNDARY + 1, STEPS + 1), {"a": 1 / 4, "b": 0.0, "c": 3 / 4})):
        tokens = {t: sum(ref[i]["task_targets"][t] for i in rows) for t in "abc"}
        total = sum(tokens.values())
        for t, w in want.items():
            assert abs(tokens[t] / total - w) < 0.03, (stage, tokens, want)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "ref" / "tb" / "run"))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("Data/stage")} == {i: ref[i]["stage"] for i in ref}

    # killed after the boundary (step 14; checkpoints 4, 8, 12), resumed from 12: the uninterrupted run's batches
    cfg = _run(tmp_path / "crash")
    rc, out = launch(cfg, faults={"die_after": 14})
    assert rc != 0, out
    rc, out = launch(cfg, faults={"record_indexes": tmp_path / "rec_after"})
    assert rc == 0, out
    assert "resumed at iteration 12" in out
    after, got = stats(tmp_path / "crash" / "ckpt" / "run"), _batches(tmp_path / "rec_after")
    assert got == {k: v for k, v in ref_batches.items() if k[1] > 12}
    assert all(after[i]["loss"] == ref[i]["loss"] and after[i]["stage"] == 1 for i in range(13, STEPS + 1))

    # resumed before the boundary (the reference's step 8) into a new run: switches at the same step, same batches
    cfg = _run(tmp_path / "early")
    rc, out = launch(cfg, args=("--resume_ckpt", str(ref_run / "8")),
                     faults={"record_indexes": tmp_path / "rec_before"})
    assert rc == 0, out
    assert "resumed at iteration 8" in out
    early, got = stats(tmp_path / "early" / "ckpt" / "run"), _batches(tmp_path / "rec_before")
    assert got == {k: v for k, v in ref_batches.items() if k[1] > 8}
    assert all(early[i]["loss"] == ref[i]["loss"] and early[i]["stage"] == ref[i]["stage"]
               for i in range(9, STEPS + 1))

"""Checkpoint averaging of real runs: a tiny dragonfly trains 6 steps on 2 processes, saving every 2 steps with
``checkpoint.merge_last_n: 2``, on the fsdp engine (sync saves) and on BMTrain's CPU backend (async saves). Both
engines' step directories hold the dense model (rank 0 gathers it), so ``fm merge --run DIR --last 3`` is the mean
of the three model files, and the trainer's ``merged_last_2.pt`` is the mean of the newest two; the merged weights
load strictly into the plain model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fm import cli
from tests.helpers import launch, make_run

TRAIN = {"train_iters": 6, "save_iters": 2, "warmup_iters": 1, "inspect_iters": 0, "keep_last_n": 3}


def _model(run: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run / str(step) / f"fm9g_live_checkpoint-{step}.pt", weights_only=True)


def _assert_mean(got: dict[str, torch.Tensor], sds: list[dict[str, torch.Tensor]]) -> None:
    assert set(got) == set(sds[0])
    for k in sds[0]:
        torch.testing.assert_close(got[k], torch.stack([sd[k].float() for sd in sds]).mean(0).to(sds[0][k].dtype),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("engine", ["fsdp", "bmtrain"])
def test_a_trained_runs_checkpoints_merge(tmp_path, engine):
    cfg = make_run(tmp_path, repeat=True, engine=engine,
                   checkpoint={"merge_last_n": 2, "async_save": engine == "bmtrain"}, **TRAIN)
    rc, out = launch(cfg, bmtrain_cpu=engine == "bmtrain")
    assert rc == 0, out[-4000:]
    run = tmp_path / "ckpt" / "run"
    if engine == "bmtrain":  # BMTrain's own per-rank optimizer files: the run really was on bmtrain
        assert (run / "6" / "optimizer" / "rank-1-of-2.pt").is_file()
    assert "merged_last_2.pt holds the average of the checkpoints at steps 4, 6 (" in out, out[-4000:]

    # the trainer's running average: the newest two of the saved files
    merged = run / "merged_last_2.pt"
    _assert_mean(torch.load(merged, weights_only=True), [_model(run, 4), _model(run, 6)])
    assert json.loads(merged.with_suffix(".merge.json").read_text())["steps"] == [4, 6]

    # fm merge of the run's last three; open_checkpoint gives the same dense weights the step directory holds
    from fm.checkpoint.open import open_checkpoint

    sds = [_model(run, s) for s in (2, 4, 6)]
    assert all(torch.equal(a, b) for a, b in zip(open_checkpoint(run / "6").state_dict().values(), sds[2].values()))
    avg = tmp_path / "avg.pt"
    assert cli.main(["merge", "--run", str(run), "--last", "3", "-o", str(avg)]) == 0
    _assert_mean(torch.load(avg, weights_only=True), sds)
    opened = open_checkpoint(avg)
    assert opened.tokenizer is not None
    opened.build_model(strict=True)  # every tensor of the model, none else

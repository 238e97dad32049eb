"""LR schedules against closed-form values; re-warm; muP groups."""

from __future__ import annotations

import math

import pytest
import torch

from fm.train.config import load_config
from fm.train.optim import mup_param_groups
from fm.train.schedules import LRScheduler, Schedule, build_scheduler

LR, T, W, D = 0.01, 100, 10, 20


def test_warmup_linear_from_step_zero():
    s = Schedule("constant", LR, T, W)
    assert [s.lr_at(t) for t in range(3)] == pytest.approx([LR * 1 / W, LR * 2 / W, LR * 3 / W])
    assert s.lr_at(W - 1) == pytest.approx(LR) and s.lr_at(W) == LR and s.lr_at(T) == LR


def test_cosine_closed_form_and_floor():
    s = Schedule("cosine", LR, T, W)
    for t in (10, 30, 55, 80, 99, 100, 150):
        p = min(1.0, (t - W) / (T - W))
        assert s.lr_at(t) == pytest.approx(LR * (0.1 + 0.45 * (1 + math.cos(math.pi * p))))
    assert s.lr_at(W) == pytest.approx(LR)
    assert s.lr_at(T) == pytest.approx(0.1 * LR)
    assert min(s.lr_at(t) for t in range(300)) >= 0.1 * LR - 1e-15


def test_warmupstabledrop():
    s = Schedule("warmupstabledrop", LR, T, W, D)
    assert s.lr_at(50) == LR and s.lr_at(T - D - 1) == LR
    assert s.lr_at(T - D) == pytest.approx(LR)
    assert s.lr_at(T - D // 2) == pytest.approx(LR * (0.1 + 0.9 * 0.5))
    assert s.lr_at(T) == pytest.approx(0.1 * LR)


@pytest.mark.parametrize("begin", [-1, 40])
def test_warmupstableexp(begin):
    s = Schedule("warmupstableexp", LR, T, W, D, drop_begin=begin, drop_rate=0.5)
    b = begin if begin >= 0 else T - D
    assert s.lr_at(b - 1) == LR
    for t in (b, b + 7, b + D, T):
        assert s.lr_at(t) == pytest.approx(LR * 0.5 ** ((t - b) / D))


def test_linear():
    s = Schedule("linear", LR, T, W)
    assert s.lr_at(W) == pytest.approx(LR)
    assert s.lr_at(55) == pytest.approx(LR * 45 / 90)
    assert s.lr_at(T) == 0.0


def test_fractions_resolved_from_config():
    cfg = load_config(None, {"lr_scheduler": "WarmupStableDrop", "lr": LR, "train_iters": 200,
                             "warmup_iters": 0.05, "drop_iters": 0.1})
    sch = build_scheduler(cfg.schedule, None, lr=cfg.optim.lr, train_iters=cfg.run.train_iters)
    assert (sch.schedule.warmup_iters, sch.schedule.drop_iters) == (10, 20)


def test_scheduler_sets_group_lr_with_scale_and_rewarm():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([{"params": [p1], "lr_scale": 1.0}, {"params": [p2], "lr_scale": 1 / 9}], lr=1.0)
    sch = LRScheduler(opt, Schedule("constant", LR, T, 0), rewarm_iters=4)
    assert opt.param_groups[0]["lr"] == LR and opt.param_groups[1]["lr"] == pytest.approx(LR / 9)
    for _ in range(30):
        sch.step()
    state = sch.state_dict()
    sch2 = LRScheduler(opt, Schedule("constant", LR, T, 0), rewarm_iters=4)
    sch2.load_state_dict(state)
    sch2.start_rewarm()
    got = []
    for _ in range(6):
        got.append(opt.param_groups[0]["lr"])
        sch2.step()
    assert got == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR, LR, LR])
    assert sch2.num_iters == 36


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.input_embedding = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4, bias=False)
        self.layernorm = torch.nn.Parameter(torch.ones(4))


def test_mup_groups():
    m = _Tiny()
    groups = mup_param_groups(m, weight_decay=0.1, scale_width=9.0, scaled_names={"proj.weight"})
    by_scale = {g["lr_scale"]: g for g in groups}
    assert [p is m.proj.weight for p in by_scale[1 / 9]["params"]] == [True]
    assert len(by_scale[1.0]["params"]) == 2
    assert all(g["weight_decay"] == 0.1 for g in groups)  # upstream decays everything
    groups = mup_param_groups(m, weight_decay=0.1, scale_width=9.0, scaled_names={"proj.weight"},
                              decay_norms_and_embeddings=False)
    assert sorted(len(g["params"]) for g in groups if g["weight_decay"] == 0.0) == [2]


def test_mup_groups_of_flat_shards_use_the_full_shapes():
    # Under bmtrain every local shard is 1-D: the rule must read the full shapes (Engine.param_shapes).
    m = _Tiny()
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    for mod, name in ((m.input_embedding, "weight"), (m.proj, "weight")):
        flat = getattr(mod, name).detach().reshape(-1)[:3].clone()
        setattr(mod, name, torch.nn.Parameter(flat))
    groups = mup_param_groups(m, weight_decay=0.1, scale_width=9.0, scaled_names={"proj.weight"},
                              decay_norms_and_embeddings=False, shapes=shapes)
    decayed = [p for g in groups if g["weight_decay"] == 0.1 for p in g["params"]]
    assert [p is m.proj.weight for p in decayed] == [True]  # the matrix, not the norm or the embedding

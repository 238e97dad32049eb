"""Metrics: console line, tensorboard tags read back with tensorboard's reader, jsonl, MFU, inspect, PNG."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fm.train.metrics import (
    MetricsWriter,
    flops_per_token,
    format_inspect_table,
    format_step_line,
    inspect_stats,
    plot_loss_curve,
    read_stats,
)


def _step(i: int, **kw) -> dict:
    s = {"iter": i, "train_iters": 10, "loss": 5.0 - 0.1 * i, "lr": 1e-3 * i, "grad_norm": 0.5, "loss_scale": 1.0,
         "skipped": False, "skipped_steps": 0, "tokens": 100, "tokens_per_sec": 1000.0, "step_time": 0.1,
         "mfu": None, "memory": {"rss": 1.5}, "task_loss": {"wiki": 4.0 - 0.1 * i, "code": 3.0}, "world_size": 2}
    s.update(kw)
    return s


def test_console_line_has_every_field():
    line = format_step_line(_step(3, mfu=0.41, skipped=True, skipped_steps=1))
    for part in ("iter      3/10", "loss 4.7000", "lr 3.000e-03", "grad_norm 0.5000", "tokens/s 1000", "time 0.100s",
                 "mfu 41.0%", "mem 1.50GiB", "skipped 1", "SKIPPED", "wiki=3.7000", "code=3.0000"):
        assert part in line, part


def test_tensorboard_jsonl_and_png(tmp_path):
    w = MetricsWriter(enabled=True, tensorboard_dir=tmp_path / "tb", jsonl_path=tmp_path / "run" / "stats.jsonl")
    for i in range(1, 6):
        w.log_step(_step(i, mfu=0.25))
    w.log_step(_step(2, loss=9.0))  # a resumed run re-logs iteration 2: the last row wins in read_stats
    w.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"Loss/train", "Loss/train/wiki", "Loss/train/code", "Optimizer/lr", "Optimizer/scale",
            "Optimizer/grad_norm", "Optimizer/skipped_steps", "Throughput/tokens_per_sec",
            "Throughput/tokens_per_sec_per_device", "Throughput/mfu", "Throughput/step_time",
            "Memory/rss_gib"} <= tags
    lr = [(e.step, e.value) for e in acc.Scalars("Optimizer/lr")][:5]
    assert [s for s, _ in lr] == [1, 2, 3, 4, 5]
    assert all(math.isclose(v, 1e-3 * s, rel_tol=1e-6) for s, v in lr)
    assert acc.Scalars("Throughput/tokens_per_sec_per_device")[0].value == 500.0
    rows = read_stats(tmp_path / "run" / "stats.jsonl")
    assert [r["iter"] for r in rows] == [1, 2, 3, 4, 5] and rows[1]["loss"] == 9.0
    png = plot_loss_curve(tmp_path / "run" / "stats.jsonl", tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(enabled=False, tensorboard_dir=tmp_path / "tb", jsonl_path=tmp_path / "s.jsonl")
    w.log_step(_step(1))
    w.close()
    assert not (tmp_path / "tb").exists() and not (tmp_path / "s.jsonl").exists()


def test_all_tasks_off_skips_task_tags(tmp_path):
    w = MetricsWriter(enabled=True, tensorboard_dir=tmp_path / "tb", jsonl_path=None, all_tasks=False)
    w.log_step(_step(1))
    w.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert not any(t.startswith("Loss/train/") for t in acc.Tags()["scalars"])


def test_flops_per_token_formula():
    # 2.4B dragonfly: N = 2,442,057,984 non-embedding params, L=40, d=2304, S=4096.
    assert flops_per_token(2_442_057_984, 40, 2304, 4096) == 6 * 2_442_057_984 + 12 * 40 * 2304 * 4096
    # with the LM head's matmul (2.4B: vocab 122,753, tied): 6·d·V more per token, about 0.1 of the total
    with_head = flops_per_token(2_442_057_984, 40, 2304, 4096, 122_753)
    assert with_head - flops_per_token(2_442_057_984, 40, 2304, 4096) == 6 * 2304 * 122_753


def test_inspect_stats_match_torch():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    m(torch.randn(5, 4)).square().sum().backward()
    rows = inspect_stats(m, lambda t, op: t)  # world of one: the all-reduce is the identity
    by = {r["name"]: r for r in rows}
    w = m[0].weight
    assert by["0.weight"]["shape"] == (3, 4)
    assert by["0.weight"]["mean"] == pytest.approx(w.mean().item(), abs=1e-7)
    assert by["0.weight"]["std"] == pytest.approx(w.std(unbiased=False).item(), rel=1e-5)
    assert by["0.weight"]["max_abs"] == pytest.approx(w.abs().max().item())
    assert by["0.weight"]["grad_std"] == pytest.approx(w.grad.std(unbiased=False).item(), rel=1e-5)
    table = format_inspect_table(rows)
    assert "0.weight" in table and "grad std" in table and len(table.splitlines()) == 2 + 4


def test_inspect_stats_never_mix_host_tensors_into_device_work():
    # On a GPU every shipped config ran inspect_stats at iteration 100, and torch.stack refused the CPU
    # constants beside the device statistics. The meta device stands in for the accelerator.
    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    for p in m.parameters():
        p.grad = torch.empty_like(p)
    m[1].bias.grad = None  # a parameter without a gradient takes the constant path
    seen = []

    def all_reduce(t, op):
        seen.append((t.device.type, op))
        return t

    rows = inspect_stats(m, all_reduce, to_host=lambda t: torch.ones(t.shape))
    assert seen == [("meta", "sum"), ("meta", "max")]
    assert [r["name"] for r in rows] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert rows[0]["max_abs"] == 1.0 and all(r["has_grad"] for r in rows)  # decided from the reduced table


def _shards(values: dict[str, torch.Tensor | None], grads: dict[str, torch.Tensor | None]) -> torch.nn.Module:
    m = torch.nn.Module()
    for name, v in values.items():
        m.register_parameter(name, torch.nn.Parameter(v))
        m.get_parameter(name).grad = grads.get(name)
    return m


def test_inspect_decides_has_grad_across_ranks():
    # ZeRO: rank 0's shard of "w" is empty and holds no .grad, rank 1's holds all of it; "frozen" has no gradient
    # anywhere. Rank 0 must report w's gradient (not NaN) and "-" only for the frozen parameter.
    full_w, full_g = torch.arange(6.0), torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, -1.0])
    frozen = torch.ones(4)
    ranks = [_shards({"w": torch.empty(0), "frozen": frozen[:2]}, {}),
             _shards({"w": full_w.clone(), "frozen": frozen[2:]}, {"w": full_g.clone()})]
    tables = [[], []]
    for r, m in enumerate(ranks):  # what each rank contributes to the two all-reduces
        inspect_stats(m, lambda t, op, r=r: tables[r].append(t) or t)

    def all_reduce(t, op):
        mine = tables[0][0 if op == "sum" else 1]
        other = tables[1][0 if op == "sum" else 1]
        assert torch.equal(t, mine)
        return mine + other if op == "sum" else torch.maximum(mine, other)

    rows = {r["name"]: r for r in inspect_stats(ranks[0], all_reduce, shapes={"w": (6,), "frozen": (4,)})}
    assert rows["w"]["has_grad"] is True
    assert rows["w"]["grad_std"] == pytest.approx(full_g.std(unbiased=False).item(), rel=1e-6)
    assert rows["w"]["grad_max_abs"] == 3.0 and rows["w"]["std"] == pytest.approx(full_w.std(unbiased=False).item())
    assert rows["frozen"]["has_grad"] is False
    table = format_inspect_table(list(rows.values())).splitlines()
    assert "nan" not in "\n".join(table)
    assert table[3].split()[0] == "frozen" and table[3].split()[-1] == "-"
    assert table[2].split()[-1] == f"{full_g.std(unbiased=False).item():.3e}"


def test_metrics_cli(tmp_path):
    from fm.train.metrics import main

    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(json.dumps(_step(i)) for i in range(1, 4)) + "\n")
    assert main([str(p), str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_resume_in_the_same_second_keeps_the_first_runs_events(tmp_path):
    # tensorboardX names event files by the second: a second writer (a resume) must not truncate the first.
    for steps in ((1, 2, 3), (4, 5)):
        w = MetricsWriter(enabled=True, tensorboard_dir=tmp_path / "tb", jsonl_path=None)
        for i in steps:
            w.log_step(_step(i))
        w.close()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(e.step for e in acc.Scalars("Loss/train")) == [1, 2, 3, 4, 5]

"""``fm merge`` (checkpoint averaging) and the trainer's ``checkpoint.merge_last_n``.

Checkpoints here are real step directories (written by :class:`~fm.checkpoint.commit.CheckpointManager`: model,
``model_config.json``, tokenizer, ``COMPLETE``) of a tiny dragonfly with different weights; every expected value is
computed independently with torch on the loaded state dicts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fm import cli
from fm.checkpoint import commit, layout
from fm.checkpoint.merge import merge_run_last, merge_weights
from tests.helpers import TINY_MODEL

MODEL = {**TINY_MODEL, "model_family": "dragonfly", "max_length": 64}


def _state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    from fm.models.registry import build_model, load_model_config

    torch.manual_seed(seed)
    model = build_model(load_model_config(dict(MODEL)), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # every tensor differs between seeds (norm weights included)
    return {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items()}


def _run(tmp: Path, tokenizer_path: str, steps=(10, 20, 30), dtype=torch.float32, model=None) -> Path:
    run = tmp / "ckpt" / "run"
    m = commit.CheckpointManager(run)
    for i, step in enumerate(steps):
        m.save(step, [commit.torch_part(layout.MODEL_FILE.format(step=step), _state(i, dtype)),
                      commit.json_part(layout.MODEL_CONFIG_FILE, model or MODEL),
                      commit.tokenizer_part(tokenizer_path)])
    return run


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _inputs(run: Path, steps) -> list[dict[str, torch.Tensor]]:
    return [_load(run / str(s) / layout.MODEL_FILE.format(step=s)) for s in steps]


def test_merge_of_three_is_their_mean(tmp_path, tokenizer_path):
    run = _run(tmp_path, tokenizer_path, steps=(10, 20, 30, 40))
    out = tmp_path / "out" / "avg.pt"
    assert cli.main(["merge", "--run", str(run), "--last", "3", "--output", str(out)]) == 0
    got = _load(out)
    sds = _inputs(run, (20, 30, 40))
    assert set(got) == set(sds[0])
    for k in sds[0]:
        want = torch.stack([sd[k] for sd in sds]).mean(0)
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
        assert not torch.equal(got[k], sds[0][k])
    # beside it: its model config, tokenizer and what went into it (fm import's and fm lora merge's conventions)
    assert json.loads(out.with_suffix(".json").read_text())["dim_model"] == MODEL["dim_model"]
    assert (out.parent / "avg.tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
    prov = json.loads(out.with_suffix(".merge.json").read_text())
    assert prov["steps"] == [20, 30, 40] and prov["weights"] == pytest.approx([1 / 3] * 3)
    # --steps picks the same ones, in any order
    again = tmp_path / "again.pt"
    assert cli.main(["merge", "--run", str(run), "--steps", "40,20,30", "-o", str(again)]) == 0
    assert all(torch.equal(a, b) for a, b in zip(_load(again).values(), got.values()))


@pytest.mark.parametrize("how", ["weights", "ema"])
def test_weighted_and_ema_are_their_formulas(tmp_path, tokenizer_path, how):
    run = _run(tmp_path, tokenizer_path)
    # any checkpoint form, oldest first: a step directory, a lone .pt (its config beside it), a run's step
    lone = tmp_path / "lone.pt"
    torch.save(_inputs(run, (20,))[0], lone)
    (tmp_path / "lone.json").write_text(json.dumps(MODEL))
    paths = [str(run / "10"), str(lone), str(run / "30" / layout.MODEL_FILE.format(step=30))]
    if how == "weights":
        args, w = ["--weights", "2,3,5"], [0.2, 0.3, 0.5]
    else:
        args, w = ["--ema", "0.9"], [0.81 / 2.71, 0.9 / 2.71, 1 / 2.71]  # decay**(n-1-i), normalised
    out = tmp_path / "m.pt"
    assert cli.main(["merge", *paths, *args, "-o", str(out)]) == 0
    got, sds = _load(out), _inputs(run, (10, 20, 30))
    for k in sds[0]:
        want = sum(wi * sd[k].double() for wi, sd in zip(w, sds)).float()
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
    assert json.loads(out.with_suffix(".merge.json").read_text())["weights"] == pytest.approx(w)


def test_weight_formulas_and_their_errors():
    assert merge_weights(4) == [0.25] * 4
    assert merge_weights(3, ema=0.5) == pytest.approx([0.25 / 1.75, 0.5 / 1.75, 1 / 1.75])
    assert merge_weights(2, ema=1.0) == [0.5, 0.5]
    assert merge_weights(2, weights=[1, 3]) == [0.25, 0.75]
    for bad, words in [({"weights": [1, 2]}, "2 value(s) for 3"), ({"weights": [1, -1, 1]}, "non-negative"),
                       ({"ema": 0.0}, "(0, 1]"), ({"ema": 1.5}, "(0, 1]")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            merge_weights(3, **bad)


def test_bf16_is_averaged_in_fp32_and_rounded_once(tmp_path, tokenizer_path):
    run = _run(tmp_path, tokenizer_path, dtype=torch.bfloat16)
    out = tmp_path / "m.pt"
    assert cli.main(["merge", "--run", str(run), "--last", "3", "-o", str(out)]) == 0
    got, sds = _load(out), _inputs(run, (10, 20, 30))
    naive_differs = 0
    for k in sds[0]:
        assert got[k].dtype == torch.bfloat16
        exact = torch.stack([sd[k].double() for sd in sds]).mean(0)
        want = exact.to(torch.bfloat16)  # the fp64 mean rounded once
        # fp32 accumulation differs from it only by fp32 rounding of the inputs' size: where the inputs cancel
        # (a mean near 0, which bf16 resolves finely) or at a bf16 rounding tie
        scale = torch.stack([sd[k].double().abs() for sd in sds]).amax(0)
        assert ((got[k].double() - exact).abs() <= exact.abs() * 2 ** -8 + scale * 2 ** -22).all(), k
        assert (got[k] != want).float().mean() < 0.02, k
        naive = (sds[0][k] + sds[1][k] + sds[2][k]) / 3  # bf16 arithmetic: rounds after every operation
        naive_differs += int((naive != want).sum())
    assert naive_differs > 100  # the test can tell the two apart
    fp32 = tmp_path / "fp32.pt"
    assert cli.main(["merge", "--run", str(run), "--last", "3", "--dtype", "fp32", "-o", str(fp32)]) == 0
    for k, v in _load(fp32).items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v.double(), torch.stack([sd[k].double() for sd in sds]).mean(0), rtol=1e-6,
                                   atol=1e-7)


def test_different_configs_are_refused_naming_the_key_and_files(tmp_path, tokenizer_path, capsys):
    a = _run(tmp_path / "a", tokenizer_path, steps=(10,))
    b = _run(tmp_path / "b", tokenizer_path, steps=(10,), model={**MODEL, "scale_emb": 8})
    out = tmp_path / "m.pt"
    assert cli.main(["merge", str(a / "10"), str(b / "10"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"'scale_emb': 12.0 ({a / '10' / 'model_config.json'}) vs 8.0 ({b / '10' / 'model_config.json'})" in err
    assert not list(tmp_path.glob("m.*"))  # nothing written
    # other tensors (another model under the same config) are refused too, naming the tensor and the file
    other = tmp_path / "other.pt"
    sd = _inputs(a, (10,))[0]
    sd["lm_head.weight"] = torch.zeros(3)
    torch.save(sd, other)
    (tmp_path / "other.json").write_text(json.dumps(MODEL))
    assert cli.main(["merge", str(a / "10"), str(other), "-o", str(out)]) == 2
    assert "extra ['lm_head.weight']" in capsys.readouterr().err
    assert cli.main(["merge", "--run", str(a), "--last", "2", "-o", str(out)]) == 2
    assert "has 1 complete checkpoint(s) [10]" in capsys.readouterr().err
    assert not list(tmp_path.glob("m.*"))


def test_a_failed_write_leaves_nothing(tmp_path, tokenizer_path, monkeypatch, capsys):
    import fm.io

    run = _run(tmp_path, tokenizer_path)

    def fail(obj, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(fm.io, "atomic_torch_save", fail)
    assert cli.main(["merge", "--run", str(run), "--last", "2", "-o", str(tmp_path / "out" / "m.pt")]) == 2
    assert "m.pt: No space left on device; nothing was written" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_merged_checkpoint_generates_and_exports(tmp_path, tokenizer_path, capsys):
    import transformers

    from fm.export.hf import export_checkpoint
    from fm.generate import main as generate_main

    run = _run(tmp_path, tokenizer_path)
    out = tmp_path / "m.pt"
    assert cli.main(["merge", "--run", str(run), "--last", "3", "--ema", "0.5", "-o", str(out)]) == 0
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(out), "--prompt", "alpha beta", "--max-new-tokens", "4",
                          "--device", "cpu", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()
    hf = export_checkpoint(out, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    from fm.checkpoint.open import open_checkpoint

    ours = open_checkpoint(out).build_model()
    ids = torch.randint(0, 8000, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ours(ids).float(), rtol=0, atol=1e-4)


def test_a_hugging_face_export_merges_with_a_step(tmp_path, tokenizer_path):
    from fm.export.hf import export_checkpoint

    run = _run(tmp_path, tokenizer_path, steps=(10, 20))
    hf = export_checkpoint(run / "10", tmp_path / "hf")  # imported back to dragonfly's parameterisation
    out = tmp_path / "m.pt"
    assert cli.main(["merge", str(hf), str(run / "20"), "-o", str(out)]) == 0
    got, sds = _load(out), _inputs(run, (10, 20))
    for k in sds[0]:
        torch.testing.assert_close(got[k], (sds[0][k] + sds[1][k]) / 2, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- merge_last_n
def test_merge_last_n_after_each_save(tmp_path, tokenizer_path):
    """The real Checkpointer on a world-1 fsdp engine, async saves: after each save that leaves N complete
    checkpoints, ``<run dir>/merged_last_<N>.pt`` is the mean of the newest N model files; fewer, none."""
    from fm.checkpoint.checkpointer import Checkpointer, CheckpointMeta
    from fm.distributed import build_engine
    from fm.train.config import load_config
    from tests.distributed.tinylm import make_meta_model, param_groups

    cfg = load_config(None, {"checkpoint": {"merge_last_n": 2, "keep_last_n": 3, "async_save": True}})
    engine = build_engine("fsdp", seed=0)
    engine.init()
    try:
        model = engine.shard(make_meta_model())
        engine.build_optimizer(param_groups(model), lr=1e-2)
        counters = {"iteration": 0}
        states = {"trainer": SimpleNamespace(state_dict=lambda: dict(counters)),
                  "scheduler": SimpleNamespace(num_iters=0, state_dict=lambda: {}),
                  "loader": SimpleNamespace(state_dict=lambda: None)}
        run = tmp_path / "run"
        ck = Checkpointer(cfg.checkpoint, run, engine, states=states,
                          meta=CheckpointMeta({}, MODEL, tokenizer_path))
        merged = run / "merged_last_2.pt"
        for step in (1, 2, 3, 4):
            logits = model(torch.randint(0, 64, (2, 8)))
            engine.backward(engine.loss(logits, torch.randint(0, 64, (2, 8))).mean())
            engine.optimizer_step()
            counters["iteration"] = step
            ck.save(step)
            ck.wait()
            if step == 1:
                assert not merged.exists()
                continue
            sds = _inputs(run, (step - 1, step))
            got = _load(merged)
            for k in sds[0]:
                torch.testing.assert_close(got[k], (sds[0][k] + sds[1][k]) / 2, rtol=0, atol=1e-7)
            assert json.loads(merged.with_suffix(".merge.json").read_text())["steps"] == [step - 1, step]
        assert layout.list_checkpoints(run) == [2, 3, 4]  # keep_last_n still prunes; the merge reads what is kept
        assert (run / "merged_last_2.tokenizer.model").is_file() and (run / "merged_last_2.json").is_file()
    finally:
        engine.shutdown()


def test_merge_last_n_after_a_resume_averages_only_steps_up_to_the_save(tmp_path, tokenizer_path, caplog):
    # the run directory holds 10..40, but the run resumed from 10 and has just saved 20: steps 30 and 40 are an
    # abandoned branch; the merge after the save of 20 averages 10 and 20, and the log names them
    from fm.checkpoint.checkpointer import Checkpointer

    run = _run(tmp_path, tokenizer_path, steps=(10, 20, 30, 40))
    ck = SimpleNamespace(cfg=SimpleNamespace(merge_last_n=2), run_dir=run)
    with caplog.at_level("INFO", logger="fm.train"):
        Checkpointer._merge_last(ck, 20)
    merged = run / "merged_last_2.pt"
    assert json.loads(merged.with_suffix(".merge.json").read_text())["steps"] == [10, 20]
    sds, got = _inputs(run, (10, 20)), _load(merged)
    for k in sds[0]:
        torch.testing.assert_close(got[k], (sds[0][k] + sds[1][k]) / 2, rtol=0, atol=1e-7)
    assert "average of the checkpoints at steps 10, 20" in caplog.text and "newer step(s) [30, 40]" in caplog.text
    assert merge_run_last(run, 3, up_to=20) is None  # fewer than 3 steps up to 20


def test_the_provenance_is_written_last(tmp_path, tokenizer_path, monkeypatch):
    import fm.io

    run = _run(tmp_path, tokenizer_path, steps=(10, 20))
    out = tmp_path / "avg.pt"
    order = []
    for name in ("atomic_torch_save", "atomic_write_json"):
        real = getattr(fm.io, name)
        monkeypatch.setattr(fm.io, name, lambda obj, path, *a, _real=real, **kw: (order.append(Path(path).name),
                                                                                  _real(obj, path, *a, **kw))[1])
    out.with_suffix(".merge.json").write_text('{"steps": "an older merge"}')
    assert cli.main(["merge", "--run", str(run), "--last", "2", "-o", str(out)]) == 0
    assert order[-2:] == ["avg.pt", "avg.merge.json"], order
    assert json.loads(out.with_suffix(".merge.json").read_text())["steps"] == [10, 20]


def test_the_accumulator_is_converted_tensor_by_tensor(tmp_path, tokenizer_path, monkeypatch):
    # bf16 inputs: at each fp32 -> bf16 conversion only the fp32 tensors not yet converted are alive (the peak is
    # the fp32 model plus one tensor, not the fp32 and the bf16 model whole)
    import weakref

    from fm.checkpoint.merge import merge_checkpoints

    run = _run(tmp_path, tokenizer_path, steps=(10, 20), dtype=torch.bfloat16)
    made, alive_at, real_zeros, real_to = [], [], torch.zeros, torch.Tensor.to

    def zeros(*a, **kw):
        t = real_zeros(*a, **kw)
        if kw.get("dtype") is torch.float32:
            made.append(weakref.ref(t))
        return t

    def to(self, *a, **kw):
        if self.dtype is torch.float32 and a and a[0] is torch.bfloat16 and any(r() is self for r in made):
            alive_at.append(sum(r() is not None for r in made))
        return real_to(self, *a, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)
    monkeypatch.setattr(torch.Tensor, "to", to)
    res = merge_checkpoints([run / "10", run / "20"])
    monkeypatch.undo()
    n = len(res.state)
    assert n > 3 and alive_at == list(range(n, 0, -1)), alive_at
    assert all(t.dtype == torch.bfloat16 for t in res.state.values())


def test_merge_last_n_config_checks():
    from fm.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="keep_last_n >= merge_last_n"):
        load_config(None, {"checkpoint": {"merge_last_n": 3, "keep_last_n": 2}})
    with pytest.raises(ConfigError, match="LoRA run"):
        load_config(None, {"checkpoint": {"merge_last_n": 3}, "lora": {"enabled": True}})
    assert load_config(None, {"checkpoint": {"merge_last_n": 3}}).checkpoint.merge_last_n == 3


def test_a_sync_save_returns_before_the_merge_and_the_next_save_joins_it(tmp_path):
    # without async_save the merge still runs in a thread of its own: the save (whose collective part every rank
    # waits in) returns while it runs; the next save, and wait(), join it before going on
    import threading

    started, release, done = threading.Event(), threading.Event(), []

    def slow_merge(step):
        started.set()
        release.wait(10)
        done.append(step)

    m = commit.CheckpointManager(tmp_path / "run", after_commit=slow_merge)
    m.save(1, [commit.json_part("x.json", {})])
    assert started.wait(10) and done == [] and layout.list_checkpoints(tmp_path / "run") == [1]
    threading.Timer(0.2, release.set).start()
    m.save(2, [commit.json_part("x.json", {})])
    assert done[:1] == [1]  # joined before the second save started
    m.wait()
    assert done == [1, 2]


def test_a_failing_merge_does_not_fail_the_save(tmp_path, caplog):
    def boom(step):
        raise RuntimeError("merge broke")

    m = commit.CheckpointManager(tmp_path / "run", async_save=True, after_commit=boom)
    m.save(5, [commit.json_part("x.json", {})])
    m.wait()
    assert layout.list_checkpoints(tmp_path / "run") == [5]
    assert "checkpoint 5 is saved, but what runs after the save failed: RuntimeError: merge broke" in caplog.text

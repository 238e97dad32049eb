"""fm.checkpoint.open.open_checkpoint: every form a user has (run, step, .pt, LoRA adapter, Hugging Face export) opens
with its own model config and tokenizer, from wherever it was copied; generate, export, eval and LoRA merge all go
through it (references: the model's own forward, fm.train.lora's merge, PEFT's layout, transformers' Llama)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fm.checkpoint import open as checkpoints
from fm.checkpoint.open import CheckpointFormError, open_checkpoint
from fm.models.config import config_to_dict
from fm.models.registry import build_model, load_model_config
from fm.train import lora

PROMPT = ["--prompt", "The module", "--max-new-tokens", "6", "--device", "cpu"]


def _run_dir(root, tokenizer_path, step=5):
    """What the trainer writes (the parts that matter here): model, model_config.json, train config, tokenizer."""
    cfg = load_model_config("tiny")
    torch.manual_seed(3)
    model = build_model(cfg, device="cpu", dtype=torch.float32).eval()
    d = root / "run" / str(step)
    d.mkdir(parents=True)
    torch.save(model.state_dict(), d / f"fm9g_live_checkpoint-{step}.pt")
    (d / "model_config.json").write_text(json.dumps(config_to_dict(cfg)))
    (d / "config.json").write_text(json.dumps({"config": "relative/model.json", "train_iters": 5}))  # not here
    shutil.copyfile(tokenizer_path, d / "tokenizer.model")
    (d / "COMPLETE").write_text("{}")
    (d / "scheduler.pt").write_bytes(b"")  # a .pt that is not a model must never be taken for one
    (root / "run" / "latest").write_text(str(step))
    return root / "run", model, cfg


def _adapter(tmp_path, model, base):
    peft_model = build_model(model.config, device="cpu", dtype=torch.float32)
    peft_model.load_state_dict(model.state_dict())
    lc = lora.inject(peft_model, lora.LoraSettings(r=2, alpha=4, targets=("q", "v")))
    torch.manual_seed(9)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adir = lora.save_adapter(tmp_path / "adapter", lora.adapter_state_dict(peft_model), lc, base_model=str(base))
    shutil.copyfile(base / "model_config.json", adir / "model_config.json")
    return adir, peft_model.eval()


def _generate(capsys, *args):
    from fm.generate import main

    assert main([*args, *PROMPT]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generate"]


def test_run_and_step_directories_are_self_describing_anywhere(tmp_path, tokenizer_path, monkeypatch):
    run, model, cfg = _run_dir(tmp_path / "a", tokenizer_path)
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(run, moved)
    shutil.rmtree(tmp_path / "a")
    monkeypatch.chdir(tmp_path)  # nothing relative to a checkout or the old place
    for path in (moved, moved / "5", moved / "5" / "fm9g_live_checkpoint-5.pt"):
        ck = open_checkpoint(path)
        assert ck.model_config == cfg and ck.tokenizer == moved / "5" / "tokenizer.model"
        got = ck.state_dict()
        assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    assert open_checkpoint(moved).kind == "step" and open_checkpoint(moved).step == 5


def test_lora_adapter_folds_into_its_recorded_base(tmp_path, tokenizer_path, capsys):
    run, model, _ = _run_dir(tmp_path, tokenizer_path)
    adir, peft_model = _adapter(tmp_path, model, run / "5")
    ck = open_checkpoint(adir)
    assert ck.kind == "lora" and ck.base.path == run / "5" and ck.tokenizer == run / "5" / "tokenizer.model"
    ids = torch.randint(0, 8000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ck.build_model()(ids), peft_model(ids), rtol=1e-5, atol=1e-5)
    # generate from the adapter folder (no --tokenizer, no --config) = generate from the merged .pt
    merged = tmp_path / "merged.pt"
    assert lora.main(["merge", "--lora", str(adir), "--output", str(merged)]) == 0
    assert (tmp_path / "merged.json").is_file()  # its model config travels beside it
    assert _generate(capsys, "--checkpoint", str(adir)) == _generate(capsys, "--checkpoint", str(merged),
                                                                   "--tokenizer", tokenizer_path)
    # a base that moved: a clear message, and --base fixes it
    shutil.move(run, tmp_path / "moved")
    with pytest.raises(CheckpointFormError, match="give the base weights with --base"):
        open_checkpoint(adir).state_dict()
    assert open_checkpoint(adir).model_config.num_layers == model.config.num_layers  # the adapter alone still opens
    ck = open_checkpoint(adir, base=tmp_path / "moved")
    assert ck.base.step == 5 and len(ck.state_dict()) == len(model.state_dict())


def test_hf_export_folder_generates_like_the_checkpoint(tmp_path, tokenizer_path, capsys):
    from fm.export.hf import main as export_main

    run, model, cfg = _run_dir(tmp_path, tokenizer_path)
    assert export_main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "hf")]) == 0  # config + tok
    ck = open_checkpoint(tmp_path / "hf")
    assert ck.kind == "hf" and ck.tokenizer == tmp_path / "hf"  # its tokenizer.json (beside tokenizer.model)
    assert config_to_dict(ck.model_config) == config_to_dict(cfg)
    want = _generate(capsys, "--checkpoint", str(run))
    # the export's tokenizer.json carries fm9g's chat_template (auto would apply it): the plain prompt, BOS added
    assert _generate(capsys, "--checkpoint", str(tmp_path / "hf"), "--template", "none") == want
    assert _generate(capsys, "--checkpoint", str(tmp_path / "hf"), "--tokenizer",
                     str(tmp_path / "hf" / "tokenizer.model")) == want
    # export from the adapter folder: the merged model
    adir, peft_model = _adapter(tmp_path, model, run / "5")
    assert export_main(["export", "--checkpoint", str(adir), "--output", str(tmp_path / "hf_lora")]) == 0
    ids = torch.randint(0, 8000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(open_checkpoint(tmp_path / "hf_lora").build_model()(ids), peft_model(ids),
                                   rtol=1e-4, atol=1e-4)


def test_eval_uses_the_checkpoints_tokenizer(tmp_path, tokenizer_path):
    from fm.eval.__main__ import main

    run, _, _ = _run_dir(tmp_path, tokenizer_path)
    data = tmp_path / "ppl"
    data.mkdir()
    line = json.dumps({"input": "", "output": "some text to score"}) + "\n"
    (data / "data.jsonl").write_text(line)
    (data / "index").write_text(f"0\n{len(line.encode())}\n")
    out = tmp_path / "r.json"
    assert main(["--checkpoint", str(run), "--ppl-data", str(data), "--output", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["tokenizer"] == str(run / "5" / "tokenizer.model")


def test_what_is_not_a_checkpoint_says_what_is(tmp_path, tokenizer_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormError, match="not a checkpoint; accepted: a .pt state dict; a step directory"):
        open_checkpoint(tmp_path / "empty")
    run, _, _ = _run_dir(tmp_path, tokenizer_path)
    (run / "5" / "fm9g_live_checkpoint-5.pt").unlink()  # only scheduler.pt is left: never "not a state dict"
    with pytest.raises(CheckpointFormError, match="not a checkpoint"):
        open_checkpoint(run / "5")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        open_checkpoint(tmp_path / "nope")
    _run_dir(tmp_path / "b", tokenizer_path)
    with pytest.raises(CheckpointFormError, match="--base applies to a LoRA adapter"):
        open_checkpoint(tmp_path / "b" / "run", base=tmp_path)
    from fm.generate import main

    assert main(["--checkpoint", str(tmp_path / "empty"), *PROMPT]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_upstream_run_without_markers_uses_the_highest_step(tmp_path, tokenizer_path, caplog):
    run, model, _ = _run_dir(tmp_path, tokenizer_path)
    (run / "5" / "COMPLETE").unlink()
    (run / "latest").unlink()
    shutil.copytree(run / "5", run / "2")
    ck = open_checkpoint(run)
    assert ck.path == run / "5" and "no complete checkpoint" in caplog.text
    assert checkpoints.extract_state_dict({"model": {"module.w": torch.ones(1)}}) == {"w": torch.ones(1)}

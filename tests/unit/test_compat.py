"""Upstream's dialect at the edge: the one command-line grammar (fm/compat/argv.py) that the launchers, the worker and
the apps share, and upstream's config shapes (fm/compat/upstream.py) loading as upstream's users write them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fm import launch
from fm.compat.argv import choose_config, parse_train_args
from fm.errors import ConfigError, FmError
from fm.train.config import load_config

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_ARGS = Path(__file__).parent / "data" / "upstream" / "pretrain_dragonfly_args.txt"
SPARK = ROOT / "apps" / "spark_13b"


def test_grammar(tmp_path):
    train = tmp_path / "t.json"
    train.write_text(json.dumps({"train_iters": 3}))
    a = parse_train_args(["--lr", "0.1", "--config", str(train), "--dry-run", "--lora", "--config", "tiny",
                          "--train-iters=3", "--optim.eps", "1e-6", "--offload", "-h"])
    assert (a.config, a.dry_run, a.help, a.lora()) == (str(train), True, True, True)
    assert a.overrides == [("lr", "0.1"), ("lora", "true"), ("config", "tiny"), ("train_iters", "3"),
                           ("optim.eps", "1e-6"), ("offload", "true")]  # a model config is an override
    assert a.argv() == ["--lr", "0.1", "--lora", "true", "--config", "tiny", "--train_iters", "3", "--optim.eps",
                        "1e-6", "--offload", "true"]
    for flag in ("--train_config", "--train-config", "--config_file", "--config-file"):  # always the train config
        assert parse_train_args([flag, "x.json"]).config == "x.json"
        assert parse_train_args([f"{flag}=y.json"]).config == "y.json"
    assert parse_train_args(["--engine.offload", "--run.train_iters", "5"]).cli() == {"engine.offload": "true",
                                                                                      "run.train_iters": "5"}
    # upstream's boolean keys that do nothing here are still flags: given bare they take no value
    a = parse_train_args(["--local", "--lr", "0.1", "--stop_when_end"])
    assert a.overrides == [("local", "true"), ("lr", "0.1"), ("stop_when_end", "true")]
    assert load_config(None, cli=parse_train_args(["--local", "--offload"]).cli()).engine.offload is True
    with pytest.raises(ConfigError, match="--lr needs a value"):
        parse_train_args(["--lr"])
    with pytest.raises(ConfigError, match="unexpected argument '0.1'"):
        parse_train_args(["--train_iters", "--lr", "0.1"])  # not a boolean: the next word is its value


@pytest.mark.parametrize("args,lora", [(["--lora"], True), (["--lora", "true"], True), (["--lora=1"], True),
                                       (["--lora", "True", "--lr", "1"], True), (["--lora.enabled", "yes"], True),
                                       (["--lora", "false"], False), (["--lora", "--lora", "0"], False), ([], False)])
def test_lora_spellings_are_one_thing(args, lora):
    assert parse_train_args(args).lora() is lora
    chosen = choose_config(parse_train_args(args), "sft.json", "lora.json")
    assert chosen == ("lora.json" if lora else "sft.json")


@pytest.mark.parametrize("flag", [["--lora"], ["--lora", "true"], ["--lora=True"]])
def test_sft_launcher_and_worker_agree_on_the_lora_config(flag, capsys):
    """Through sft_spark.sh, ``--lora`` trained with 13b_lora.json while ``--lora true`` trained LoRA with
    13b_sft.json (two parsers). Now the launcher and the worker it starts resolve every spelling alike."""
    rc = launch.main(["app", str(SPARK / "sft_spark.py"), str(SPARK / "train_configs" / "13b_sft.json"),
                      f"--lora-config={SPARK / 'train_configs' / '13b_lora.json'}", "--family=spark", "--prog=t",
                      "--", "--dry-run", *flag])
    command = capsys.readouterr().out.splitlines()[0]
    assert rc == 2  # the 13B's data is not here: the preflight stops it, after printing the command
    worker_args = command.split(str(SPARK / "sft_spark.py"), 1)[1].split()
    assert worker_args[:2] == ["--train_config", str(SPARK / "train_configs" / "13b_lora.json")], command
    worker = parse_train_args(worker_args)  # what the worker will parse
    assert choose_config(worker, SPARK / "train_configs/13b_sft.json", SPARK / "train_configs/13b_lora.json") == \
        str(SPARK / "train_configs" / "13b_lora.json") and worker.lora()
    cfg = load_config(worker.config, cli=worker.cli())
    assert cfg.lora.enabled and cfg.optim.lr == 2e-4 and len(cfg.lora.targets) == 7


def _upstream_args() -> dict[str, str]:
    """``args["k"]="v"`` (also unquoted numbers) of upstream's script, in order."""
    pairs = re.findall(r'^args\["(\w+)"\]="?([^"\n]*?)"?\s*(?:#.*)?$', UPSTREAM_ARGS.read_text(), re.M)
    return dict(pairs)


def test_upstream_script_arguments_load_in_every_form_upstream_passes_them(tmp_path):
    args = _upstream_args()
    assert len(args) == 40 and args["ignore_cuda_oom"] == "1"
    # as documented, the block sets ignore_cuda_oom=1: refused, with the reason, and nothing else is wrong
    with pytest.raises(ConfigError) as e:
        load_config(None, cli=args)
    assert str(e.value).startswith("command line: ignore_cuda_oom: '1' is refused: skipping a step after an "
                                   "out-of-memory error cannot be made safe")
    args["ignore_cuda_oom"] = "0"
    argv = [a for k, v in args.items() for a in (f"--{k}", v)]  # what pretrain_dragonfly.sh passes
    from_cli = load_config(None, cli=parse_train_args(argv).cli())
    flat = tmp_path / "upstream_strings.json"  # the same keys as a JSON file of strings
    flat.write_text(json.dumps(args))
    typed = tmp_path / "upstream_typed.json"  # ... and with JSON types
    typed.write_text(json.dumps({k: _typed(v) for k, v in args.items()}))
    for cfg in (from_cli, load_config(flat), load_config(typed)):
        assert cfg == from_cli
    c = from_cli
    assert (c.run.name, c.model.config, c.data.max_length, c.optim.lr, c.optim.eps) == ("2b_0701", "2.4b", 4096,
                                                                                        0.01, 1e-6)
    assert (c.run.save_dir, c.data.mixture, c.schedule.name, c.schedule.warmup_iters) == (
        "data/checkpoints", "fm9g_sft", "cosine", 20.0)
    assert c.checkpoint.resume.weights_only and not c.checkpoint.resume.load_data
    assert c.checkpoint.resume.rewarm_iters == 0 and not c.run.tensorboard_all_tasks
    said = "\n".join(c.notes)
    for key in ("flash", "local", "grad_ckpt_num", "stop_when_end", "dataloader_num_threads", "dataloader_prefetch",
                "parallel_load_datastate"):
        assert f"config: {key}=" in said, key


def _typed(v: str):
    try:
        return json.loads(v.lower() if v in ("True", "False") else v)
    except json.JSONDecodeError:
        return v


def test_one_exception_root():
    """Every error fm reports to a user derives from FmError, which the worker and the CLIs catch once."""
    import importlib
    import inspect
    import pkgutil

    import fm

    found = []
    for info in pkgutil.walk_packages(fm.__path__, "fm."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == mod.__name__:
                found.append(obj)
                assert issubclass(obj, FmError) or name.startswith("_"), f"{mod.__name__}.{name}"
    assert len(found) >= 15


def test_launchers_import_no_torch_before_the_preflight(tmp_path):
    """fm/launch promises the standard library (and fm's torch-free modules) until the preflight: parsing the
    command line, the topology, the torchrun command and --help cost no torch import on a login node."""
    code = """
import sys
from fm import launch
from fm.compat.argv import choose_config, parse_train_args
args = parse_train_args(["--lora", "--lr", "0.1", "--optim.eps=1e-6", "--offload", "--dry-run"])
choose_config(args, "sft.json", "lora.json")
launch.torchrun_command(["w.py", *args.argv()], launch.topology({"GPUS_PER_NODE": "2", "MASTER_PORT": "1"}))
launch.app_help("fm train", "d.json")
assert launch.app_main(["w.py"], "", ["--help"], prog="t", env={}) == 0
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "sentencepiece"))
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-2000:]


def test_upstream_2025_apps_spell_the_initial_weights_pretrained_model(tmp_path):
    # FM9G's 4B/7B/70B apps: args["pretrained_model"]="./9g_models/7b.pt" is load_model (model.init_from)
    assert load_config(None, cli=parse_train_args(["--pretrained_model", "x.pt"]).cli()).model.init_from == "x.pt"
    path = tmp_path / "t.json"
    path.write_text('{"pretrained_model": "y.pt", "tokenizer_path": "./ckpt"}')
    cfg = load_config(str(path))
    assert (cfg.model.init_from, cfg.data.tokenizer) == ("y.pt", "./ckpt")
    path.write_text('{"pretrained_model": "y.pt", "load_model": "z.pt"}')
    with pytest.raises(FmError, match="load_model: sets model.init_from, which pretrained_model sets too"):
        load_config(str(path))

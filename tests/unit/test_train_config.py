"""Train config: defaults < JSON < CLI, unknown keys, scheduler names, every upstream key handled."""

from __future__ import annotations

import json
import logging
from dataclasses import fields

import pytest

from fm.train.config import (
    NO_OPS,
    REJECTED,
    UPSTREAM_KEYS,
    ConfigError,
    TrainConfig,
    config_from_argv,
    load_config,
    parse_cli,
)


def _write(tmp_path, data, name="c.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_precedence_defaults_json_cli(tmp_path):
    p = _write(tmp_path, {"lr": 0.02, "batch_size": 4, "train_iters": 100, "use_checkpoint": True})
    cfg = load_config(p, cli={"batch_size": "8", "use_checkpoint": "0", "warmup_iters": "0.1"})
    assert cfg.lr == 0.02  # JSON over default
    assert cfg.batch_size == 8  # CLI over JSON, converted to int
    assert cfg.use_checkpoint is False  # "0" is a bool at the CLI edge
    assert cfg.resolved_warmup() == 10  # fraction of train_iters
    assert cfg.max_length == TrainConfig().max_length  # default


def test_cli_parsing_forms(tmp_path):
    p = _write(tmp_path, {"train_iters": 10, "model_unique": "x"}, "train.json")
    path, cli = parse_cli(["--config", str(p), "--lr=0.5", "--exp-group", "g_", "--config", "tiny"])
    assert path == str(p)
    assert cli == {"lr": "0.5", "exp_group": "g_", "config": "tiny"}
    cfg = config_from_argv(["--train_config", str(p), "--flash", "none", "--resume_ckpt", "20"])
    assert cfg.train_iters == 10 and cfg.resume_ckpt == "20"


def test_bare_boolean_flags_mean_true():
    # upstream's launchers pass --offload bare; a bare boolean key is true, a valued one keeps its value
    assert parse_cli(["--offload", "--lr", "0.1", "--use_checkpoint"])[1] == {"offload": "true", "lr": "0.1",
                                                                             "use_checkpoint": "true"}
    assert parse_cli(["--offload", "false", "--compile=true"])[1] == {"offload": "false", "compile": "true"}
    cfg = config_from_argv(["--offload", "--train_iters", "5"])
    assert cfg.offload is True and cfg.train_iters == 5
    with pytest.raises(ConfigError, match="--lr needs a value"):
        parse_cli(["--lr"])
    with pytest.raises(ConfigError, match="unexpected argument '0.1'"):
        parse_cli(["--train_iters", "--lr", "0.1"])  # not a boolean: the next word is its value, then '0.1' is stray


def test_unknown_key_names_file_and_suggests(tmp_path):
    p = _write(tmp_path, {"warmup_iter": 10})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "warmup_iters" in str(e.value)
    with pytest.raises(ConfigError, match="did you mean \"batch_size\""):
        load_config(None, cli={"batchsize": "3"})


def test_types_strict_in_json_lenient_at_cli(tmp_path):
    with pytest.raises(ConfigError, match="JSON boolean"):
        load_config(_write(tmp_path, {"async_save": "True"}))
    with pytest.raises(ConfigError, match="integer"):
        load_config(_write(tmp_path, {"batch_size": "4"}))
    with pytest.raises(ConfigError, match="integer"):
        load_config(None, cli={"batch_size": "four"})
    assert load_config(None, cli={"async_save": "true"}).async_save is True


@pytest.mark.parametrize("name", ["Cosine", "COSINE", "WarmupStableDrop", "warmup_stable_exp", "linear", "Constant"])
def test_scheduler_names_case_insensitive(name):
    cfg = load_config(None, {"lr_scheduler": name, "drop_iters": 5, "train_iters": 100})
    assert cfg.lr_scheduler == name.lower().replace("_", "")


def test_bad_scheduler_suggests():
    with pytest.raises(ConfigError, match="cosine"):
        load_config(None, {"lr_scheduler": "cosin"})


@pytest.mark.parametrize("key,value", [("tp_size", 2), ("load_grad", True), ("ignore_cuda_oom", True),
                                       ("dataloader", "raw")])
def test_rejected_values_say_why(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, {key: value})
    assert key in str(e.value) and REJECTED[key] in str(e.value)


def test_every_upstream_key_is_implemented_or_rejected_or_documented_noop(caplog):
    names = {f.name for f in fields(TrainConfig)}
    for key in UPSTREAM_KEYS:
        assert key in names, f"upstream key {key} is not a TrainConfig field"
    # Each key is a field (implemented), a documented no-op, or has rejected values; loading the
    # upstream defaults from the users' README works and logs the no-ops.
    upstream_readme = {"model_unique": "2b_0701", "resume_ckpt": "", "config": "2.4b", "flash": "cuda",
                       "max_length": "4096", "local": "False", "dataloader": "indexed", "save": "True",
                       "tokenizer_path": "./tokenizer/tokenizer.model", "load_grad": "False", "grad_ckpt_num": "160",
                       "exp_group": "", "ignore_cuda_oom": "0", "tensorboard_all_tasks": "0", "stop_when_end": "0",
                       "only_run_dataloader": "0", "eps": "1e-6", "inspect_iters": "100", "strict_state_dict": "1",
                       "resume_no_optimze": "0", "tp_size": "1", "async_save": "False", "batch_size": "1",
                       "save_iters": "500", "train_iters": "10000", "dataset_config": "fm9g_sft",
                       "dataloader_num_threads": "1", "dataloader_prefetch": "1", "dataloader_prefetch_factor": "1",
                       "dataloader_num_workers": "1", "parallel_load_datastate": "8", "lr": "1e-2",
                       "warmup_iters": "20", "drop_iters": "0.1", "only_load_model": "1", "lr_scheduler": "Cosine",
                       "load_dataloader_ckpt": "0", "drop_begin": "-1", "drop_rate": "0.5", "use_checkpoint": "0"}
    cfg = load_config(None, cli=upstream_readme)
    assert cfg.save == "data/checkpoints" and cfg.eps == 1e-6 and cfg.lr_scheduler == "cosine"
    for key in NO_OPS:
        assert key in UPSTREAM_KEYS
    from fm.train.config import log_no_ops

    with caplog.at_level(logging.INFO, logger="fm.train.config"):
        log_no_ops(cfg)
    for key in NO_OPS:
        assert f"config: {key}=" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fm.train.config"):
        log_no_ops(load_config(None, cli={"lr": "0.1", "flash": "cuda"}))
    assert caplog.text.count("has no effect here") == 1 and "config: flash='cuda'" in caplog.text  # only what was set


def test_shipped_train_configs_carry_no_dead_keys(repo_root):
    from fm.train.config import NO_OPS, REJECTED

    files = sorted({*repo_root.glob("apps/*/train_configs/*.json"), *repo_root.glob("fm/assets/train_configs/*.json")})
    assert len(files) >= 4
    for f in files:
        dead = sorted(set(json.loads(f.read_text())) & (NO_OPS.keys() | REJECTED.keys()))
        assert not dead, f"{f}: keys that do nothing or are refused: {dead}"


def test_shipped_train_configs_load(repo_root):
    files = sorted((repo_root / "apps" / "fm9g_2b" / "train_configs").glob("*.json"))
    assert files, "no shipped train configs"
    for f in files:
        load_config(f)
    big = load_config(repo_root / "apps" / "fm9g_2b" / "train_configs" / "2.4b.json")
    assert (big.lr, big.max_length, big.batch_size, big.save_iters, big.config) == (0.01, 4096, 1, 500, "2.4b")


def test_dumps_round_trip(tmp_path):
    cfg = load_config(None, {"lr": 0.3, "model_unique": "r"})
    p = tmp_path / "resolved.json"
    p.write_text(cfg.dumps())
    assert load_config(p).to_dict() == cfg.to_dict()


def test_three_mistakes_are_reported_at_once(tmp_path):
    p = _write(tmp_path, {"warmup_iter": 10, "batch_size": "2", "engine": "deepspeed", "lr": 0.1})
    with pytest.raises(ConfigError) as e:
        load_config(p, cli={"train_iters": "many"})
    msg = str(e.value)
    assert msg.startswith("train config: 4 problems:\n")
    for part in (f"{p}: unknown key 'warmup_iter'; did you mean \"warmup_iters\"?",
                 f"{p}: batch_size: must be an integer (a JSON number, not a string), got '2'",
                 f"{p}: engine: 'deepspeed' is not one of auto, bmtrain, fsdp",
                 "command line: train_iters: must be an integer, got 'many'"):
        assert part in msg, part
    with pytest.raises(ConfigError) as e:  # ranges and cross-key checks, also all at once
        load_config(None, {"max_length": 0, "lr": -1.0, "eval_interval": 5, "tp_size": 2})
    assert str(e.value).startswith("train config: 4 problems:\n  - overrides: max_length: must be >= 1, got 0\n")
    assert "config: eval_interval: 5 needs eval_dataset_config" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, {"tp_size": 2, "load_grad": True, "eval_interval": 5})
    assert str(e.value).startswith("config: 3 problems:")


def test_choices_are_typed():
    cfg = load_config(None, cli={"lora_targets": "q,k,v,out", "flash": "none", "lr_scheduler": "Warmup_Stable_Drop",
                                 "drop_iters": "3"})
    assert cfg.lora_targets == ("q", "k", "v", "out") and cfg.flash == "none" and cfg.lr_scheduler == "warmupstabledrop"
    assert load_config(None, {"lora_targets": ["q", "v"]}).lora_targets == ("q", "v")
    assert load_config(None, {"lora_targets": "q_proj|v_proj"}).lora_targets == ("q_proj", "v_proj")
    with pytest.raises(ConfigError, match="flash: 'cudnn' is not one of cuda, triton, 1d, none"):
        load_config(None, {"flash": "cudnn"})
    with pytest.raises(ConfigError, match="lr_scheduler: 'cosin' is not one of .*did you mean \"cosine\""):
        load_config(None, {"lr_scheduler": "cosin"})


def test_docs_key_table_is_the_dataclass(repo_root):
    """docs/training.md's table is generated from the field declarations; the Chinese one lists every key with the
    same default. Neither can drift from the code."""
    import re

    from fm.schema import help_rows, show_default
    from fm.train.config import keys_markdown

    text = (repo_root / "docs" / "training.md").read_text()
    block = re.search(r"<!-- train-keys:[^\n]*-->\n(.*?)\n<!-- /train-keys -->", text, re.S)
    assert block and block.group(1) == keys_markdown(), "regenerate the table: python -m fm.train.config"
    zh = (repo_root / "docs" / "zh" / "training.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]* \| `([^`]*)` \|", zh, re.M))
    for name, _, default, _ in help_rows(TrainConfig):
        assert rows.get(name) == show_default(default), f"docs/zh/training.md: key {name} (default {default!r})"


def test_train_help_lists_every_key():
    from fm.train.config import keys_help

    text = keys_help()
    names = [f.name for f in fields(TrainConfig) if f.name != "given"]
    for name in names:
        assert f"  --{name} " in text, name
    assert "--engine {auto,bmtrain,fsdp}  [default \"auto\"]" in text
    assert "--tp_size INT  [default 1]\n      rejected when > 1: tensor parallelism is not supported" in text

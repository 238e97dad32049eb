"""Train config: sections, defaults < JSON < overrides < command line, unknown keys, scheduler names, and upstream's
flat keys translated at the edge (every one acts, is a documented no-op, or is refused with its reason)."""

from __future__ import annotations

import json
import re

import pytest

from fm.compat.upstream import KEYS, NO_OPS, REFUSED, UPSTREAM_KEYS
from fm.schema import help_rows, show_default
from fm.train.config import SECTIONS, ConfigError, TrainConfig, load_config


def _write(tmp_path, data, name="c.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_precedence_defaults_json_overrides_cli(tmp_path):
    p = _write(tmp_path, {"optim": {"lr": 0.02}, "data": {"batch_size": 4}, "run": {"train_iters": 100},
                          "engine": {"activation_checkpointing": True}})
    cfg = load_config(p, {"data": {"max_length": 64}}, cli={"data.batch_size": "8", "use_checkpoint": "0",
                                                            "warmup_iters": "0.1"})
    assert cfg.optim.lr == 0.02  # JSON over default
    assert cfg.data.batch_size == 8  # command line over JSON, converted to int
    assert cfg.data.max_length == 64  # overrides over defaults
    assert cfg.engine.activation_checkpointing is False  # upstream's name, "0" is a bool on the command line
    assert cfg.warmup_steps() == 10  # fraction of train_iters
    assert cfg.run.grad_accum == TrainConfig().run.grad_accum  # default


def test_upstream_flat_form_maps_to_sections(tmp_path):
    p = _write(tmp_path, {"model_unique": "x", "lr": 0.5, "save": "/ck", "resume_ckpt": 20, "resume_no_optimze": 3,
                          "use_checkpoint": True, "dataset_config": "m.json", "lora": True, "lora_targets": "q,v"})
    cfg = load_config(p)
    assert (cfg.run.name, cfg.optim.lr, cfg.run.save_dir, cfg.checkpoint.resume.source) == ("x", 0.5, "/ck", "20")
    assert cfg.checkpoint.resume.rewarm_iters == 3 and cfg.engine.activation_checkpointing is True
    assert cfg.data.mixture == "m.json" and cfg.lora.enabled and cfg.lora.targets == ("q", "v")
    assert cfg.to_dict()["checkpoint"]["resume"]["rewarm_iters"] == 3  # fm's form has no upstream spelling
    # every upstream key that acts has exactly one home, and that home is a declared key
    fm_keys = {name for name, *_ in help_rows(TrainConfig)}
    assert set(KEYS.values()) <= fm_keys and len(set(KEYS.values())) == len(KEYS)


def test_one_key_set_twice_in_one_layer_is_an_error():
    with pytest.raises(ConfigError, match="lr: sets optim.lr, which optim.lr sets too|optim.lr: sets optim.lr"):
        load_config(None, {"optim": {"lr": 0.1}, "lr": 0.2})


def test_unknown_key_names_file_and_suggests(tmp_path):
    p = _write(tmp_path, {"warmup_iter": 10})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "warmup_iters" in str(e.value)
    with pytest.raises(ConfigError, match="did you mean \"batch_size\""):
        load_config(None, cli={"batchsize": "3"})
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'; did you mean \"lr\""):
        load_config(None, {"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="optim: must be a JSON object"):
        load_config(None, {"optim": 3})


def test_fm_form_is_strict_and_upstream_strings_are_read_as_upstream_passes_them(tmp_path):
    with pytest.raises(ConfigError, match="JSON boolean"):
        load_config(_write(tmp_path, {"checkpoint": {"async_save": "True"}}))
    with pytest.raises(ConfigError, match="integer"):
        load_config(_write(tmp_path, {"data": {"batch_size": "4"}}))
    with pytest.raises(ConfigError, match="integer"):
        load_config(None, cli={"batch_size": "four"})
    # upstream's scripts pass every value as a string ("True", "1e-2"): in its flat form they are read so
    cfg = load_config(_write(tmp_path, {"async_save": "True", "batch_size": "4", "lr": "1e-2"}))
    assert cfg.checkpoint.async_save is True and cfg.data.batch_size == 4 and cfg.optim.lr == 0.01
    assert load_config(None, cli={"checkpoint.async_save": "true"}).checkpoint.async_save is True


@pytest.mark.parametrize("name", ["Cosine", "COSINE", "WarmupStableDrop", "warmup_stable_exp", "linear", "Constant"])
def test_scheduler_names_case_insensitive(name):
    cfg = load_config(None, {"lr_scheduler": name, "drop_iters": 5, "train_iters": 100})
    assert cfg.schedule.name == name.lower().replace("_", "")


def test_bad_scheduler_suggests():
    with pytest.raises(ConfigError, match="lr_scheduler \\(schedule.name\\): 'cosin' is not one of .*\"cosine\""):
        load_config(None, {"lr_scheduler": "cosin"})


@pytest.mark.parametrize("key,value", [("tp_size", 2), ("load_grad", True), ("ignore_cuda_oom", True),
                                       ("dataloader", "raw"), ("ignore_cuda_oom", "1")])
def test_refused_values_say_why(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, {key: value})
    assert key in str(e.value) and REFUSED[key][1] in str(e.value)


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_the_one_legal_value_of_a_refused_key_loads(key):
    load_config(None, {key: REFUSED[key][0]})
    load_config(None, cli={key: str(REFUSED[key][0])})


def test_every_upstream_key_acts_or_is_a_documented_noop_or_refused():
    for key in UPSTREAM_KEYS:
        assert (key in KEYS) + (key in NO_OPS) + (key in REFUSED) == 1, key


def test_no_op_keys_are_noted_only_when_set():
    cfg = load_config(None, cli={"lr": "0.1", "flash": "cuda"})
    assert cfg.notes == ("config: flash='cuda' has no effect here: " + NO_OPS["flash"],)
    assert load_config(None, {"lr": 0.1}).notes == ()
    cfg = load_config(None, {key: "1" for key in NO_OPS})
    assert [n.split("=")[0] for n in cfg.notes] == [f"config: {key}" for key in NO_OPS]


def test_shipped_train_configs_are_in_fm_form_and_load(repo_root):
    files = sorted({*repo_root.glob("apps/*/train_configs/*.json"), *repo_root.glob("fm/assets/train_configs/*.json")})
    assert len(files) >= 9
    for f in files:
        raw = json.loads(f.read_text())
        assert set(raw) <= set(SECTIONS), f"{f}: not fm's sectioned form: {sorted(set(raw) - set(SECTIONS))}"
        load_config(f)
    big = load_config(repo_root / "apps" / "fm9g_2b" / "train_configs" / "2.4b.json")
    assert (big.optim.lr, big.data.max_length, big.data.batch_size, big.checkpoint.every, big.model.config) == (
        0.01, 4096, 1, 500, "2.4b")


def test_dumps_round_trip(tmp_path):
    cfg = load_config(None, {"lr": 0.3, "model_unique": "r", "lora_targets": "q,v"})
    p = tmp_path / "resolved.json"
    p.write_text(cfg.dumps())
    assert load_config(p) == cfg


def test_every_mistake_is_reported_at_once(tmp_path):
    p = _write(tmp_path, {"warmup_iter": 10, "batch_size": "two", "engine": "deepspeed", "lr": 0.1})
    with pytest.raises(ConfigError) as e:
        load_config(p, cli={"train_iters": "many"})
    msg = str(e.value)
    assert msg.startswith("train config: 4 problems:\n"), msg
    for part in (f"{p}: unknown key 'warmup_iter'; did you mean \"warmup_iters\"?",
                 f"{p}: batch_size (data.batch_size): must be an integer, got 'two'",
                 f"{p}: engine (engine.name): 'deepspeed' is not one of auto, bmtrain, fsdp",
                 "command line: train_iters (run.train_iters): must be an integer, got 'many'"):
        assert part in msg, part
    with pytest.raises(ConfigError) as e:  # ranges and cross-key checks, also all at once
        load_config(None, {"max_length": 0, "lr": -1.0, "eval_interval": 5, "tp_size": 2})
    msg = str(e.value)
    assert msg.startswith("train config: 4 problems:\n  - overrides: tp_size: 2 is refused"), msg
    assert "overrides: max_length (data.max_length): must be >= 1, got 0" in msg
    assert "config: eval.interval: 5 needs eval.mixture" in msg


def test_choices_are_typed():
    cfg = load_config(None, cli={"lora_targets": "q,k,v,out", "flash": "none", "lr_scheduler": "Warmup_Stable_Drop",
                                 "drop_iters": "3"})
    assert cfg.lora.targets == ("q", "k", "v", "out") and cfg.schedule.name == "warmupstabledrop"
    assert load_config(None, {"lora_targets": ["q", "v"]}).lora.targets == ("q", "v")
    assert load_config(None, {"lora": {"targets": "q_proj|v_proj"}}).lora.targets == ("q_proj", "v_proj")


def test_docs_key_tables_are_the_dataclasses(repo_root):
    """docs/training.md's tables are generated from the field declarations and the upstream map; the Chinese one
    lists every key with the same default. Neither can drift from the code."""
    from fm.train.config import keys_markdown

    text = (repo_root / "docs" / "training.md").read_text()
    block = re.search(r"<!-- train-keys:[^\n]*-->\n(.*?)\n<!-- /train-keys -->", text, re.S)
    assert block and block.group(1) == keys_markdown(), "regenerate the tables: python -m fm.train.config"
    zh = (repo_root / "docs" / "zh" / "training.md").read_text()
    rows = dict(re.findall(r"^\| `([\w.]+)` \| [^|]* \| [^|]* \| `([^`]*)` \|", zh, re.M))
    for name, _, default, _ in help_rows(TrainConfig):
        assert rows.get(name) == show_default(default), f"docs/zh/training.md: key {name} (default {default!r})"


def test_train_help_lists_every_key():
    from fm.train.config import keys_help

    text = keys_help()
    for name, *_ in help_rows(TrainConfig):
        assert f"  --{name} " in text, name
    assert "--engine.name {auto,bmtrain,fsdp}  [default \"auto\"]  (upstream --engine)" in text
    assert "--checkpoint.resume.rewarm_iters INT  [default 0]  (upstream --resume_no_optimze)" in text
    for name in (*NO_OPS, *REFUSED):  # upstream's keys that do nothing or are refused are listed with the reason
        assert f"    --{name}" in text, name


def test_save_flag_form_is_upstreams_words_only():
    # save="True" is upstream's flag: the default directory; any other value is a directory, as it always was
    for flag in (True, "True", "false", "1", "0"):
        assert load_config(None, {"save": flag}).run.save_dir == "data/checkpoints"
    for path in ("yes", "", "ckpt"):
        assert load_config(None, {"save": path}).run.save_dir == path


@pytest.mark.parametrize("doc", ["training.md", "zh/training.md"])
def test_the_recipe_in_the_docs_is_a_valid_train_config(repo_root, tmp_path, doc):
    """The one-run MiniCPM/FM9G recipe of docs/training.md (and its Chinese copy) loads as written: its decay stage
    starts where the WSD drop does and its sections exist."""
    text = (repo_root / "docs" / doc).read_text()
    start = text.index("## The MiniCPM / FM9G recipe" if doc == "training.md" else "## 一次运行走完 MiniCPM")
    block = re.search(r"```json\n(.*?)\n```", text[start:], re.S)
    path = tmp_path / "recipe.json"
    path.write_text(block.group(1))
    cfg = load_config(str(path))
    assert cfg.stage_starts() == [0, cfg.run.train_iters - cfg.drop_steps()] == [0, 18000]
    assert (cfg.checkpoint.merge_last_n, cfg.optim.z_loss, cfg.stability.skip_spikes) == (4, 1e-4, True)

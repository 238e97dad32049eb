"""apps/spark_13b: Spark SFT data (both record formats, chat template, loss on target + <end> only), SFT and
LoRA fine-tuning through the trainer (loss goes down; LoRA checkpoints are PEFT adapters on the loaded
base), launchers, and the generate_spark CLI (``##`` / json in, jsonl out, greedy determinism, Spark's
subtractive penalty by hand, streaming whole characters)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "apps" / "spark_13b"
SPARK_TINY = APP / "model_configs" / "tiny.json"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"spark_app_{name}", APP / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _transform():
    spec = importlib.util.spec_from_file_location("spark_chat", ROOT / "dataset_configs/transforms/spark_chat.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.transform


# ------------------------------------------------------------------------------ data
def test_transform_accepts_both_formats():
    t = _transform()
    r = random.Random(0)
    want = {"input": "<User> Hi there<end><Bot> ", "output": "Hello<ret>again"}
    assert t({"input": "Hi there", "target": "Hello\nagain"}, 0, r) == want
    assert t({"input": "Hi there", "output": "Hello\nagain"}, 0, r) == want
    with pytest.raises(KeyError, match="target"):
        t({"input": "x"}, 0, r)


def _index(tmp_path, records, tokenizer_path) -> Path:
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records), encoding="utf-8")
    pre = _load("preprocess_sft_data")
    out = tmp_path / "idx"
    assert pre.main(["--raw_data_path", str(raw), "--output_filepath", str(out), "--tokenizer", tokenizer_path]) == 0
    return out


def _mixture(tmp_path, index: Path, repeat: bool) -> Path:
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps([{"task_name": "sft", "abs_weight": 1.0, "path": str(index), "allow_repeat": repeat,
                                "transforms": str(ROOT / "dataset_configs/transforms/spark_chat.py")}]))
    return mix


def test_loss_mask_covers_target_and_end_only(tmp_path, tokenizer_path):
    from fm.data.loader import build_train_loader
    from fm.tokenizer import Tokenizer

    rec = {"input": "列出两种水果。", "target": "苹果\n香蕉"}
    mix = _mixture(tmp_path, _index(tmp_path, [rec], tokenizer_path), repeat=False)
    tok = Tokenizer(tokenizer_path)
    end = tok.piece_to_id("<end>")
    tok.eos_id = end  # what the trainer does with eos_token: "<end>"
    batch = next(iter(build_train_loader(str(mix), tok, batch_size=1, max_length=64)))
    inputs, targets = batch["inputs"][0], batch["targets"][0]
    prompt = tok.encode("<User> 列出两种水果。<end><Bot> ")
    answer = tok.encode("苹果<ret>香蕉")
    n = 1 + len(prompt) + len(answer)
    assert inputs[:n].tolist() == [tok.bos_id] + prompt + answer
    labelled = targets != -100
    assert targets[labelled].tolist() == answer + [end]
    assert labelled.nonzero().flatten().tolist() == list(range(len(prompt), n))  # label t = token t+1


# ------------------------------------------------------------------------------ training
def _train_config(tmp_path, mix: Path, tokenizer_path: str, **over):
    from fm.train.config import load_config

    cfg = {"model_unique": "run", "config": str(SPARK_TINY), "dataset_config": str(mix),
           "tokenizer_path": tokenizer_path, "engine": "fsdp", "dtype": "fp32", "max_length": 96, "batch_size": 2,
           "train_iters": 30, "save_iters": 0,
           "lr": 3e-3, "lr_scheduler": "constant", "warmup_iters": 0, "inspect_iters": 0, "weight_decay": 0.0,
           "seed": 3, "save": str(tmp_path / "ckpt"), "tensorboard": "", "eos_token": "<end>", "log_iters": 100}
    cfg.update(over)
    return load_config(None, cfg)


def _losses(tmp_path, name="run"):
    rows = [json.loads(x) for x in (tmp_path / "ckpt" / name / "train_stats.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, tokenizer_path):
    tmp = tmp_path_factory.mktemp("sft")
    records = [json.loads(x) for x in (ROOT / "quick_start/data/spark_sft.jsonl").read_text().splitlines()]
    return _mixture(tmp, _index(tmp, records[:16], tokenizer_path), repeat=True)


def test_full_sft_lowers_the_loss(tmp_path, sft_data, tokenizer_path):
    from fm.train.trainer import run

    assert run(_train_config(tmp_path, sft_data, tokenizer_path)) == 0
    losses = _losses(tmp_path)
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_lora_sft_trains_adapters_on_the_loaded_base(tmp_path, sft_data, tokenizer_path, caplog):
    import logging

    from peft import PeftModel

    from fm.models.registry import build_model, load_model_config
    from fm.train.trainer import run

    mc = load_model_config(str(SPARK_TINY))
    torch.manual_seed(11)
    base = build_model(mc, device="cpu", dtype=torch.float32)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    cfg = _train_config(tmp_path, sft_data, tokenizer_path, lora=True, lora_r=4, lora_alpha=8.0,
                        lora_targets="q,k,v,out,fc0,fc1,fc2", load_model=str(tmp_path / "base.pt"), lr=1e-2,
                        train_iters=12, save_iters=12)
    with caplog.at_level(logging.INFO):
        assert run(cfg) == 0
    assert "trainable params: 39,424 || all params: 1,873,920" in caplog.text
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0]
    ckpt = tmp_path / "ckpt" / "run" / "12"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert not list(ckpt.glob("fm9g_live_checkpoint-*.pt"))  # adapter only: no full model file
    # the first step's loss is the base model's loss (adapters start as the identity): the base was loaded
    from fm.data.loader import build_train_loader
    from fm.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    tok.eos_id = tok.piece_to_id("<end>")
    batch = next(iter(build_train_loader(str(sft_data), tok, batch_size=2, max_length=96, seed=3)))
    ce = torch.nn.functional.cross_entropy

    def loss_of(model):
        with torch.no_grad():
            logits = model(batch["inputs"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                           max_seqlen=batch["max_seqlen"])
        return ce(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100).item()

    base.eval()
    assert loss_of(base) == pytest.approx(losses[0], rel=1e-4)
    adapted = PeftModel.from_pretrained(base, str(ckpt)).eval()
    assert loss_of(adapted) < losses[0]


# ------------------------------------------------------------------------------ launchers and configs
def test_shipped_train_configs_load_and_resolve():
    from fm.train.config import load_config

    pre = _load("pretrain_spark")
    files = sorted((APP / "train_configs").glob("*.json"))
    assert len(files) == 6
    for f in files:
        cfg = pre.resolve_spark_model_config(load_config(f))
        from fm.models.registry import load_model_config

        assert load_model_config(cfg.model.config).model_family == "spark" and cfg.data.eos_token == "<end>"
        assert cfg.lora.enabled == ("lora" in f.name)


# ------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def gen():
    return _load("generate_spark")


def test_predict_data_forms(gen, tmp_path):
    assert gen.parse_predict_data("[为什么地球是独一无二的？##请问生抽和老抽有什么区别？]") == [
        {"input": "为什么地球是独一无二的？"}, {"input": "请问生抽和老抽有什么区别？"}]
    assert gen.parse_predict_data("q1##q2##") == [{"input": "q1"}, {"input": "q2"}]
    f = tmp_path / "q.json"
    f.write_text(json.dumps([{"input": "a", "id": 1}, {"input": "b", "id": 2}]))
    assert gen.parse_predict_data(str(f)) == [{"input": "a", "id": 1}, {"input": "b", "id": 2}]
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match="record 1"):
        gen.parse_predict_data(str(f))
    assert gen.format_prompt(gen.SPARK_PROMPT, "a\nb") == "<User> a<ret>b<end><Bot> "


def _cli(gen, argv):
    import io

    out = io.StringIO()
    args = gen.build_parser().parse_args(argv)
    return gen.run(args, out=out), out.getvalue()


def test_cli_json_in_out_and_greedy_determinism(gen, tmp_path, tokenizer_path, tokenizer):
    from fm.generate import generate
    from fm.models.registry import build_model, load_model_config

    torch.manual_seed(0)
    model = build_model(load_model_config(str(SPARK_TINY)), device="cpu", dtype=torch.float32)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    src = tmp_path / "in.jsonl"
    src.write_text('{"input": "你好", "id": 7}\n{"input": "What is 2+2?"}\n{"input": "三"}\n', encoding="utf-8")
    argv = ["--config", "tiny", "--load_checkpoint", str(tmp_path / "m.pt"), "--tokenizer_file", tokenizer_path,
            "--predict_data", str(src), "--predict_length", "8", "--predict_batch", "2", "--device", "cpu",
            "--json-output-path", str(tmp_path / "out.jsonl")]
    first, printed = _cli(gen, argv)
    again, _ = _cli(gen, argv + ["--predict_batch", "1", "--use_past", "False"])
    assert first == again  # greedy: batch size and cache do not matter
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == first and [r["input"] for r in rows] == ["你好", "What is 2+2?", "三"] and rows[0]["id"] == 7
    assert [json.loads(x) for x in printed.splitlines()] == rows
    stops = (tokenizer.eos_id, tokenizer.piece_to_id("<end>"))
    ref = generate(model.eval(), ["<User> 你好<end><Bot> "], tokenizer=tokenizer, max_new_tokens=8,
                   stop_token_ids=stops)[0]
    assert rows[0]["generate"] == tokenizer.decode(ref).replace("<ret>", "\n")


class ScriptedModel(torch.nn.Module):
    """Logits that do not depend on the input: either a fixed vector, or a script of one token per step."""

    def __init__(self, vocab: int, fixed: dict[int, float] | None = None, script: list[int] | None = None):
        super().__init__()
        self.config = type("C", (), {"vocab_size": vocab})()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.fixed, self.script, self.prompt_len = fixed or {}, script, None

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        b, s = input_ids.shape
        logits = torch.full((b, s, self.config.vocab_size), -10.0)
        if self.script is not None:
            self.prompt_len = self.prompt_len or s
            logits[:, -1, self.script[min(s - self.prompt_len, len(self.script) - 1)]] = 10.0
        for t, v in self.fixed.items():
            logits[:, :, t] = v
        return logits


@pytest.mark.parametrize(("increase", "want"), [(0.1, "ABAAAA"), (0.5, "ABAABA")])
def test_cli_subtractive_penalty_by_hand(gen, tokenizer_path, monkeypatch, increase, want):
    # A=2.0, B=1.45, C=-1.0. Generated n times, a token loses 1.0 + increase·(n−1):
    # increase 0.1: A | A 1.0 < B 1.45 → B | A 1.0 > B 0.45 → A | A 0.9 → A | 0.8 → A | 0.7 → A
    # increase 0.5: A | B | A (1.0) | A 2−1.5=0.5 > 0.45 → A | A 2−2.0=0.0 < B 0.45 → B | A 0.0 > B −0.05 → A
    ids = {"A": 300, "B": 301, "C": 302}
    model = ScriptedModel(8000, fixed={ids["A"]: 2.0, ids["B"]: 1.45, ids["C"]: -1.0})
    monkeypatch.setattr(gen, "load_model", lambda args, ck=None: model)
    base = ["--tokenizer_file", tokenizer_path, "--predict_data", "q", "--predict_length", "6", "--device", "cpu",
            "--use_past", "False"]
    captured = []
    monkeypatch.setattr(gen, "generate", _capture(gen.generate, captured))
    _cli(gen, base + ["--do_sample", "True", "--top_k", "1", "--repetition_penalty", "1.0",
                      "--repetition_penalty_increase", str(increase)])
    name = {v: k for k, v in ids.items()}
    assert "".join(name[t] for t in captured[-1][0]) == want
    _cli(gen, base + ["--repetition_penalty", "1.0"])  # greedy: Spark ignores the penalty
    assert "".join(name[t] for t in captured[-1][0]) == "AAAAAA"


def _capture(fn, into):
    def wrapped(*a, **k):
        out = fn(*a, **k)
        into.append(out)
        return out

    return wrapped


def test_cli_streamer_never_splits_a_character(gen, tokenizer_path, tokenizer, monkeypatch):
    text = "😀中a"
    script = [tokenizer.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")] + [tokenizer.piece_to_id("<end>")]
    monkeypatch.setattr(gen, "load_model", lambda args, ck=None: ScriptedModel(8000, script=script))

    class Recorder:
        def __init__(self):
            self.chunks: list[str] = []

        def write(self, s):
            self.chunks.append(s)

        def flush(self):
            pass

    rec = Recorder()
    args = gen.build_parser().parse_args(["--tokenizer_file", tokenizer_path, "--predict_data", "hi", "--streamer",
                                          "True", "--predict_length", "20", "--device", "cpu", "--use_past", "False"])
    results = gen.run(args, out=rec)
    pieces = [c for c in rec.chunks if c]
    assert "".join(pieces) == text + "\n" and results[0]["generate"] == text
    assert all("\ufffd" not in c for c in pieces)
    assert pieces[:3] == ["😀", "中", "a"]

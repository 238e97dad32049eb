"""One Tokenizer interface, two backends: a Hugging Face tokenizer (tests.support.hf_fixtures: a byte-level BPE with
ChatML special tokens and template, no BOS) encodes as transformers does, and goes everywhere a SentencePiece model
goes: the loader (plain text, and SFT conversations through the chat template), fm convert, the preflight, fm
generate --template auto, checkpoints (``tokenizer/``, ``<stem>.tokenizer/``) and the run's tokenizer taken from a
checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fm.constants import IGNORE_INDEX
from fm.tokenizer import (
    SHIPPED_TOKENIZERS,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    copy_tokenizer_files,
    load_tokenizer,
    resolve_tokenizer,
)
from tests.helpers import make_mixture, record_generate_prompts
from tests.support.hf_fixtures import CHATML, IM_END, IM_START, build_hf_tokenizer

TEXTS = ["中国的首都是北京。Hello, world!", "Training a language model 需要数据", "  two  spaces\tand tab\n\n",
         "😀 emoji ü and unseen 龘 characters", "<|im_start|>user\n你好<|im_end|>\n", ""]
CONVERSATIONS = [
    [{"role": "user", "content": "中国的首都是哪里？"}, {"role": "assistant", "content": "北京。"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi! 你好。"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tok")


@pytest.fixture(scope="module")
def hf(hf_dir):
    return load_tokenizer(hf_dir)


@pytest.fixture(scope="module")
def auto_tok(hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


# ------------------------------------------------------------------------------------------- the interface
def test_hf_backend_reads_the_directory(hf, hf_dir):
    assert isinstance(hf, HFTokenizer) and isinstance(Tokenizer(hf_dir), HFTokenizer)
    assert hf.kind == "hf" and hf.path == str(hf_dir.resolve())
    assert hf.bos_id is None and hf.unk_id is None  # Qwen-style: no BOS
    assert hf.eos_id == hf.piece_to_id(IM_END) and hf.pad_id == hf.piece_to_id("<|endoftext|>")
    assert hf.vocab_size == 600 and hf.chat_template == CHATML
    assert hf.piece_to_id("<definitely-missing>") is None
    assert hf.id_to_piece(hf.eos_id) == IM_END
    with pytest.raises(IndexError, match="not in the tokenizer"):
        hf.id_to_piece(10**6)
    sp = Tokenizer("demo")
    assert isinstance(sp, SentencePieceTokenizer) and sp.kind == "sentencepiece" and sp.chat_template is None
    assert sp.piece_to_id("<definitely-missing>") is None and sp.piece_to_id("<unk>") == sp.unk_id == 0


@pytest.mark.parametrize("text", TEXTS)
def test_hf_encodes_as_transformers(hf, auto_tok, text):
    ids = hf.encode(text)
    assert ids == auto_tok(text, add_special_tokens=False)["input_ids"]
    assert hf.decode(ids) == text
    assert hf.encode_batch([text, text]) == [ids, ids]
    arrays = hf.encode_batch_arrays([text, "x"])
    assert arrays[0].dtype == np.int32 and arrays[0].tolist() == ids


def test_special_token_strings_become_one_id(hf):
    ids = hf.encode(f"{IM_START}assistant\nhi{IM_END}")
    assert ids[0] == hf.piece_to_id(IM_START) and ids[-1] == hf.eos_id
    assert hf.encode("x", bos=True, eos=True) == hf.encode("x") + [hf.eos_id]  # no BOS to add


def test_tokenizer_json_file_alone_and_beside_its_config(hf, hf_dir, tmp_path):
    beside = load_tokenizer(hf_dir / "tokenizer.json")  # named tokenizer.json: its directory's config applies
    assert (beside.eos_id, beside.chat_template) == (hf.eos_id, CHATML)
    alone = tmp_path / "my_tokenizer.json"
    shutil.copyfile(hf_dir / "tokenizer.json", alone)
    bare = load_tokenizer(alone)  # no config: the usual special-token names among its special added tokens
    assert bare.kind == "hf" and bare.chat_template is None and bare.bos_id is None
    assert bare.eos_id == hf.piece_to_id("<|endoftext|>") and bare.encode(TEXTS[0]) == hf.encode(TEXTS[0])


def test_resolve_errors_name_the_path_and_what_is_accepted(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"tokenizer not found: .*nope.*tokenizer\.json file, a Hugging Face"):
        resolve_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no tokenizer\.json"):
        resolve_tokenizer(tmp_path / "empty")
    # a directory that happens to carry a shipped name (`fm demo --out demo` makes one) is no tokenizer: the name wins
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_tokenizer("demo") == SHIPPED_TOKENIZERS["demo"]
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(TokenizerError, match=rf"{junk} is not a tokenizer: not a SentencePiece model"):
        load_tokenizer(junk)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"version": "1.0"}')
    with pytest.raises(TokenizerError, match=rf"{bad_json} is not a tokenizer: not a Hugging Face tokenizer\.json"):
        load_tokenizer(bad_json)


def test_copy_tokenizer_files(hf, hf_dir, tmp_path):
    names = copy_tokenizer_files(hf_dir, tmp_path / "out" / "tok")
    assert sorted(names) == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in (tmp_path / "out" / "tok").iterdir()) == sorted(names)
    assert load_tokenizer(tmp_path / "out" / "tok").encode(TEXTS[0]) == hf.encode(TEXTS[0])
    copy_tokenizer_files("demo", tmp_path / "out" / "tok")  # replaces the directory as a whole
    assert [p.name for p in (tmp_path / "out" / "tok").iterdir()] == ["tokenizer.model"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]


def test_pickles_for_loader_workers(hf):
    import pickle

    again = pickle.loads(pickle.dumps(hf))
    assert again.encode(TEXTS[0]) == hf.encode(TEXTS[0]) and again.eos_id == hf.eos_id


# ------------------------------------------------------------------------------------------- chat templates
@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_chat_template_renders_and_encodes_as_transformers(hf, auto_tok, conv):
    for gen in (False, True):
        text = hf.apply_chat_template(conv, add_generation_prompt=gen)
        assert text == auto_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        assert hf.encode(text) == auto_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen,
                                                               return_dict=False)


def test_chat_template_raise_exception_is_a_value_error(hf_dir, tmp_path):
    d = tmp_path / "t"
    copy_tokenizer_files(hf_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "chat_template.jinja").write_text("{{ raise_exception('only user turns') }}")  # the file wins
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="only user turns"):
        load_tokenizer(d).apply_chat_template([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------------------------------- packing, loader
def test_no_bos_packing_masks_the_input_but_its_last_token():
    from fm.data.packing import sample_pieces

    (pieces, n, masked, last), = sample_pieces([5, 6, 7], [8, 9], None, 2, 32)[0]
    assert n == 5 and masked == 2 and last == 2 and np.concatenate(pieces).tolist() == [5, 6, 7, 8, 9]
    (pieces, n, masked, last), = sample_pieces([], [8, 9], None, 2, 32)[0]
    assert (n, masked) == (2, 0)
    (pieces, n, masked, last), = sample_pieces([], [], None, 2, 32)[0]
    assert n == 1 and np.concatenate(pieces).tolist() == [2]
    parts, event = sample_pieces([5, 6, 7], list(range(10, 20)), None, 2, 6, "segment")
    assert event == "segmented" and [p[2] for p in parts] == [2, 0, 0]


def _rows(batch):
    """(tokens, targets) of each sample of a batch."""
    out = []
    cu = batch["cu_seqlens"].tolist()
    flat_in, flat_tg = batch["inputs"].reshape(-1).tolist(), batch["targets"].reshape(-1).tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        if batch["task_ids"].reshape(-1)[a] >= 0:
            out.append((flat_in[a:b], flat_tg[a:b]))
    return out


def test_loader_plain_text_with_hf_tokenizer(hf, hf_dir, tmp_path):
    from fm.data.loader import build_train_loader

    recs = [{"input": "", "output": t} for t in TEXTS[:4]]
    cfg = make_mixture(tmp_path, {"t": (recs, {"allow_repeat": False})})
    loader = build_train_loader(cfg, str(hf_dir), batch_size=1, max_length=64, seed=0)  # a path works too
    samples = [s for b in loader for s in _rows(b)]
    assert sorted(s[0] for s in samples) == sorted(hf.encode(r["output"]) for r in recs)  # no BOS
    for tokens, targets in samples:
        assert targets == tokens[1:] + [hf.eos_id]


def test_sft_messages_mask_exactly_the_prompt(hf, auto_tok, tmp_path):
    from fm.data.loader import build_train_loader

    recs = [{"messages": c, "id": i} for i, c in enumerate(CONVERSATIONS)]
    cfg = make_mixture(tmp_path, {"chat": (recs, {"allow_repeat": False, "messages_key": "messages"})})
    loader = build_train_loader(cfg, hf, batch_size=1, max_length=128, seed=0)
    samples = [s for b in loader for s in _rows(b)]
    assert len(samples) == 2
    for conv in CONVERSATIONS:
        want = auto_tok.apply_chat_template(conv, tokenize=True, return_dict=False)
        prompt = auto_tok.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True,
                                              return_dict=False)
        # the template's ids, as transformers makes them, up to the answer's <|im_end|> (the EOS): the packer's EOS
        # label takes its place, and the template's newline after it is not trained
        end = len(want) - 1 - want[::-1].index(hf.eos_id)
        assert want[end + 1:] == auto_tok("\n", add_special_tokens=False).input_ids
        tokens, targets = next(s for s in samples if s[0] == want[:end])
        k = len(prompt)
        assert want[:k] == prompt
        # no BOS: position t predicts token t+1; the prompt's positions but its last are masked
        assert targets[:k - 1] == [IGNORE_INDEX] * (k - 1)
        assert targets[k - 1:] == want[k:end + 1] and targets[-1] == hf.eos_id  # <|im_end|> trained once


def test_sft_messages_errors_name_file_and_line(hf, tmp_path):
    from fm.data.loader import build_train_loader

    recs = [{"messages": CONVERSATIONS[0]}, {"messages": [{"role": "user", "content": "no answer"}]}]
    cfg = make_mixture(tmp_path, {"chat": (recs, {"allow_repeat": False, "messages_key": "messages"})})
    with pytest.raises(ValueError, match=r"data\.jsonl: line 2 .*the last message must be the assistant's"):
        list(build_train_loader(cfg, hf, batch_size=1, max_length=128, seed=0))
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        build_train_loader(cfg, "demo", batch_size=1, max_length=128, seed=0)
    from fm.data.mixture import MixtureConfigError, parse_mixture

    with pytest.raises(MixtureConfigError, match="messages_key: conversations are rendered with the tokenizer's"):
        parse_mixture([{"task_name": "c", "abs_weight": 1, "path": str(tmp_path / "chat"), "messages_key": "m",
                        "json_keys": ["text"]}])


def test_eos_token_can_be_an_added_token(hf, tmp_path):
    from fm.data.loader import build_train_loader

    tok = load_tokenizer(hf.path)
    tok.eos_id = tok.piece_to_id("<|endoftext|>")  # what data.eos_token does
    cfg = make_mixture(tmp_path, {"t": ([{"input": "", "output": "abc"}], {"allow_repeat": False})})
    (tokens, targets), = _rows(next(iter(build_train_loader(cfg, tok, batch_size=1, max_length=16, seed=0))))
    assert targets[-1] == tok.piece_to_id("<|endoftext|>")


# ------------------------------------------------------------------------------------------- fm convert, fm stats
def test_convert_counts_hf_tokens(hf, hf_dir, tmp_path):
    from fm.data.convert import main

    recs = [{"input": "你好", "output": t} for t in TEXTS]
    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    assert main(["-p", str(src), "-l", "zh", "-o", str(tmp_path / "out"), "--tokenizer", str(hf_dir)]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    counts = [len(hf.encode(r["input"])) + len(hf.encode(r["output"])) for r in recs]
    assert meta["token_count_method"] == f"tokenizer:{hf_dir.resolve()}"
    assert meta["avg_token_per_line"] == pytest.approx(sum(counts) / len(counts), rel=1e-12)


def test_stats_takes_an_hf_tokenizer(hf_dir, tmp_path, capsys):
    from fm.data.stats import main

    cfg = make_mixture(tmp_path, {"t": ([{"input": "", "output": t} for t in TEXTS[:4]], {})})
    assert main(["--dataset-config", cfg, "--tokenizer", str(hf_dir), "--rows", "2", "--max-length", "32",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["t"]["tokens"] > 0


# ------------------------------------------------------------------------------------------- preflight, config
def _run_cfg(tmp_path, **over):
    from tests.helpers import make_launch_run

    path = make_launch_run(tmp_path / "run")
    data = json.loads(path.read_text())
    data.update(over)
    path.write_text(json.dumps(data))
    return path


def test_preflight_with_hf_tokenizer(hf_dir, tmp_path):
    from fm.train.preflight import preflight

    cfg = _run_cfg(tmp_path, tokenizer_path=str(hf_dir))
    model = json.loads((tmp_path / "run" / "model.json").read_text())
    r = preflight(str(cfg), [])
    assert r.problems == [] and "(hf, 600 tokens)" in r.facts["tokenizer"]
    assert preflight(str(cfg), [("data.eos_token", "<|endoftext|>")]).problems == []
    assert "data.eos_token: '<nope>' is not a token of" in "\n".join(preflight(str(cfg), [("data.eos_token",
                                                                                           "<nope>")]).problems)
    (tmp_path / "run" / "model.json").write_text(json.dumps({**model, "vocab_size": 300}))
    text = "\n".join(preflight(str(cfg), []).problems)
    assert f"data.tokenizer: {hf_dir.resolve()} has 600 pieces but the model config's vocab_size is 300" in text
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    text = "\n".join(preflight(str(cfg), [("data.tokenizer", str(junk))]).problems)
    assert f"data.tokenizer: {junk} is not a tokenizer: not a Hugging Face tokenizer.json" in text


def test_empty_tokenizer_comes_from_the_checkpoint(hf_dir, tmp_path):
    from fm.checkpoint.open import write_tokenizer_beside
    from fm.train.config import load_config, tokenizer_source
    from fm.train.preflight import preflight

    weights = tmp_path / "base.pt"
    torch.save({}, weights)
    write_tokenizer_beside(weights, hf_dir)
    cfg = _run_cfg(tmp_path, tokenizer_path="", load_model=str(weights), resume_ckpt="")
    spec, where = tokenizer_source(load_config(str(cfg)))
    assert spec == str(tmp_path / "base.tokenizer") and where == f"model.init_from {weights}"
    r = preflight(str(cfg), [])
    assert r.facts["tokenizer"].startswith(str(tmp_path / "base.tokenizer")) and "from model.init_from" in \
        r.facts["tokenizer"]
    # neither names a checkpoint: the default is the demo tokenizer, as fm always defaulted to
    assert tokenizer_source(load_config(str(cfg), [("model.init_from", "")]))[0] == "demo"
    assert "from the default" in preflight(str(cfg), [("model.init_from", "")]).facts["tokenizer"]
    # a checkpoint named that carries none (an upstream .pt alone): data.tokenizer must say which made the data
    bare = tmp_path / "bare" / "upstream.pt"
    bare.parent.mkdir()
    torch.save({}, bare)
    text = "\n".join(preflight(str(cfg), [("model.init_from", str(bare))]).problems)
    assert f"data.tokenizer is empty and model.init_from {bare} carries no tokenizer: set data.tokenizer" in text


# ------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_carries_an_hf_tokenizer(hf, hf_dir, tmp_path):
    from fm.checkpoint.commit import verify_checkpoint
    from fm.checkpoint.layout import COMPLETE
    from fm.checkpoint.open import open_checkpoint, tokenizer_beside, write_tokenizer_beside
    from tests.unit.test_checkpoint_open import _run_dir

    run, _, _ = _run_dir(tmp_path, resolve_tokenizer("demo"))
    step = run / "5"
    (step / "tokenizer.model").unlink()
    from fm.checkpoint.commit import tokenizer_part

    written = tokenizer_part(hf.path)(step)
    assert sorted(written) == ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
    from fm.checkpoint.commit import file_digest

    (step / COMPLETE).write_text(json.dumps({"files": {w: file_digest(step / w) for w in written}}))
    assert verify_checkpoint(step) == []
    ck = open_checkpoint(run)
    assert ck.tokenizer == step / "tokenizer" and load_tokenizer(ck.tokenizer).encode(TEXTS[0]) == hf.encode(TEXTS[0])
    pt = tmp_path / "merged.pt"
    shutil.copyfile(step / "fm9g_live_checkpoint-5.pt", pt)
    assert write_tokenizer_beside(pt, ck.tokenizer) == tokenizer_beside(pt, "hf") == tmp_path / "merged.tokenizer"
    assert open_checkpoint(pt).tokenizer == tmp_path / "merged.tokenizer"
    assert open_checkpoint(pt, tokenizer=str(hf_dir)).tokenizer == hf_dir.resolve()


def test_generate_template_auto_uses_the_tokenizers_template(hf, hf_dir, tmp_path, capsys, monkeypatch):
    from fm import generate as gen

    seen = record_generate_prompts(monkeypatch)
    from tests.unit.test_generate import DRAGONFLY

    (tmp_path / "m.json").write_text(json.dumps({**DRAGONFLY, "vocab_size": 600}))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"messages": CONVERSATIONS[1][:-1]}, ensure_ascii=False) + "\n")
    args = ["--config", str(tmp_path / "m.json"), "--tokenizer", str(hf_dir), "--max-new-tokens", "3",
            "--device", "cpu", "--seed", "0"]
    assert gen.main([*args, "--input-file", str(inp)]) == 0
    assert gen.main([*args, "--prompt", "你好", "--template", "auto"]) == 0
    want = [hf.encode(hf.apply_chat_template(CONVERSATIONS[1][:-1], add_generation_prompt=True)),
            hf.encode(hf.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True))]
    head = hf.encode(f"{IM_START}assistant\n")
    assert seen == want and want[1][-len(head):] == head
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and all(isinstance(r["generate"], str) for r in rows)
    seen.clear()
    assert gen.main([*args, "--prompt", "你好", "--template", "none"]) == 0
    assert seen == ["你好"]

"""Chat formats: the export's chat_template gives, through transformers' apply_chat_template (5.x here, 4.44 and
4.57 in cached environments), exactly the token ids fm generate --template feeds the model; the export's
tokenizer files load in transformers 4 and 5 alike."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import transformers

from fm.chat import jinja_template, render, render_prompt
from fm.export.llama import write_tokenizer_files
from fm.generate import main as generate_main
from tests.envs import EnvUnavailable, ensure, python
from tests.helpers import record_generate_prompts

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a story\nin two lines."}],
    [{"role": "user", "content": "写一首诗。"}, {"role": "assistant", "content": "床前明月光，\n\t疑是地上霜。"},
     {"role": "user", "content": "再来一首"}, {"role": "assistant", "content": "好的"},
     {"role": "user", "content": "谢谢 thanks"}],
]
FORMATS = ("fm9g", "spark", "none")


@pytest.fixture(scope="module", params=FORMATS)
def export_dir(request, tmp_path_factory, tokenizer_path):
    out = tmp_path_factory.mktemp(f"tok-{request.param}")
    write_tokenizer_files(tokenizer_path, out, chat_format=request.param)
    return request.param, out


def _expected(tokenizer, fmt):
    return [[tokenizer.bos_id] + tokenizer.sp.encode(render(conv, fmt)) for conv in CONVERSATIONS]


def test_render_of_one_turn_is_the_generate_template():
    assert render_prompt("Q", "fm9g") == "<用户>Q<AI>"
    assert render_prompt("a\nb\tc", "spark") == "<User> a<ret>b<tab>c<end><Bot> "
    assert render(CONVERSATIONS[2], "fm9g") == ("You are brief.<用户>Hi!<AI>Hello.<用户>Tell me a story\nin two "
                                                "lines.<AI>")
    assert render(CONVERSATIONS[3][:3], "spark") == (
        "<User> 写一首诗。<end><Bot> 床前明月光，<ret><tab>疑是地上霜。<end><User> 再来一首<end><Bot> ")
    with pytest.raises(ValueError, match="message 0"):
        render([{"role": "robot", "content": "x"}], "fm9g")


def test_apply_chat_template_gives_the_ids_fm_feeds(export_dir, tokenizer):
    fmt, out = export_dir
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == jinja_template(fmt)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    for conv, want in zip(CONVERSATIONS, _expected(tokenizer, fmt), strict=True):
        got = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert got == want, (fmt, conv)


def test_tokenizer_config_has_no_transformers5_only_fields(export_dir):
    _, out = export_dir
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "extra_special_tokens" not in cfg and isinstance(cfg["additional_special_tokens"], list)
    assert not {"is_local", "local_files_only", "backend"} & set(cfg)
    assert not (out / "chat_template.jinja").exists()


CHECK_IN_OTHER_ENV = """
import json, sys
import transformers
out, expected, conversations = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tok = transformers.AutoTokenizer.from_pretrained(out)
got = [list(tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True)) for c in conversations]
plain = tok("Hello world. 你好，世界！").input_ids
print(json.dumps({"version": transformers.__version__, "chat": got, "plain": plain, "fast": tok.is_fast}))
"""


@pytest.mark.parametrize("version", ["4.44.2", "4.57.6"])
def test_export_tokenizer_loads_in_transformers_4(export_dir, tokenizer, version):
    """Many serving stacks still run transformers 4: the same files load there and give the same ids."""
    fmt, out = export_dir
    try:
        env = ensure(f"transformers-{version}", [f"transformers=={version}", "sentencepiece==0.2.1",
                                                 "protobuf==5.29.6", "jinja2==3.1.6"], check="import transformers")
    except EnvUnavailable as e:
        pytest.skip(f"cannot build a transformers {version} environment: {e}")
    proc = subprocess.run([str(python(env)), "-c", CHECK_IN_OTHER_ENV, str(out), json.dumps(_expected(tokenizer, fmt)),
                           json.dumps(CONVERSATIONS)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["version"] == version and result["fast"]
    assert result["plain"] == tokenizer.encode("Hello world. 你好，世界！", bos=True)
    assert result["chat"] == _expected(tokenizer, fmt)


def test_generate_renders_conversations_like_the_template(tmp_path, tokenizer, tokenizer_path, monkeypatch):
    """fm generate --input-file with "messages" feeds render(messages): the ids apply_chat_template gives."""
    seen = record_generate_prompts(monkeypatch)
    conv = tmp_path / "conv.jsonl"
    conv.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in CONVERSATIONS))
    torch.manual_seed(0)
    assert generate_main(["--config", "tiny", "--tokenizer", tokenizer_path, "--template", "spark", "--input-file",
                          str(conv), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert seen == [render(c, "spark") for c in CONVERSATIONS]

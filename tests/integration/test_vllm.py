"""The real vLLM (CPU build, pinned in requirements-vllm.txt) serves fm's Hugging Face export and answers as
``fm generate`` does: greedy ``/v1/completions`` and ``/v1/chat/completions`` (the export's ``chat_template``)
give the same token ids and text as ``python -m fm.generate`` on the checkpoint that was exported, and a LoRA
adapter converted by ``fm lora export-hf`` and served with ``--enable-lora --lora-modules`` gives what
``fm generate`` gives on the merged model (``fm lora merge``). An imported family (a Qwen2, ``fm import`` then
``fm export``) is served as ``Qwen2ForCausalLM`` and generates what fm generates on the imported checkpoint.

The model is the shipped ``tiny`` dragonfly (head size 32, which vLLM's CPU attention supports), trained for a
few steps with ``fm train`` so that greedy text is real words and the chat answers end with EOS. vLLM runs in its
own cached environment (tests/envs.py), built on first use (minutes); the tests are skipped only when that
environment cannot be built, with pip's error.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from fm.launch import free_port
from tests import envs
from tests.helpers import ROOT, clean_env, write_index

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # the first run builds the environment

PROMPTS = ("The cat", "A dog looked", "My friend waited for the")
QUESTIONS = ("你好", "What did the bird do?", "Who are you?")
LORA_QUESTIONS = ("你好", "What did the bird do?", "What did the teacher do?")  # what the adapter learnt
MAX_NEW = 24
NAME, LORA_NAME = "tiny", "tiny-lora"
EOS = 2  # </s> of quick_start/tokenizer.model
HEALTH_TIMEOUT = 300
SUBJECTS = ("The cat", "A dog", "The bird", "My friend", "The teacher", "Our neighbour")
VERBS = ("sat on", "looked at", "ran past", "waited for", "talked to", "walked around")
OBJECTS = ("the mat", "the old house", "a small river", "the tall tree", "the quiet garden", "the red car")


# ------------------------------------------------------------------------------------------ the model
@dataclass
class Models:
    base: Path  # fm checkpoint step directory (fm train)
    hf: Path  # fm export of it
    lora: Path  # the LoRA run's step directory (PEFT adapter on our module names)
    hf_adapter: Path  # fm lora export-hf of it, for the Hugging Face export
    merged: Path  # fm lora merge of it into the base: a state dict .pt with its model config beside it


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def _fm(*args: str, cwd: Path) -> str:
    return _run([sys.executable, "-m", "fm.cli", *map(str, args)], cwd)


def _data(tmp: Path) -> None:
    """Sentences (plain text) and fm9g chat turns, each question with its one answer; the LoRA run learns other
    answers to the same questions, so that the adapter changes the greedy text."""
    rng = random.Random(0)
    sentence = lambda: f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
    facts = {s: f"{s} {v} {o}." for s, v, o in zip(SUBJECTS, VERBS, OBJECTS)}
    qa = [(f"What did {s.lower()} do?", a) for s, a in facts.items()] + [("你好", "你好！The cat sat on the mat.")]
    other = [(q, f"I do not know. {a}") for q, a in qa]
    write_index(tmp / "data" / "text", [{"input": "", "output": " ".join(sentence() for _ in range(4))}
                                        for _ in range(400)])
    write_index(tmp / "data" / "chat", [{"input": f"<用户>{q}<AI>", "output": a} for q, a in qa * 20])
    write_index(tmp / "data" / "other", [{"input": f"<用户>{q}<AI>", "output": a} for q, a in other * 20])
    for name, tasks in (("base", ("text", "chat")), ("lora", ("other",))):
        (tmp / "data" / f"{name}.json").write_text(json.dumps(
            [{"task_name": t, "abs_weight": 1.0, "path": t, "allow_repeat": True} for t in tasks]))


def _train(tmp: Path, name: str, iters: int, **extra) -> Path:
    cfg = {"model_unique": name, "config": "tiny", "dataset_config": str(tmp / "data" / f"{name}.json"),
           "tokenizer_path": str(ROOT / "quick_start" / "tokenizer.model"), "engine": "fsdp", "dtype": "fp32",
           "max_length": 128, "batch_size": 4, "train_iters": iters, "save_iters": iters, "lr": 0.02,
           "warmup_iters": 5, "lr_scheduler": "cosine", "inspect_iters": 0, "log_iters": 10, "seed": 1,
           "save": str(tmp / "ckpt"), "tensorboard": "", **extra}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    _run([sys.executable, "-m", "fm.cli", "train", "--config", str(path)], tmp, clean_env(GPUS_PER_NODE="1"))
    step = tmp / "ckpt" / name / str(iters)
    assert (step / "COMPLETE").is_file(), sorted(p.name for p in (tmp / "ckpt" / name).iterdir())
    return step


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    tmp = tmp_path_factory.mktemp("vllm")
    _data(tmp)
    base = _train(tmp, "base", 80)
    _fm("export", "--checkpoint", base, "--output", tmp / "hf", cwd=tmp)
    tok_cfg = json.loads((tmp / "hf" / "tokenizer_config.json").read_text())
    assert "<用户>" in tok_cfg.get("chat_template", ""), tok_cfg  # fm export writes the fm9g template
    lora = _train(tmp, "lora", 40, lora=True, lora_r=8, lora_alpha=16.0, lora_targets="q,k,v,o,gate,up,down",
                  load_model=str(base / "fm9g_live_checkpoint-80.pt"))
    _fm("lora", "export-hf", "--adapter", lora, "--output", tmp / "hf_adapter", "--base-model", tmp / "hf", cwd=tmp)
    _fm("lora", "merge", "--lora", lora, "--base", base, "--output", tmp / "merged.pt", cwd=tmp)
    return Models(base, tmp / "hf", lora, tmp / "hf_adapter", tmp / "merged.pt")


# ------------------------------------------------------------------------------------------ fm generate
def fm_generate(checkpoint: Path, prompts: tuple[str, ...], template: str = "none", *extra: str) -> list[str]:
    """``python -m fm.generate`` (greedy, fp32, CPU): the texts it prints, one per prompt."""
    cmd = [sys.executable, "-m", "fm.generate", "--checkpoint", str(checkpoint), "--template", template,
           "--max-new-tokens", str(MAX_NEW), "--device", "cpu", "--dtype", "fp32", *extra]
    for p in prompts:
        cmd += ["--prompt", p]
    out = _run(cmd, checkpoint.parent)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["input"] for r in rows] == list(prompts), out
    return [r["generate"] for r in rows]


def fm_ids(checkpoint: Path, prompts: tuple[str, ...], template: str = "none",
           tokenizer: Path | None = None) -> tuple[list, list]:
    """What fm generate feeds the model and the ids it generates, from the same functions in this process:
    ``([BOS] + encode(render(prompt)), new ids without the stopping EOS)`` per prompt."""
    import torch

    from fm.chat import render_prompt
    from fm.checkpoint.open import open_checkpoint
    from fm.generate import generate
    from fm.tokenizer import Tokenizer

    ck = open_checkpoint(str(checkpoint))
    model = ck.build_model(device="cpu", dtype=torch.float32)
    tok = Tokenizer(str(tokenizer or ck.tokenizer))
    texts = [render_prompt(p, template) for p in prompts]
    fed = [tok.encode(t, bos=True) for t in texts]
    outs = generate(model, fed, max_new_tokens=MAX_NEW, stop_token_ids=(tok.eos_id,))
    return fed, outs


# ------------------------------------------------------------------------------------------ the server
@dataclass
class Server:
    url: str
    log: Path
    proc: subprocess.Popen

    def tail(self, n: int = 60) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"(no server log: {e})"
        return f"--- vLLM server log ({self.log}), last {n} lines ---\n" + "\n".join(lines[-n:])

    def post(self, path: str, body: dict, timeout: int = 180) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} {body}: HTTP {e.code} {e.read().decode(errors='replace')}\n"
                                 f"{self.tail()}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise AssertionError(f"POST {path} {body}: {e}\n{self.tail()}") from e


def _server_env(python: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
           and not k.startswith(("VLLM_", "CUDA_"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache (the default takes a large share of memory)
               HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{python.parent}:{env.get('PATH', '/usr/bin:/bin')}")
    return env


@contextmanager
def serve(python: Path, model: Path, log: Path, *extra: str):
    """vLLM's OpenAI API server on 127.0.0.1 for ``model``, up (``/health`` answers) until the block ends; then
    it and its engine processes (one process group) are terminated, killed if they linger."""
    port = free_port()
    # not `vllm serve`: vllm-cpu 0.32.0's CLI asks for the version of a distribution named "vllm" and stops with
    # PackageNotFoundError (its distribution is "vllm-cpu"); the API server module works (deprecated, same server)
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
           NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
           "--seed", "0", "--enforce-eager", *extra]  # eager: no minute of graph compilation on a 2-core machine
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_server_env(python), cwd=log.parent,
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", log, proc)
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode} before it was up\n{server.tail(120)}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not answer /health within {HEALTH_TIMEOUT} s\n{server.tail(120)}")
            time.sleep(2)
        yield server
    finally:
        _stop(proc)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the API server, which shuts its engine down; whatever is left of its process group (its own,
    from start_new_session: engine core, workers) after that is terminated, then killed."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 10
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not _group_alive(proc.pid):
            break
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    try:
        env = envs.vllm()
    except envs.EnvUnavailable as e:
        pytest.skip(f"the vLLM environment cannot be built here: {e}")
    return envs.python(env)


@pytest.fixture(scope="module")
def server(vllm_python, models):
    """One server for every check (a start costs ~40 s here): the base model, and the adapter beside it."""
    with serve(vllm_python, models.hf, models.hf.parent / "vllm.log", "--enable-lora", "--max-lora-rank", "8",
               "--max-loras", "1", "--lora-modules", f"{LORA_NAME}={models.hf_adapter}") as s:
        yield s


def _choice(server: Server, resp: dict) -> tuple[list[int], list[int], str]:
    """(prompt ids, generated ids without a stopping EOS, text) of a one-choice response."""
    (c,) = resp["choices"]
    prompt = c.get("prompt_token_ids") or resp.get("prompt_token_ids")
    ids = list(c["token_ids"])
    text = c["text"] if "text" in c else c["message"]["content"]
    assert c["finish_reason"] in ("stop", "length"), f"{resp}\n{server.tail()}"
    if c["finish_reason"] == "stop":  # fm generate stops on EOS without printing it
        assert ids and ids[-1] == EOS and c["stop_reason"] is None, f"{resp}\n{server.tail()}"
        ids = ids[:-1]
    else:
        assert len(ids) == MAX_NEW, resp
    return prompt, ids, text


def _compare(server: Server, what: str, got: list, want: list) -> None:
    if got != want:
        lines = [f"{what}: vLLM and fm generate differ"]
        for i, (g, w) in enumerate(zip(got, want)):
            mark = "  " if g == w else "!="
            lines.append(f"{mark} [{i}]\n   vLLM: {g!r}\n   fm:   {w!r}")
        raise AssertionError("\n".join(lines) + "\n" + server.tail())


# ------------------------------------------------------------------------------------------ the checks
def test_completions_equal_fm_generate(server, models):
    fed, want_ids = fm_ids(models.base, PROMPTS)
    want_text = fm_generate(models.base, PROMPTS)
    got = [_choice(server, server.post("/v1/completions", {
        "model": NAME, "prompt": p, "max_tokens": MAX_NEW, "temperature": 0, "return_token_ids": True}))
        for p in PROMPTS]
    _compare(server, "prompt ids (vLLM adds BOS as fm does)", [g[0] for g in got], fed)
    _compare(server, "generated ids", [g[1] for g in got], want_ids)
    _compare(server, "text", [g[2] for g in got], want_text)
    assert all(len(t.split()) >= 5 for t in want_text), want_text  # real text, not a degenerate repeat of nothing


def test_chat_completions_equal_fm_generate_with_the_template(server, models):
    fed, want_ids = fm_ids(models.base, QUESTIONS, "fm9g")
    want_text = fm_generate(models.base, QUESTIONS, "fm9g")
    got = [_choice(server, server.post("/v1/chat/completions", {
        "model": NAME, "messages": [{"role": "user", "content": q}], "max_tokens": MAX_NEW, "temperature": 0,
        "return_token_ids": True})) for q in QUESTIONS]
    _compare(server, "prompt ids (the chat_template: BOS <用户>q<AI>)", [g[0] for g in got], fed)
    _compare(server, "generated ids", [g[1] for g in got], want_ids)
    _compare(server, "text", [g[2] for g in got], want_text)
    assert any(len(ids) < MAX_NEW for ids in want_ids), want_ids  # some answer ends with EOS: the stop path is seen


def test_lora_adapter_served_equals_fm_generate_on_the_merged_model(server, models):
    # the merge wrote the base's tokenizer beside the .pt (fm generate finds it there too)
    tok = models.merged.with_name("merged.tokenizer.model")
    _, merged_ids = fm_ids(models.merged, LORA_QUESTIONS, "fm9g", tok)
    merged = fm_generate(models.merged, LORA_QUESTIONS, "fm9g")  # no --tokenizer: found beside the .pt
    _, base_ids = fm_ids(models.base, LORA_QUESTIONS, "fm9g")
    base = fm_generate(models.base, LORA_QUESTIONS, "fm9g")
    assert all(m != b for m, b in zip(merged, base)), (merged, base)  # the adapter changes every answer
    listed = {m["id"] for m in json.loads(urllib.request.urlopen(server.url + "/v1/models", timeout=30).read())[
        "data"]}
    assert {NAME, LORA_NAME} <= listed, f"{listed}\n{server.tail()}"
    for model, want_ids, want in ((LORA_NAME, merged_ids, merged), (NAME, base_ids, base)):  # base unchanged
        got = [_choice(server, server.post("/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": q}], "max_tokens": MAX_NEW,
            "temperature": 0, "return_token_ids": True})) for q in LORA_QUESTIONS]
        _compare(server, f"{model}: generated ids", [g[1] for g in got], want_ids)
        _compare(server, f"{model}: text", [g[2] for g in got], want)


# ------------------------------------------------------------------------------------------ an imported family
def test_imported_qwen2_exports_back_and_vllm_serves_it_as_fm_generates(vllm_python, tmp_path):
    """A Qwen2 (q/k/v biases) imported with ``fm import`` exports back to ``Qwen2ForCausalLM``, which vLLM serves
    with no remote code, greedily generating the ids fm generates on the imported checkpoint."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = ROOT / "quick_start" / "tokenizer.model"
    cfg = Qwen2Config(vocab_size=8000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=EOS, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.15)
    model.save_pretrained(str(tmp_path / "qwen2"))
    _fm("import", "--hf-dir", tmp_path / "qwen2", "--output", tmp_path / "q.pt", cwd=tmp_path)
    _fm("export", "--checkpoint", tmp_path / "q.pt", "--output", tmp_path / "q_hf", "--tokenizer", tokenizer,
        "--chat-template", "none", cwd=tmp_path)
    assert json.loads((tmp_path / "q_hf" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    fed, want_ids = fm_ids(tmp_path / "q.pt", PROMPTS, tokenizer=tokenizer)
    # token ids in: the SentencePiece tokenizer shipped here is fm's demo one, not a Qwen tokenizer (which a real
    # import takes along as it is); what is checked is the Qwen2 model vLLM builds from the export
    with serve(vllm_python, tmp_path / "q_hf", tmp_path / "vllm-qwen2.log") as s:
        got = [_choice(s, s.post("/v1/completions", {"model": NAME, "prompt": ids, "max_tokens": MAX_NEW,
                                                     "temperature": 0, "return_token_ids": True})) for ids in fed]
        _compare(s, "generated ids", [g[1] for g in got], want_ids)

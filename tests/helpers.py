"""Helpers shared by several test modules: tiny training runs (model config, mixture, train config), torchrun
launches and their outputs, and a hostile pickle. Test modules import from here, never from each other."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "fm9g_2b" / "pretrain_dragonfly.py"
WORKER = ROOT / "tests" / "support" / "worker.py"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
TINY_MODEL = {"vocab_size": 8000, "dim_model": 64, "dim_ff": 128, "dim_head": 16, "num_heads": 4, "num_kv_heads": 2,
              "num_layers": 2, "activate_fn": "silu", "eps": 1e-5, "init_std": 0.1, "scale": True, "scale_emb": 12,
              "scale_depth": 1.4, "dim_model_base": 16, "tie_lm_head": True, "half": False, "dtype": "fp32"}
TOPOLOGY_VARS = ("GPUS_PER_NODE", "NNODES", "NODE_RANK", "RANK", "MASTER_ENDPOINT", "MASTER_PORT", "TRAIN_CONFIG",
                 "APP", "REQUEUE", "RDZV_NAME", "RDZV_DIR", "RDZV_TIMEOUT", "SIGNALS_TO_HANDLE", "CUDA_VISIBLE_DEVICES")


# ------------------------------------------------------------------------------------------ data and configs
def write_index(path: Path, records: list[dict]) -> None:
    """``data.jsonl`` + the text ``index`` of line offsets (upstream's index format) for ``records``."""
    path.mkdir(parents=True, exist_ok=True)
    offsets = [0]
    with open(path / "data.jsonl", "wb") as f:
        for rec in records:
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
            f.write(line)
            offsets.append(offsets[-1] + len(line))
    (path / "index").write_text("\n".join(map(str, offsets)) + "\n")


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_mixture(tmp_path: Path, datasets: dict, name: str = "mix.json") -> str:
    """datasets: task → (records, extra keys). Writes index dirs + config; returns the config path."""
    entries = []
    for task, (recs, extra) in datasets.items():
        if not (tmp_path / task).is_dir():
            write_index(tmp_path / task, recs)
        entries.append({"task_name": task, "abs_weight": 1.0, "path": task, **extra})
    cfg = tmp_path / name
    cfg.write_text(json.dumps(entries))
    return str(cfg)


def records(prefix: str, n: int, seed: int, instr: bool = False) -> list[dict]:
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    if instr:
        return [{"input": f"{prefix}{i} {words(rng.randint(1, 4))}", "output": words(rng.randint(1, 5))}
                for i in range(n)]
    return [{"input": "", "output": f"{prefix}{i} {words(rng.randint(1, 6))}"} for i in range(n)]


def _write_run(tmp: Path, mixture: list[dict], cfg: dict, train: dict) -> Path:
    (tmp / "model.json").write_text(json.dumps(TINY_MODEL))
    (tmp / "data" / "mix.json").write_text(json.dumps(mixture))
    cfg = {"model_unique": "run", "config": str(tmp / "model.json"), "dataset_config": str(tmp / "data" / "mix.json"),
           "tokenizer_path": str(ROOT / "quick_start" / "tokenizer.model"), "engine": "fsdp", "max_length": 64,
           "batch_size": 2, **cfg, **train}
    path = tmp / "train.json"
    path.write_text(json.dumps(cfg))
    return path


def make_run(tmp: Path, *, repeat: bool, n_a: int = 300, n_b: int = 200, **train) -> Path:
    """The trainer tests' run: a tiny model config, a two-task mixture (task b instruction-shaped) and a
    40-step train config; returns the train config path."""
    tmp.mkdir(parents=True, exist_ok=True)
    write_index(tmp / "data" / "a", records("a", n_a, 1))
    write_index(tmp / "data" / "b", records("b", n_b, 2, instr=True))
    mixture = [{"task_name": "a", "abs_weight": 2.0, "path": "a", "allow_repeat": repeat},
               {"task_name": "b", "abs_weight": 1.0, "path": "b", "allow_repeat": repeat}]
    cfg = {"train_iters": 40, "save_iters": 20, "lr": 0.01, "warmup_iters": 4, "lr_scheduler": "Cosine",
           "inspect_iters": 0, "seed": 7, "save": str(tmp / "ckpt"), "tensorboard": str(tmp / "tb"),
           "resume_ckpt": "latest"}
    return _write_run(tmp, mixture, cfg, train)


def make_launch_run(tmp: Path, **train) -> Path:
    """The launcher tests' run: a tiny model, a two-task mixture (text index, repeated) and a 6-step train config
    saving every 3 steps; returns the config path."""
    tmp.mkdir(parents=True, exist_ok=True)
    rng = random.Random(3)
    for name, n in (("a", 200), ("b", 100)):
        write_index(tmp / "data" / name,
                    [{"input": "", "output": f"{name}{i} " + " ".join(rng.choices(WORDS, k=5))} for i in range(n)])
    mixture = [{"task_name": "a", "abs_weight": 2.0, "path": "a", "allow_repeat": True},
               {"task_name": "b", "abs_weight": 1.0, "path": "b", "allow_repeat": True}]
    cfg = {"train_iters": 6, "save_iters": 3, "lr": 0.01, "warmup_iters": 2, "inspect_iters": 0, "seed": 7,
           "save": str(tmp / "elsewhere"), "tensorboard": "", "resume_ckpt": "latest"}
    return _write_run(tmp, mixture, cfg, train)


# ------------------------------------------------------------------------------------------ benchmarks
BENCH_QUESTIONS = {"alpha": [("Q1 first?", "A"), ("Q2 second", "B"), ("Q3 third", "C")],
                   "beta": [("Q4 fourth", "D"), ("Q5 fifth", "B"), ("Q6 sixth", "A")], "gamma": [("Q7 seventh", "C")]}


def _csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


def make_benchmarks(root: Path) -> tuple[Path, Path]:
    """Tiny C-Eval (val, header) and MMLU (test, no header) directories in their official layouts (``fm eval``'s
    formats); returns ``(ceval dir, mmlu dir)``."""
    for subject, qs in BENCH_QUESTIONS.items():
        opts = lambda q: [f"{q[:2]} option {x}" for x in "ABCD"]  # noqa: E731
        _csv(root / "ceval" / "val" / f"{subject}_val.csv", [["id", "question", "A", "B", "C", "D", "answer"]]
             + [[str(i), q, *opts(q), a] for i, (q, a) in enumerate(qs)])
        _csv(root / "mmlu" / "data" / "test" / f"{subject}_test.csv", [[q, *opts(q), a] for q, a in qs])
    return root / "ceval", root / "mmlu"


def downstream_rows(rd: Path) -> list[dict]:
    """The in-loop downstream evaluations a run logged (``train_stats.jsonl`` rows of kind ``downstream``)."""
    rows = [json.loads(x) for x in (rd / "train_stats.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("kind") == "downstream"]


def fm_eval_mc(checkpoint: Path, ceval: Path, mmlu: Path, limit: int) -> dict:
    """``fm eval``'s results (``tasks``) on a checkpoint for the benchmarks of :func:`make_benchmarks`, the first
    ``limit`` questions of each subject, on the CPU."""
    from fm.eval.__main__ import build_parser
    from fm.eval.__main__ import run as eval_run

    args = build_parser().parse_args(["--checkpoint", str(checkpoint), "--ceval-dir", str(ceval), "--mmlu-dir",
                                      str(mmlu), "--limit", str(limit), "--device", "cpu", "--batch-size", "3"])
    return eval_run(args)["tasks"]


# ------------------------------------------------------------------------------------------ running
def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without topology or slurm variables, with the venv's torchrun on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in TOPOLOGY_VARS and not k.startswith(("SLURM_", "PET_"))}
    venv = Path(os.environ.get("VIRTUAL_ENV") or ROOT / ".venv")
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def on_worker(script: Path, *, bmtrain_cpu: bool = False, faults: dict | None = None) -> list[str]:
    """What torchrun (or python) runs instead of ``script`` (``tests/support/worker.py``) so that its processes run
    BMTrain on the CPU backend and/or with injected faults: ``faults`` = ``{"die_after": 13}``, ``{"nan_steps":
    "1:2,1:5"}``, ``{"record_indexes": DIR}`` (:mod:`tests.support.faults`)."""
    if not bmtrain_cpu and not faults:
        return [str(script)]
    opts = ["--bmtrain-cpu"] if bmtrain_cpu else []
    for name, value in (faults or {}).items():
        opts += [f"--{name.replace('_', '-')}", str(value)]
    return [str(WORKER), *opts, str(script)]


def launch(config: Path, nproc: int = 2, env: dict | None = None, args: tuple = (), wait: bool = True,
           timeout: int = 240, bmtrain_cpu: bool = False, faults: dict | None = None):
    """torchrun of the dragonfly app on ``config``: ``(returncode, output)``, or the process when not ``wait``.
    ``bmtrain_cpu``: the workers run BMTrain on the CPU backend (engine bmtrain without a GPU); ``faults``: see
    :func:`on_worker`."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    full_env.update(env or {})
    app = on_worker(APP, bmtrain_cpu=bmtrain_cpu, faults=faults)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", *app, "--config", str(config), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def stats(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "train_stats.jsonl").read_text().splitlines() if x.strip()]
    # a resumed run appends again: the last row per iteration wins; validation and downstream rows ("kind") are not
    # the step's
    return {r["iter"]: r for r in rows if "kind" not in r}


def complete_steps(run: Path) -> list[int]:
    return sorted(int(d.name) for d in run.iterdir() if d.name.isdigit() and (d / "COMPLETE").is_file())


def children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


# ------------------------------------------------------------------------------------------ hostile files
class Payload:
    """A pickle whose unpickling runs ``touch <marker>``: a test checks the marker is never made."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def record_generate_prompts(monkeypatch) -> list:
    """The prompts (token ids) ``fm generate`` feeds the model, recorded as it runs them (``fm.generate.generate``
    wrapped for the test)."""
    from fm import generate as gen

    seen: list = []
    real = gen.generate

    def spy(model, prompts, **kw):
        seen.extend(prompts)
        return real(model, prompts, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    return seen

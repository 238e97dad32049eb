"""The GPU acceptance run's parts, each in its own process under its own time budget (see run.sh).

    python tests/gpu/acceptance.py --out DIR [--parts env,bmtrain,...] [--site DIR] [--wheels DIR]

Writes ``DIR/gpu_results.json`` (every part: status ok | failed | not run | timeout, seconds, figures,
and the reason when not ok) and ``DIR/gpu_results.md``. On a machine without CUDA the GPU parts report
"not run" with the reason, so the driver itself is tested on CPU (tests/unit/test_gpu_acceptance.py).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
# Seconds per part: the whole run stays within 8 minutes of wall time.
BUDGETS = {"env": 20, "bmtrain": 120, "tests": 45, "attention": 30, "train_tiny": 75, "bench_2p4b": 140,
           "convert": 50}
NEEDS_CUDA = {"bmtrain", "tests", "attention", "train_tiny", "bench_2p4b"}


class NotRun(Exception):
    """A part that cannot run here; the message says why."""


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------- parts
def part_env(args) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name() if cuda() else None}
    if cuda():
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    nvcc = shutil.which("nvcc")
    if nvcc:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
        info["nvcc"] = version.splitlines()[-1] if version else "?"
    for mod in ("flash_attn", "bmtrain"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "importable")
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            info[mod] = f"not importable: {type(exc).__name__}: {str(exc)[:120]}"
    return info


def _nccl_dirs() -> dict[str, str]:
    """NCCL_INCLUDE_DIR/NCCL_LIB_DIR for BMTrain's CMake, from the NCCL wheel that the image's torch uses."""
    import torch

    for base in sys.path:
        for lib in glob.glob(os.path.join(base, "nvidia", "nccl*", "lib", "libnccl.so*")):
            inc = Path(lib).parents[1] / "include"
            if (inc / "nccl.h").is_file():
                return {"NCCL_INCLUDE_DIR": str(inc), "NCCL_LIB_DIR": str(Path(lib).parent)}
    raise NotRun(f"no NCCL headers next to torch {torch.__version__}'s NCCL library (looked under nvidia/nccl*)")


def patch_cmake(src: Path, arch: str) -> None:
    """BMTrain 1.0.1 compiles for sm_61..sm_86, which CUDA 13's nvcc refuses (and which lack Hopper): build for
    ``arch`` instead, one architecture (``"90"``) or several (``"80;90"``)."""
    archs = arch.split(";")
    cm = src / "CMakeLists.txt"
    text = cm.read_text()
    text = re.sub(r'"61;62;70;72;75;80"', f'"{";".join(archs)}"', text)
    text = re.sub(r"(-gencode=arch=compute_\d+,code=sm_\d+ ?)+",
                  " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs), text)
    cm.write_text(text)


def _bmtrain_imports(site: str) -> str:
    check = subprocess.run([sys.executable, "-c", "import bmtrain; print('ok')"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=f"{site}:{os.environ.get('PYTHONPATH', '')}"))
    return "" if "ok" in check.stdout else (check.stderr or check.stdout)[-800:]


def _install_carried_wheel(args) -> dict | None:
    """The cp312 wheel tests/gpu/prepare.sh built on the development machine, when it imports here."""
    wheels = sorted(Path(args.wheels).glob(f"bmtrain-1.0.1-cp{sys.version_info.major}{sys.version_info.minor}-*.whl"))
    if not wheels:
        return None
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                          args.site, str(wheels[-1])], capture_output=True, text=True)
    error = (res.stdout + res.stderr)[-800:] if res.returncode else _bmtrain_imports(args.site)
    if error:
        shutil.rmtree(Path(args.site, "bmtrain"), ignore_errors=True)  # the source build gets a clean slate
        return {"carried_wheel_error": error}
    return {"built": False, "installed": wheels[-1].name, "install_seconds": round(time.perf_counter() - t0, 1)}


def part_bmtrain(args) -> dict:
    with contextlib.suppress(Exception):
        import bmtrain  # noqa: F401

        return {"built": False, "note": "bmtrain already importable"}
    if not cuda():
        raise NotRun("no CUDA")
    import torch

    carried = _install_carried_wheel(args)
    if carried is not None and "installed" in carried:
        return carried
    sdist = Path(args.wheels) / "bmtrain-1.0.1.tar.gz"
    if not sdist.is_file():
        raise NotRun(f"{sdist} missing: run tests/gpu/prepare.sh and carry .gpu_wheels")
    arch = "".join(map(str, torch.cuda.get_device_capability()))
    tmp = Path(tempfile.mkdtemp(prefix="bmtrain-src-"))
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
    src = tmp / "bmtrain-1.0.1"
    patch_cmake(src, arch)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 8), **_nccl_dirs())
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--target", args.site, str(src)], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"build failed after {seconds:.0f} s: {(res.stdout + res.stderr)[-1500:]}")
    error = _bmtrain_imports(args.site)
    if error:
        raise RuntimeError(f"built in {seconds:.0f} s but import fails: {error}")
    return {"built": True, "build_seconds": round(seconds, 1), "arch": f"sm_{arch}", **(carried or {})}


def _need_bmtrain() -> None:
    try:
        import bmtrain  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise NotRun(f"bmtrain not importable ({type(exc).__name__}: {str(exc)[:100]}); see the bmtrain part") from exc


def part_tests(args) -> dict:
    if not cuda():
        raise NotRun("no CUDA")
    files = ["tests/distributed/test_bmtrain_engine.py", "tests/unit/test_nn.py",
             "tests/unit/test_attention_kernels.py", "tests/unit/test_loss.py"]
    res = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files],
                         cwd=ROOT, capture_output=True, text=True)
    summary = (res.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    out = {"summary": summary, **counts}
    if res.returncode not in (0, 5):
        out["log"] = res.stdout[-3000:]
        raise RuntimeError(json.dumps(out))
    return out


def _reference_attention(q, k, v, cu, window):
    """fp32 causal attention computed segment by segment (no mask tensor, no SDPA): the independent reference."""
    import torch

    b, s, h, d = q.shape
    rep = h // k.shape[2]
    q, k, v = (t.float().reshape(b * s, -1, d) for t in (q, k, v))
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for lo, hi in itertools.pairwise(bounds):
        qs, ks, vs = q[lo:hi], k[lo:hi].repeat_interleave(rep, 1), v[lo:hi].repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / d**0.5
        i = torch.arange(hi - lo, device=q.device)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= i[:, None] - i[None, :] < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    return out.view(b, s, h, d)


def part_attention(args) -> dict:
    """Each kernel this machine has (torch's varlen_attn, flash-attn when carried, SDPA with a mask), forward and
    backward (dq, dk, dv) in bf16 against the fp32 segment-by-segment reference: GQA, Spark's sliding window, MHA."""
    if not cuda():
        raise NotRun("no CUDA")
    import torch

    from fm.nn.attention import (
        attention,
        flash_attn_varlen_func,
        force_kernel,
        prepare_attention,
        torch_varlen_supports,
    )

    torch.manual_seed(0)
    results = {}
    cases = {"varlen_gqa": (None, 8, 2), "sliding_window_gqa": (64, 8, 2), "varlen_mha": (None, 4, 4)}
    for name, (window, heads, kv_heads) in cases.items():
        b, s, d = 2, 512, 64
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for h in (heads, kv_heads, kv_heads))
        cu = torch.tensor([0, 100, 300, 512, 700, 1024], dtype=torch.int32)  # rows of 512; segments inside
        g = torch.randn(b, s, heads, d, device="cuda")  # the gradient flowing into the output
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = _reference_attention(qf, kf, vf, cu.cuda(), window)
        (ref * g).sum().backward()
        ref = ref.detach()
        for kernel in ("sdpa", "varlen", "flash_attn"):
            if kernel == "varlen" and not torch_varlen_supports(window):
                results[f"{name}/varlen"] = f"not run: torch {torch.__version__} has no varlen_attn with a window"
                continue
            if kernel == "flash_attn" and flash_attn_varlen_func is None:
                results[f"{name}/flash_attn"] = "not run: flash_attn is not installed (no wheel for this torch)"
                continue
            longest = int((cu[1:] - cu[:-1]).max())  # a host number, as the loader gives it
            with force_kernel(kernel):
                mask, cu_dev, max_len = prepare_attention(b, s, cu, longest, window, device=q.device,
                                                          use_flash=kernel != "sdpa", dtype=q.dtype)
                out = attention(q, k, v, mask, cu_dev, max_len, window)
            grads = torch.autograd.grad((out.float() * g).sum(), (q, k, v))
            errs = {"out": (out.float() - ref).abs().max().item()}
            for label, got, want in zip(("dq", "dk", "dv"), grads, (qf.grad, kf.grad, vf.grad), strict=True):
                errs[label] = ((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
            results[f"{name}/{kernel}"] = {**{k: round(e, 5) for k, e in errs.items()},
                                           "ok": errs["out"] < 3e-2 and max(errs["dq"], errs["dk"], errs["dv"]) < 3e-2}
    bad = [k for k, r in results.items() if isinstance(r, dict) and not r["ok"]]
    if bad:
        raise RuntimeError(f"attention differs from the fp32 reference: {bad}: {results}")
    return results


def part_train_tiny(args) -> dict:
    if not cuda():
        raise NotRun("no CUDA")
    _need_bmtrain()
    sys.path.insert(0, str(ROOT))
    from tests.helpers import launch, make_run, stats

    tmp = Path(tempfile.mkdtemp(prefix="fm-gpu-tiny-"))
    losses, seconds = {}, {}
    for engine in ("bmtrain", "fsdp"):
        cfg = make_run(tmp / engine, repeat=True, engine=engine, train_iters=30, save_iters=30, grad_accum=2,
                       inspect_iters=10)
        t0 = time.perf_counter()
        # launch() sets PYTHONPATH to the checkout: keep the carried packages and the bmtrain build on it
        rc, out = launch(cfg, nproc=1, env={"PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))},
                         timeout=BUDGETS["train_tiny"])
        seconds[engine] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            raise RuntimeError(f"{engine} run failed: {out[-2500:]}")
        losses[engine] = [r["loss"] for _, r in sorted(stats(tmp / engine / "ckpt" / "run").items())]
    rel = [abs(a - b) / abs(b) for a, b in zip(losses["bmtrain"], losses["fsdp"], strict=True)]
    result = {"steps": len(rel), "seconds": seconds, "first_loss": losses["fsdp"][0], "last_loss": losses["fsdp"][-1],
              "last_loss_bmtrain": losses["bmtrain"][-1], "max_rel_loss_diff": round(max(rel), 5)}
    # bf16: the engines round differently (bmtrain keeps bf16 weights with an fp32 master in the optimizer,
    # fsdp fp32 weights with bf16 compute), so the losses agree loosely, not to fp32 precision.
    if max(rel) > 0.05 or not losses["fsdp"][-1] < losses["fsdp"][0]:
        raise RuntimeError(f"losses disagree or do not fall: {result}")
    return result


BENCH_VARIANTS = {"bmtrain": ("bmtrain", False), "fsdp": ("fsdp", False), "fsdp_compile": ("fsdp", True)}


def part_bench_2p4b(args) -> dict:
    if not cuda():
        raise NotRun("no CUDA")
    commands = {name: [sys.executable, __file__, "--bench-engine", engine, "--layers", str(args.layers),
                       *(["--bench-compile"] if compiled else [])]
                for name, (engine, compiled) in BENCH_VARIANTS.items()}
    share = BUDGETS["bench_2p4b"] * args.budget_scale / len(commands)
    return run_isolated(commands, share, Path(args.work, "part-bench_2p4b.partial.json"))


def run_isolated(commands: dict[str, list[str]], share: float, partial: Path) -> dict:
    """Each command in its own process with ``share`` seconds: one that hangs or times out loses only its own
    figures (the last JSON line it prints). What finished is written to ``partial`` at once, so a part killed at
    its budget keeps it. NCCL's warnings (stderr lines naming NCCL) are kept with each command's figures."""
    out: dict = {}
    for name, cmd in commands.items():
        try:
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=share)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            got = json.loads(line[-1]) if line else {"error": (res.stdout + res.stderr)[-1500:]}
            stderr = res.stderr
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            got = {"error": f"timeout after {share:.0f} s (its share of the part's budget)"}
        nccl = [ln.strip() for ln in stderr.splitlines() if "NCCL" in ln][-20:]
        out[name] = {**got, **({"nccl_warnings": nccl} if nccl else {})}
        partial.write_text(json.dumps(out, indent=1, default=str))
    return out


def bench_engine(engine: str, layers: int, compiled: bool = False, seq: int = 4096, steps: int = 8) -> dict:
    """tokens/s per GPU and MFU (the LM head counted) of the trainer's step on the 2.4B shape (``layers`` of its
    40), bf16, labelled with what ran: the engine, the attention kernel, compiled layers or not."""
    import torch

    sys.path.insert(0, str(ROOT))
    if engine == "bmtrain":
        _need_bmtrain()
    from bench.bench_trainer import synthetic_batch
    from fm.nn.attention import select_kernel
    from fm.train.config import load_config
    from fm.train.trainer import Trainer

    shape = json.loads((ROOT / "apps/fm9g_2b/model_configs/2.4b.json").read_text())
    shape["num_layers"] = layers
    tmp = Path(tempfile.mkdtemp(prefix="fm-gpu-bench-"))
    (tmp / "model.json").write_text(json.dumps(shape))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(29600 + (engine == "fsdp") + 2 * compiled))
    cfg = load_config(None, {"config": str(tmp / "model.json"), "engine": engine, "dtype": "bf16", "max_length": seq,
                             "batch_size": 1, "train_iters": 10**6, "inspect_iters": 0, "save": str(tmp / "ckpt"),
                             "tensorboard": "", "model_unique": "bench", "compile": compiled})
    tr = Trainer(cfg)
    tr.setup_engine()
    tr.build_model()
    batch = synthetic_batch(1, seq, shape["vocab_size"], 2)
    tr.loader = SimpleNamespace(task_names=batch["task_names"], state_dict=dict)
    tr.start(itertools.repeat(batch))  # the loop's own path: the next step's batch is taken during a step
    for _ in range(3):
        tr.train_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        s = tr.train_step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tps = seq / dt
    peak = tr.peak_flops
    mfu = tps * tr.flops_per_token / peak if peak else None
    kernel = select_kernel(torch.empty(1, device="cuda", dtype=torch.bfloat16))
    return {"engine": engine, "compile": compiled, "attention": kernel, "loss_chunk": cfg.engine.loss_chunk,
            "layers": layers, "seq": seq, "step_s": round(dt, 4), "tokens_per_s_per_gpu": round(tps),
            "mfu_with_head": round(mfu, 4) if mfu else None, "peak_tflops": peak / 1e12, "loss": s["loss"],
            "max_allocated_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 2),
            "flash_attn": _flash_state()}


def _flash_state() -> str:
    try:
        import flash_attn

        return flash_attn.__version__
    except ImportError:
        return "not installed"


def part_convert(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="fm-gpu-convert-"))
    res = subprocess.run([sys.executable, "bench/bench_convert.py", "--scaling", args.convert_workers, "--mb",
                          str(args.convert_mb), "--repeat", "3", "--dir", str(tmp), "--json", str(tmp / "s.json")],
                         cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-1500:])
    data = json.loads((tmp / "s.json").read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    return data


PARTS = {"env": part_env, "bmtrain": part_bmtrain, "tests": part_tests, "attention": part_attention,
         "train_tiny": part_train_tiny, "bench_2p4b": part_bench_2p4b, "convert": part_convert}


# ---------------------------------------------------------------------------------------- driver
def run_part(name: str, args) -> dict:
    """One part in a child process, killed at its budget."""
    out = Path(args.work) / f"part-{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--part", name, "--out", args.out, "--work", args.work, "--site", args.site,
           "--wheels", args.wheels,
           "--layers", str(args.layers), "--convert-mb", str(args.convert_mb), "--convert-workers",
           args.convert_workers]
    t0 = time.perf_counter()
    partial = Path(args.work) / f"part-{name}.partial.json"
    partial.unlink(missing_ok=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUDGETS[name] * args.budget_scale)
    except subprocess.TimeoutExpired:
        kept = json.loads(partial.read_text()) if partial.is_file() else {}
        return {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1),
                "reason": f"over its budget of {BUDGETS[name] * args.budget_scale:.0f} s", **kept}
    if out.is_file():
        result = json.loads(out.read_text())
    else:
        result = {"status": "failed", "reason": (proc.stdout + proc.stderr)[-2000:]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def child(name: str, args) -> None:
    try:
        result = {"status": "ok", **PARTS[name](args)}
    except NotRun as exc:
        result = {"status": "not run", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - every failure is reported in the results file
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[-3000:]}
    Path(args.work, f"part-{name}.json").write_text(json.dumps(result, indent=1, default=str))


def markdown(results: dict) -> str:
    lines = ["| part | status | seconds | result |", "|---|---|---|---|"]
    for name, r in results.items():
        detail = r.get("reason") or json.dumps({k: v for k, v in r.items() if k not in ("status", "seconds")},
                                                default=str)
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {detail[:400].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_results", help="gpu_results.json and .md go here (only these two files: "
                    "the device tool brings back at most 8)")
    ap.add_argument("--work", default=None, help="the parts' own result files (default: a temp folder)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--site", default="/tmp/fm-gpu-site", help="where carried packages and the bmtrain build go")
    ap.add_argument("--wheels", default=str(ROOT / ".gpu_wheels"))
    ap.add_argument("--layers", type=int, default=16, help="layers of the 2.4B shape in the benchmark (of 40)")
    ap.add_argument("--convert-mb", type=float, default=100)
    ap.add_argument("--convert-workers", default="1,2,4,8")
    ap.add_argument("--budget-scale", type=float, default=1.0)
    ap.add_argument("--patch-cmake", help="only patch this BMTrain source tree's CUDA architectures (--archs)")
    ap.add_argument("--archs", default="90")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--bench-engine", help=argparse.SUPPRESS)
    ap.add_argument("--bench-compile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.patch_cmake:
        patch_cmake(Path(args.patch_cmake), args.archs)
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.work = args.work or tempfile.mkdtemp(prefix="fm-gpu-parts-")
    if args.bench_engine:
        print(json.dumps(bench_engine(args.bench_engine, args.layers, args.bench_compile)))
        return 0
    if args.part:
        child(args.part, args)
        return 0
    results = {}
    for name in args.parts.split(","):
        results[name] = run_part(name, args)
        print(f"{name:12s} {results[name]['status']:8s} {results[name]['seconds']:7.1f} s", flush=True)
    (Path(args.out) / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))
    (Path(args.out) / "gpu_results.md").write_text(markdown(results))
    print(markdown(results))
    return 0 if all(r["status"] in ("ok", "not run") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

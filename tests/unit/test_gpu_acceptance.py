"""The GPU acceptance run's driver on a machine without CUDA: GPU parts say why they did not run, the rest
runs, and the results file has one entry per part (tests/gpu/run.sh is what a GPU machine runs)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_driver_reports_every_part(tmp_path):
    import torch

    if torch.cuda.is_available():  # the GPU parts would really run (minutes): that is run.sh's job
        return
    cmd = [sys.executable, str(ROOT / "tests/gpu/acceptance.py"), "--out", str(tmp_path), "--parts",
           "env,bmtrain,attention,train_tiny,bench_2p4b,convert", "--convert-mb", "1", "--convert-workers", "1,2"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    got = json.loads((tmp_path / "gpu_results.json").read_text())
    assert list(got) == ["env", "bmtrain", "attention", "train_tiny", "bench_2p4b", "convert"]
    assert got["env"]["status"] == "ok" and got["env"]["torch"] == torch.__version__ and got["env"]["gpu"] is None
    for part in ("bmtrain", "attention", "train_tiny", "bench_2p4b"):
        assert got[part] == {"status": "not run", "reason": "no CUDA", "seconds": got[part]["seconds"]}, got[part]
    rows = got["convert"]["rows"]
    assert got["convert"]["status"] == "ok" and [r["workers"] for r in rows] == [1, 2] and rows[0]["speedup"] == 1.0
    assert "| convert | ok |" in (tmp_path / "gpu_results.md").read_text()
    # the device tool brings back at most 8 files: the parts' own files stay out of OUT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_results.json", "gpu_results.md"]


def test_one_variant_timing_out_keeps_the_others_and_nccl_warnings(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    from acceptance import run_isolated

    py = sys.executable
    commands = {
        "fast": [py, "-c", "import sys; print('NCCL WARN Call to ibv_open_device failed', file=sys.stderr); "
                 "print('{\"tokens_per_s_per_gpu\": 5}')"],
        "hangs": [py, "-c", "import time; time.sleep(60)"],
        "after": [py, "-c", "print('{\"tokens_per_s_per_gpu\": 7}')"],
    }
    got = run_isolated(commands, 3, tmp_path / "partial.json")
    assert got["fast"] == {"tokens_per_s_per_gpu": 5, "nccl_warnings": ["NCCL WARN Call to ibv_open_device failed"]}
    assert got["hangs"]["error"].startswith("timeout after 3 s") and got["after"] == {"tokens_per_s_per_gpu": 7}
    assert json.loads((tmp_path / "partial.json").read_text()) == got


def test_bmtrain_is_built_for_the_gpu_at_hand(tmp_path):
    # BMTrain 1.0.1's CMakeLists.txt asks for sm_61..sm_86: CUDA 13 refuses sm_61..sm_72, and none is Hopper
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    from acceptance import patch_cmake

    (tmp_path / "CMakeLists.txt").write_text("\n".join([  # its lines that name architectures, verbatim
        'set(CMAKE_CUDA_ARCHITECTURES "61;62;70;72;75;80")',
        'set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} -gencode=arch=compute_61,code=sm_61 '
        '-gencode=arch=compute_62,code=sm_62 -gencode=arch=compute_70,code=sm_70 -gencode=arch=compute_72,code=sm_72 '
        '-gencode=arch=compute_75,code=sm_75 -gencode=arch=compute_80,code=sm_80")',
        '    set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} -gencode=arch=compute_86,code=sm_86")',
        'set_target_properties(C PROPERTIES CUDA_ARCHITECTURES "61;62;70;72;75;80")',
    ]))
    original = (tmp_path / "CMakeLists.txt").read_text()
    patch_cmake(tmp_path, "90")
    text = (tmp_path / "CMakeLists.txt").read_text()
    assert re.findall(r"compute_(\d+),code=sm_(\d+)", text) == [("90", "90")] * 2
    assert re.findall(r'ARCHITECTURES "([^"]*)"', text) == ["90", "90"]
    # the wheel tests/gpu/prepare.sh builds here: A100 and H100 in one
    (tmp_path / "CMakeLists.txt").write_text(original)
    patch_cmake(tmp_path, "80;90")
    text = (tmp_path / "CMakeLists.txt").read_text()
    assert re.findall(r"compute_(\d+),code=sm_(\d+)", text) == [("80", "80"), ("90", "90")] * 2
    assert re.findall(r'ARCHITECTURES "([^"]*)"', text) == ["80;90", "80;90"]

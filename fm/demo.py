"""``fm demo``: the whole workflow on a corpus built from Python's own documentation, on CPU, in a few minutes.

1. a ~2.4 MB English corpus from the standard library's docstrings (:mod:`fm.data.demo_corpus`; no download)
2. txt → jsonl → index, plus the shipped bilingual instruction set
3. mixture statistics for the two datasets (0.9 / 0.1 of the tokens)
4. the tiny dragonfly trained with ``--nproc`` processes (FSDP2 on gloo), tensorboard, checkpoints, loss curve
5. a sample generated from the last checkpoint, with the tokenizer the checkpoint carries

Everything it needs ships with the package (``fm/assets``); every output goes under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TRAIN_CONFIG = ASSETS / "train_configs" / "tiny.json"
DATASETS = {  # name: (token share, transform)
    "demo_corpus": (0.9, "script_cpmc.py"),
    "instructions": (0.1, "chat_template.py"),
}


def _step(text: str) -> None:
    print(f"== {text}", flush=True)


def build_data(out: Path) -> Path:
    """Steps 1-3; returns the mixture config."""
    from fm.data import convert, stats, txt2jsonl
    from fm.data.demo_corpus import main as corpus_main

    _step("1. demo corpus (Python standard library documentation)")
    corpus = out / "corpus.txt"
    if not corpus.is_file() or corpus.stat().st_size == 0:
        if corpus_main([str(corpus)]) != 0:
            raise SystemExit(1)
    _step("2. txt -> jsonl -> index")
    raw = out / "raw"
    (raw / "instructions").mkdir(parents=True, exist_ok=True)
    if txt2jsonl.main([str(corpus), "--doc-sep", "blank", "-o", str(raw / "demo_corpus" / "corpus.jsonl")]) != 0:
        raise SystemExit(1)
    shutil.copyfile(ASSETS / "demo" / "instructions.jsonl", raw / "instructions" / "instructions.jsonl")
    for name in DATASETS:
        rc = convert.main(["--path", str(raw / name), "--language", "en", "--output", str(out / "index" / name),
                           "--tokenizer", "demo", "--overwrite"])
        if rc != 0:
            raise SystemExit(rc)
    meta = json.loads((out / "index" / "demo_corpus" / "meta.json").read_text())
    print({k: meta[k] for k in ("nlines", "nbytes", "avg_token_per_line", "length_distribute")})
    mixture = out / "demo_mixture.json"
    mixture.write_text(json.dumps([
        {"task_name": name, "dataset_name": name, "abs_weight": share, "path": str(out / "index" / name),
         "transforms": str(ASSETS / "transforms" / transform), "allow_repeat": True}
        for name, (share, transform) in DATASETS.items()], indent=2) + "\n")
    _step(f"3. mixture loader statistics ({mixture})")
    stats.main(["--dataset-config", str(mixture), "--tokenizer", "demo", "--batch-size", "4", "--max-length", "512",
                "--rows", "400"])
    return mixture


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fm demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", default="fm_demo", help="directory for every output (default: ./fm_demo)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--train-iters", type=int, help="optimizer steps (default: the tiny config's 200)")
    p.add_argument("--skip-train", action="store_true", help="stop after the data steps (1-3)")
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    mixture = build_data(out)
    if args.skip_train:
        return 0
    from fm.launch import app_main

    tiny = json.loads(TRAIN_CONFIG.read_text())
    _step(f"4. train the tiny dragonfly: {args.nproc} processes, FSDP2 on gloo ({TRAIN_CONFIG.name})")
    run = out / "checkpoints" / tiny["run"]["name"]
    shutil.rmtree(run, ignore_errors=True)  # the demo starts fresh; your own runs resume from "latest"
    shutil.rmtree(out / "tensorboard" / tiny["run"]["name"], ignore_errors=True)
    overrides = ["--data.mixture", str(mixture), "--run.save_dir", str(out / "checkpoints"), "--run.tensorboard_dir",
                 str(out / "tensorboard"), "--checkpoint.resume.source", ""]
    if args.train_iters:
        overrides += ["--run.train_iters", str(args.train_iters), "--checkpoint.every", str(args.train_iters)]
    env = {**os.environ, "GPUS_PER_NODE": str(args.nproc), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rc = app_main(["-m", "fm.train"], str(TRAIN_CONFIG), ["--config", str(TRAIN_CONFIG), *overrides], prog="fm demo",
                  env=env, replace=False)
    if rc != 0:
        return rc
    _step("5. a generated sample from the last checkpoint (its own model config and tokenizer)")
    from fm.generate import main as generate_main

    rc = generate_main(["--checkpoint", str(run), "--prompt", "The module", "--max-new-tokens", "40", "--do-sample",
                        "--temperature", "0.8", "--top-k", "40", "--repetition-penalty", "1.2", "--seed", "1",
                        "--device", "cpu"])
    print(f"\ncheckpoints:  {run}/\ntensorboard:  tensorboard --logdir {out / 'tensorboard'}\n"
          f"loss curve:   {run / 'loss_curve.png'} (per-step stats: train_stats.jsonl beside it)")
    return rc


if __name__ == "__main__":
    sys.exit(main())

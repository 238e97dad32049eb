"""``fm merge``: average several checkpoints of one model into one (checkpoint averaging: Megatron's WSM, OLMo-core's
model merger).

Inputs, oldest first: ``--run DIR`` with ``--steps 1000,2000,3000`` or ``--last N`` (the newest N complete step
directories of the run, ascending), or paths in any form :func:`fm.checkpoint.open.open_checkpoint` opens (step
directories, ``.pt`` files, Hugging Face exports, LoRA adapters folded into their base), given oldest first.

Weights, normalised to sum to 1 (``w_i`` for the ``i``-th input, ``i = 0`` the oldest, ``n`` inputs):

* uniform (the default): ``w_i = 1 / n``;
* ``--weights a,b,c``: ``w_i = a_i / sum(a)`` (non-negative, one per input, at least one positive);
* ``--ema DECAY`` (``0 < DECAY <= 1``): ``w_i = DECAY**(n-1-i) / sum_j DECAY**(n-1-j)``: the newest weighs 1 before
  normalising, each older one DECAY times the one after it (``--ema 1`` is uniform).

Every floating-point tensor is ``sum_i w_i * float32(t_i)``, accumulated in fp32 whatever the inputs' dtype, then
written in the newest input's dtype for that tensor (bf16 inputs give bf16 out, rounded once) or ``--dtype``'s.
Tensors that are not floating point (none in fm's models) are the newest input's. The checkpoints are read one at a
time (memory-mapped where the file allows) into the one fp32 accumulator, so memory is the fp32 model plus one
input, whatever N; the accumulator is then converted to the output dtype tensor by tensor, each fp32 tensor freed
once converted (the fp32 model plus one tensor).

The inputs must have the same model config (every key; :func:`config_differences` names the keys that differ and
the files they come from; ``--config`` overrides them all) and the same tensor names and shapes.

Output: ``OUT.pt`` (the state dict), ``OUT.json`` (its model config), its tokenizer beside it
(``OUT.tokenizer.model`` or ``OUT.tokenizer/``, the newest input's or ``--tokenizer``'s) and ``OUT.merge.json`` (the
inputs, steps and weights), as ``fm import`` and ``fm lora merge`` write: every command that takes a checkpoint
opens ``OUT.pt``. Every file is written atomically, the ``.pt`` after its config and tokenizer and the provenance
``.merge.json`` last (it names what the ``.pt`` beside it holds); on a failure the files this call created are
removed, so nothing half-written is left.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fm.checkpoint.layout import CheckpointError, list_checkpoints
from fm.errors import FmError

log = logging.getLogger(__name__)


class MergeError(FmError, ValueError):
    """Checkpoints that cannot be averaged (another model config, other tensors), or bad weights or inputs."""


# ---------------------------------------------------------------------------------------------- weights
def merge_weights(n: int, *, weights: Sequence[float] | None = None, ema: float | None = None) -> list[float]:
    """The normalised weight of each of ``n`` inputs, oldest first (see the module docstring for the formulas)."""
    if n < 1:
        raise MergeError("nothing to merge: give at least one checkpoint")
    if weights is not None and ema is not None:
        raise MergeError("give --weights or --ema, not both")
    if weights is not None:
        w = [float(x) for x in weights]
        if len(w) != n:
            raise MergeError(f"--weights has {len(w)} value(s) for {n} checkpoint(s): give one per checkpoint")
        if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
            raise MergeError(f"--weights {','.join(map(str, w))}: must be finite, non-negative, at least one positive")
    elif ema is not None:
        if not 0 < ema <= 1:
            raise MergeError(f"--ema {ema}: the decay must be in (0, 1]")
        w = [ema ** (n - 1 - i) for i in range(n)]
    else:
        w = [1.0] * n
    total = sum(w)
    return [x / total for x in w]


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MergeError(f"{what} {text!r}: expected comma-separated numbers") from None


# ---------------------------------------------------------------------------------------------- inputs
def run_steps(run: str | Path, *, steps: Sequence[int] | None = None, last: int | None = None) -> list[Path]:
    """Step directories of run directory ``run`` (``<save>/<name>``), ascending: ``steps`` (each must be complete), or
    the newest ``last`` complete ones."""
    run = Path(run)
    if not run.is_dir():
        raise MergeError(f"--run {run}: not a directory")
    have = list_checkpoints(run)
    if (steps is None) == (last is None):
        raise MergeError("with --run give --steps S1,S2,... or --last N")
    if last is not None:
        if last < 1:
            raise MergeError(f"--last {last}: must be >= 1")
        if len(have) < last:
            raise MergeError(f"--run {run}: --last {last} but the run has {len(have)} complete checkpoint(s) {have}")
        return [run / str(s) for s in have[-last:]]
    missing = [s for s in steps if s not in have]
    if missing:
        raise MergeError(f"--run {run}: step(s) {missing} are not complete checkpoints there; complete: {have}")
    if len(set(steps)) != len(steps):
        raise MergeError(f"--steps {list(steps)}: a step is given twice")
    return [run / str(s) for s in sorted(steps)]


def config_differences(configs: Sequence[dict[str, Any]], sources: Sequence[str]) -> list[str]:
    """``key: value (first source) vs value (other source)`` for every model config key that differs from the
    first input's."""
    out = []
    for c, src in zip(configs[1:], sources[1:]):
        for k in sorted(set(configs[0]) | set(c)):
            a, b = configs[0].get(k, "<absent>"), c.get(k, "<absent>")
            if a != b:
                out.append(f"{k!r}: {a!r} ({sources[0]}) vs {b!r} ({src})")
    return out


# ---------------------------------------------------------------------------------------------- merging
@dataclass
class MergeResult:
    state: dict[str, torch.Tensor]
    weights: list[float]
    sources: list[str]
    steps: list[int | None]
    model_config: Any
    tokenizer: Path | None
    written: list[Path] = field(default_factory=list)


def merge_checkpoints(paths: Sequence[str | Path], output: str | Path | None = None, *,
                      weights: Sequence[float] | None = None, ema: float | None = None,
                      dtype: torch.dtype | None = None, model_config: str | Path | None = None,
                      tokenizer: str | Path | None = None) -> MergeResult:
    """Average the checkpoints ``paths`` (oldest first; any form :func:`open_checkpoint` opens) with
    :func:`merge_weights`; with ``output`` also write it (see the module docstring). Returns the merged state dict
    (the output dtype) and what went into it."""
    from fm.checkpoint.open import open_checkpoint
    from fm.models.config import config_to_dict

    if output is not None and Path(output).suffix != ".pt":
        raise MergeError(f"--output {output}: give a .pt file (its model config and tokenizer go beside it)")
    try:
        cks = [open_checkpoint(p, model_config=model_config, tokenizer=tokenizer) for p in paths]
    except FileNotFoundError as e:
        raise MergeError(str(e)) from None
    w = merge_weights(len(cks), weights=weights, ema=ema)
    configs = [config_to_dict(ck.model_config) for ck in cks]
    diffs = config_differences(configs, [ck.config_source for ck in cks])
    if diffs:
        raise MergeError(f"the checkpoints have different model configs: {'; '.join(diffs[:8])}"
                         f"{' …' if len(diffs) > 8 else ''}; only checkpoints of one model can be averaged "
                         "(--config MODEL overrides every input's config when they are the same model)")
    acc: dict[str, torch.Tensor] = {}
    out_dtypes: dict[str, torch.dtype] = {}
    keep: dict[str, torch.Tensor] = {}
    first_name = ""
    for i, (ck, wi) in enumerate(zip(cks, w)):
        name = str(ck.weights or ck.path)
        log.info("merging %s (weight %.6g)", ck.describe(), wi)
        sd = ck.state_dict(mmap=True)
        if i == 0:
            first_name = name
            for k, t in sd.items():
                if t.is_floating_point():
                    acc[k] = torch.zeros(t.shape, dtype=torch.float32)
                else:
                    keep[k] = t
        else:
            _check_same_tensors(acc, keep, sd, first_name, name)
        for k, t in sd.items():
            if t.is_floating_point():
                if wi:
                    acc[k].add_(t.to(torch.float32), alpha=wi)
                out_dtypes[k] = t.dtype  # the newest input's
            else:
                keep[k] = t.clone()
        del sd
    state = _to_output_dtypes(acc, {k: dtype or out_dtypes[k] for k in acc})
    state.update(keep)
    result = MergeResult(state=state, weights=w, sources=[str(ck.path) for ck in cks],
                         steps=[ck.step for ck in cks], model_config=cks[0].model_config,
                         tokenizer=cks[-1].tokenizer)
    if output is not None:
        result.written = write_merged(result, Path(output))
    return result


def _to_output_dtypes(acc: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The fp32 accumulator in the output dtypes, key by key, each fp32 tensor popped from ``acc`` (emptied) and
    freed once converted: the peak is the fp32 model plus one converted tensor, never both models whole."""
    state: dict[str, torch.Tensor] = {}
    for k in list(acc):
        v = acc.pop(k)
        state[k] = v if dtypes[k] == torch.float32 else v.to(dtypes[k])
        del v
    return state


def _check_same_tensors(acc: dict, keep: dict, sd: dict[str, torch.Tensor], first: str, this: str) -> None:
    have = set(acc) | set(keep)
    missing, extra = sorted(have - set(sd)), sorted(set(sd) - have)
    if missing or extra:
        raise MergeError(f"{this} has other tensors than {first}: missing {missing[:8]}, extra {extra[:8]}; only "
                         "checkpoints of one model can be averaged")
    for k, t in sd.items():
        ref = acc.get(k, keep.get(k))
        if tuple(t.shape) != tuple(ref.shape) or t.is_floating_point() != ref.is_floating_point():
            raise MergeError(f"tensor {k!r}: shape {tuple(t.shape)} {t.dtype} in {this}, {tuple(ref.shape)} "
                             f"{ref.dtype} in {first}; only checkpoints of one model can be averaged")


def write_merged(result: MergeResult, output: Path) -> list[Path]:
    """Write ``OUT.pt`` and what goes beside it, each atomically: its config and tokenizer, the ``.pt``, then its
    provenance ``OUT.merge.json`` last (an older one is removed before the ``.pt`` is replaced); on a failure remove
    what this call created (other files that were there before are replaced atomically or left as they were)."""
    from fm.checkpoint.open import tokenizer_beside, write_config_beside, write_tokenizer_beside
    from fm.io import atomic_torch_save, atomic_write_json

    output.parent.mkdir(parents=True, exist_ok=True)
    candidates = [output, output.with_suffix(".json"), output.with_suffix(".merge.json"), tokenizer_beside(output),
                  tokenizer_beside(output, "hf")]
    existed = {p for p in candidates if p.exists()}
    written: list[Path] = []
    try:
        written.append(write_config_beside(output, result.model_config))
        if result.tokenizer is not None:
            written.append(write_tokenizer_beside(output, result.tokenizer))
        # the provenance last, and an older one gone before the .pt changes: a .merge.json always describes the .pt
        # beside it (a crash in between leaves a .pt without one)
        output.with_suffix(".merge.json").unlink(missing_ok=True)
        atomic_torch_save({k: v.contiguous() for k, v in result.state.items()}, output)
        written.append(output)
        provenance = {"sources": result.sources, "steps": result.steps, "weights": result.weights,
                      "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in result.state.values()})}
        atomic_write_json(provenance, output.with_suffix(".merge.json"))
        written.append(output.with_suffix(".merge.json"))
    except BaseException:
        import shutil

        for p in candidates:
            if p not in existed and p.exists():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise
    return written


def merge_run_last(run_dir: str | Path, n: int, up_to: int | None = None) -> tuple[Path, list[int]] | None:
    """The trainer's ``checkpoint.merge_last_n``: the uniform average of the newest ``n`` complete checkpoints of
    ``run_dir`` at steps ``<= up_to`` (the step just saved: a run resumed from an earlier step may find steps of
    the abandoned branch above it, which are no part of this run) as ``<run_dir>/merged_last_<n>.pt`` (with its
    config, tokenizer and provenance beside it). Returns the file and the steps averaged; None while fewer than
    ``n`` such steps exist."""
    run_dir = Path(run_dir)
    steps = [s for s in list_checkpoints(run_dir) if up_to is None or s <= up_to]
    if len(steps) < n:
        return None
    out = run_dir / merged_last_name(n)
    merge_checkpoints([run_dir / str(s) for s in steps[-n:]], out)
    return out, steps[-n:]


def merged_last_name(n: int) -> str:
    return f"merged_last_{n}.pt"


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fm merge", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Average checkpoints of one model into one .pt (checkpoint averaging), with its model config "
                    "(OUT.json), tokenizer (OUT.tokenizer.model or OUT.tokenizer/) and provenance (OUT.merge.json) "
                    "beside it.",
        epilog="weights (i = 0 the oldest input, n inputs; normalised to sum to 1):\n"
               "  uniform (default)   w_i = 1/n\n"
               "  --weights a,b,c     w_i = a_i / sum(a)\n"
               "  --ema D             w_i = D**(n-1-i) / sum_j D**(n-1-j)   (the newest heaviest)\n"
               "Tensors are accumulated in fp32 and written in the inputs' dtype (the newest input's) unless --dtype.\n"
               "examples:\n"
               "  fm merge --run ckpt/run --last 3 --output avg.pt\n"
               "  fm merge --run ckpt/run --steps 1000,2000,3000 --ema 0.9 --output ema.pt\n"
               "  fm merge ckpt/run/1000 ckpt/run/2000 other.pt --weights 0.2,0.3,0.5 --output avg.pt")
    p.add_argument("paths", nargs="*", metavar="CHECKPOINT",
                   help="checkpoints to average, oldest first: step directories, .pt files, Hugging Face exports, "
                        "LoRA adapters (folded into their base)")
    p.add_argument("--run", metavar="DIR", help="a run directory <save>/<name>; pick its steps with --steps or --last")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--steps", metavar="S1,S2,...", help="with --run: these complete steps")
    pick.add_argument("--last", type=int, metavar="N", help="with --run: the newest N complete steps")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--weights", metavar="W1,W2,...", help="one weight per checkpoint, oldest first (normalised)")
    how.add_argument("--ema", type=float, metavar="DECAY",
                     help="exponential weights, the newest heaviest: w_i ∝ DECAY**(n-1-i), 0 < DECAY <= 1")
    p.add_argument("--output", "-o", required=True, metavar="OUT.pt", help="the merged state dict to write")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="write the weights in this dtype (default: the inputs')")
    p.add_argument("--config", metavar="MODEL",
                   help="model config JSON or shipped name for every input (default: each checkpoint's own, which "
                        "must agree)")
    p.add_argument("--tokenizer", help="tokenizer to put beside the output (default: the newest input's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fm.models.config import DTYPES

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.run:
        if args.paths:
            raise MergeError("give checkpoint paths or --run DIR, not both")
        steps = None
        if args.steps is not None:
            try:
                steps = [int(s) for s in args.steps.split(",") if s.strip()]
            except ValueError:
                raise MergeError(f"--steps {args.steps!r}: expected comma-separated step numbers") from None
        paths: list[Path | str] = list(run_steps(args.run, steps=steps, last=args.last))
    else:
        if args.steps is not None or args.last is not None:
            raise MergeError("--steps and --last pick the steps of a --run DIR")
        if not args.paths:
            raise MergeError("nothing to merge: give checkpoint paths, or --run DIR with --steps or --last")
        paths = list(args.paths)
    weights = parse_floats(args.weights, "--weights") if args.weights else None
    try:
        res = merge_checkpoints(paths, args.output, weights=weights, ema=args.ema,
                                dtype=DTYPES[args.dtype] if args.dtype else None, model_config=args.config,
                                tokenizer=args.tokenizer)
    except CheckpointError as e:
        raise MergeError(str(e)) from None
    except OSError as e:  # a full disk, a lost mount: one line naming the file; write_merged removed its files
        raise MergeError(f"{e.filename or args.output}: {e.strerror or e}; nothing was written") from None
    for src, wi in zip(res.sources, res.weights):
        log.info("  %.6f  %s", wi, src)
    log.info("wrote %s", ", ".join(map(str, res.written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

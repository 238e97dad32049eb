"""Open any checkpoint a user has: the one place a path becomes weights, a model config and a tokenizer.

Forms (:func:`open_checkpoint` tells them apart in this order):

* a ``.pt`` file: a full state dict (ours or upstream's; ``{"model": …}``/``{"state_dict": …}`` wrappers and a
  ``module.`` prefix are unwrapped);
* a step directory ``<save>/<model_unique>/<step>/`` holding ``fm9g_live_checkpoint-<step>.pt`` (ours, or
  upstream's without our manifest);
* a LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``: every step directory of a
  LoRA run is one). Its weights are the base model's (``base_model_name_or_path``, or ``base=``) with the adapter
  folded in;
* a Hugging Face export directory (``config.json`` + ``*.safetensors``/``pytorch_model*.bin``, what ``fm export``
  writes): a Llama, imported back to dragonfly's parameterisation;
* a run directory ``<save>/<model_unique>/``: its ``latest`` complete step directory (upstream runs without
  ``COMPLETE`` markers: the highest step directory holding a model, with a warning).

Its model config is ``model_config=`` when given (a JSON file or a shipped name), else the checkpoint's own:
``<name>.json`` beside a lone ``<name>.pt`` (what ``fm import`` and ``fm lora merge`` write), ``model_config.json``
(every checkpoint we write has one), else a ``config.json`` that is a model config, nests
one under ``model_config``/``model``, or is the train config whose ``config`` key names it. Its tokenizer is
``tokenizer=`` when given, else the one in it (every checkpoint we write has one): a SentencePiece
``tokenizer.model`` or a Hugging Face tokenizer directory ``tokenizer/``; a lone ``.pt``: ``<stem>.tokenizer.model``
or ``<stem>.tokenizer/`` beside it, else what its directory holds; a Hugging Face export: the directory itself when
it has a ``tokenizer.json`` (even beside a ``tokenizer.model``: Mistral, Llama-2), else its ``tokenizer.model``.
:attr:`Checkpoint.tokenizer` is the file or the directory.
Nothing here runs code from the files (:func:`fm.io.load_torch`).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fm.checkpoint.layout import (
    MODEL_RE,
    TOKENIZER_DIR,
    TOKENIZER_FILE,
    CheckpointFormError,
    models_in,
    resolve_checkpoint,
)
from fm.train.lora_adapter import ADAPTER_CONFIG, load_adapter, merge_state_dict

log = logging.getLogger(__name__)

NOT_MODELS = {"scheduler.pt"}  # .pt files of a step directory that hold no weights
KINDS = ("pt", "step", "lora", "hf")


@dataclass
class Checkpoint:
    """An opened checkpoint. ``kind``: one of :data:`KINDS`; ``path``: the step directory, ``.pt`` file,
    adapter directory or Hugging Face directory that holds it (a run directory resolves to its step)."""

    kind: str
    path: Path
    weights: Path | None = None  # the .pt file (pt, step)
    tokenizer: Path | None = None
    step: int | None = None
    base: Checkpoint | None = None  # lora: the dense weights the adapter applies to
    base_problem: str = ""  # lora: why the base could not be opened (raised only when the weights are needed)
    config_hint: str | None = None  # model_config= as given
    family: str | None = None
    _config: Any = field(default=None, repr=False)
    _config_source: str = ""

    # ------------------------------------------------------------------ model config
    @property
    def model_config(self) -> Any:
        """The typed model config (:class:`~fm.models.dragonfly.DragonflyConfig` / ``SparkConfig``)."""
        if self._config is None:
            self._config, self._config_source = self._find_config()
        return self._config

    @property
    def config_source(self) -> str:
        self.model_config  # noqa: B018 - resolves it
        return self._config_source

    def _find_config(self) -> tuple[Any, str]:
        from fm.models.registry import load_model_config

        if self.config_hint is not None:
            return load_model_config(self.config_hint, self.family), self.config_hint
        if self.kind == "hf":
            from fm.export.families import dragonfly_config_from_hf

            cfg_path = self.path / "config.json"
            return dragonfly_config_from_hf(_read_json(cfg_path), str(cfg_path)), str(cfg_path)
        home = self.path if self.path.is_dir() else self.path.parent
        found = None
        beside = self.path.with_suffix(".json")  # what fm import and fm lora merge write next to a .pt
        if self.kind == "pt" and beside.is_file() and _is_model_config(_read_json(beside)):
            found = load_model_config(beside, self.family), str(beside)
        found = found or _config_in(home, self.family)
        if found is None and self.base is not None:
            return self.base.model_config, self.base.config_source
        if found is None:
            raise CheckpointFormError(
                f"{self.path}: no model config in the checkpoint (model_config.json, or a config.json holding a model "
                "config or a train config with a 'config' key); give it with --config (a model config JSON or a "
                "shipped name such as 2.4b or spark/13b)")
        return found

    # ------------------------------------------------------------------ weights
    def state_dict(self, *, mmap: bool = True) -> dict[str, torch.Tensor]:
        """The dense weights in our key names (a LoRA adapter folded into its base)."""
        from fm.io import load_torch

        if self.kind == "hf":
            from fm.export.families import hf_to_dragonfly
            from fm.export.llama import load_hf_state_dict

            sources: dict[str, str] = {}
            state, _ = hf_to_dragonfly(load_hf_state_dict(self.path, sources), _read_json(self.path / "config.json"),
                                       where=str(self.path / "config.json"), sources=sources)
            return state
        if self.kind == "lora":
            adapter_cfg, adapter = load_adapter(self.path)
            return merge_state_dict(self.require_base().state_dict(mmap=mmap), adapter, adapter_cfg)
        return extract_state_dict(load_torch(self.weights, mmap=mmap), str(self.weights))

    def require_base(self) -> Checkpoint:
        if self.base is None:
            raise CheckpointFormError(self.base_problem or (
                f"{self.path} is a LoRA adapter without a base model it can find (adapter_config.json's "
                "base_model_name_or_path is empty or missing); give the base weights with --base"))
        return self.base

    def build_model(self, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    strict: bool = True) -> torch.nn.Module:
        """The model of :attr:`model_config` with these weights, in eval mode."""
        from fm.models.registry import build_model

        model = build_model(self.model_config, device=device, dtype=dtype)
        state = self.state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if strict and (missing or unexpected):
            raise CheckpointFormError(
                f"{self.weights or self.path} does not match its model config {self.config_source}: missing keys "
                f"{_few(missing)}, unexpected keys {_few(unexpected)}; give the right one with --config")
        return model.eval()

    def describe(self) -> str:
        what = {"pt": "state dict", "step": "checkpoint", "lora": "LoRA adapter", "hf": "Hugging Face export"}
        return f"{what[self.kind]} {self.path}" + (f" (step {self.step})" if self.step is not None else "")


def open_checkpoint(path: str | Path, *, model_config: str | Path | None = None, family: str | None = None,
                    tokenizer: str | Path | None = None, base: str | Path | None = None) -> Checkpoint:
    """Open ``path`` in any of the forms above (see the module docstring). Nothing is loaded yet."""
    given = Path(path)
    if not given.exists():
        raise FileNotFoundError(f"checkpoint not found: {given}")
    ck = _classify(given)
    ck.config_hint = str(model_config) if model_config is not None else None
    ck.family = family
    if ck.kind == "lora":
        try:
            ck.base = _open_base(ck.path, base, family)
        except (CheckpointFormError, FileNotFoundError) as e:
            if base is not None:
                raise
            ck.base_problem = str(e)  # the adapter alone is still usable (its config, a Hugging Face conversion)
    elif base is not None:
        raise CheckpointFormError(f"--base applies to a LoRA adapter; {ck.describe()} is not one")
    if tokenizer is not None:
        from fm.tokenizer import resolve_tokenizer

        ck.tokenizer = Path(resolve_tokenizer(tokenizer))
    else:
        ck.tokenizer = _tokenizer_in(ck)
    return ck


# ---------------------------------------------------------------------- forms
def _classify(p: Path) -> Checkpoint:
    if p.is_file():
        if p.suffix not in (".pt", ".pth", ".bin"):
            raise CheckpointFormError(f"{p}: not a checkpoint file (a .pt state dict); {_FORMS}")
        m = MODEL_RE.match(p.name)
        return Checkpoint("pt", p, weights=p, step=int(m.group(1)) if m else None)
    models = models_in(p)
    if models:
        step, file = models[-1]
        return Checkpoint("step", p, weights=file, step=step)
    if (p / ADAPTER_CONFIG).is_file():
        return Checkpoint("lora", p, step=int(p.name) if p.name.isdigit() else None)
    if _is_hf_dir(p):
        return Checkpoint("hf", p)
    step_dir = _step_dir_of_run(p)
    if step_dir is not None:
        return _classify(step_dir)
    others = [f for f in sorted(p.glob("*.pt")) if f.name not in NOT_MODELS]
    if len(others) == 1:  # an upstream-style folder with one weights file under another name
        return Checkpoint("pt", others[0], weights=others[0])
    raise CheckpointFormError(f"{p}: not a checkpoint; {_FORMS}")


_FORMS = ("accepted: a .pt state dict; a step directory with fm9g_live_checkpoint-<step>.pt; a LoRA adapter "
          "directory (adapter_config.json); a Hugging Face export (config.json + *.safetensors); a run directory "
          "<save>/<model_unique>/ with step directories")


def _is_hf_dir(d: Path) -> bool:
    weights = any(d.glob("*.safetensors")) or any(d.glob("pytorch_model*.bin"))
    return weights and (d / "config.json").is_file() and not (d / ADAPTER_CONFIG).is_file()


def _holds_model(d: Path) -> bool:
    return bool(models_in(d)) or (d / ADAPTER_CONFIG).is_file()


def _step_dir_of_run(run: Path) -> Path | None:
    step = resolve_checkpoint(run, "latest")
    if step is not None:
        return Path(step)
    steps = sorted((int(d.name), d) for d in run.iterdir() if d.is_dir() and d.name.isdigit() and _holds_model(d))
    marked = [s for s in steps if (s[1] / ".complete").is_file()]  # the older marker some tools write
    steps = marked or steps
    if not steps:
        return None
    log.warning("%s: no complete checkpoint (no COMPLETE marker: an upstream run or an interrupted save?); "
                "using the highest step directory%s, %s", run, " with a .complete marker" if marked else "",
                steps[-1][1].name)
    return steps[-1][1]


def _open_base(adapter_dir: Path, base: str | Path | None, family: str | None) -> Checkpoint | None:
    if base is None:
        recorded = _read_json(adapter_dir / ADAPTER_CONFIG).get("base_model_name_or_path") or ""
        if not recorded:
            return None
        base = Path(recorded)
        if not base.is_absolute() and not base.exists():
            base = adapter_dir / recorded
        if not Path(base).exists():
            raise CheckpointFormError(
                f"{adapter_dir}: its base model {recorded!r} (adapter_config.json base_model_name_or_path) is not "
                "here; give the base weights with --base")
    opened = open_checkpoint(base, family=family)
    if opened.kind == "lora":
        raise CheckpointFormError(f"--base {base}: a LoRA adapter cannot be the base of another; give dense weights")
    return opened


def tokenizer_beside(weights: str | Path, kind: str = "sentencepiece") -> Path:
    """The tokenizer of a lone ``.pt`` (fm lora merge writes it): ``<weights stem>.tokenizer.model`` (a SentencePiece
    model), or with ``kind="hf"`` the directory ``<weights stem>.tokenizer/`` (a Hugging Face tokenizer's files)."""
    weights = Path(weights)
    return weights.with_name(weights.stem + (".tokenizer" if kind == "hf" else ".tokenizer.model"))


def write_tokenizer_beside(weights: str | Path, tokenizer: str | Path) -> Path:
    """Copy ``tokenizer`` (a SentencePiece model, or a Hugging Face tokenizer file or directory) beside the lone
    ``.pt`` ``weights`` (:func:`tokenizer_beside`), atomically, and remove a tokenizer of the other kind left there
    (``<stem>.tokenizer.model`` is looked for first: a stale one would win). Returns where it went."""
    from fm.io import atomic_write_bytes
    from fm.tokenizer import copy_tokenizer_files, resolve_tokenizer, tokenizer_kind

    path = resolve_tokenizer(tokenizer)
    if tokenizer_kind(path) == "hf":
        dst, other = tokenizer_beside(weights, "hf"), tokenizer_beside(weights)
        copy_tokenizer_files(path, dst)
        other.unlink(missing_ok=True)
    else:
        dst, other = tokenizer_beside(weights), tokenizer_beside(weights, "hf")
        atomic_write_bytes(Path(path).read_bytes(), dst)
        if other.is_dir():
            shutil.rmtree(other)
    return dst


def _hf_tokenizer_dir(d: Path) -> bool:
    return (d / "tokenizer.json").is_file()


def _tokenizer_in(ck: Checkpoint) -> Path | None:
    if ck.path.is_file():
        if tokenizer_beside(ck.path).is_file():
            return tokenizer_beside(ck.path)
        if _hf_tokenizer_dir(tokenizer_beside(ck.path, "hf")):
            return tokenizer_beside(ck.path, "hf")
    homes = [ck.path] if ck.path.is_dir() else [ck.path.parent]
    if ck.base is not None:
        homes.append(ck.base.path if ck.base.path.is_dir() else ck.base.path.parent)
    for home in homes:
        if (home / TOKENIZER_FILE).is_file() and not _hf_tokenizer_dir(home):
            return home / TOKENIZER_FILE
        if _hf_tokenizer_dir(home / TOKENIZER_DIR):
            return home / TOKENIZER_DIR
        # a Hugging Face export (or import source) ships its tokenizer as it is: its tokenizer.json wins over a
        # tokenizer.model beside it (Mistral, Llama-2), as resolve_tokenizer(directory) decides
        if _hf_tokenizer_dir(home):
            return home
    return None


# ---------------------------------------------------------------------- model configs beside weights
def _is_model_config(d: Any) -> bool:
    return isinstance(d, dict) and "dim_model" in d and "num_layers" in d


def _config_in(home: Path, family: str | None) -> tuple[Any, str] | None:
    from fm.models.registry import load_model_config

    for name in ("model_config.json", "config.json"):
        p = home / name
        if not p.is_file():
            continue
        data = _read_json(p)
        if _is_model_config(data):
            return load_model_config(p, family), str(p)
        for key in ("model_config", "model"):
            if isinstance(data, dict) and _is_model_config(data.get(key)):
                return load_model_config(data[key], family), f"{p}:{key}"
        named = _model_config_named_by(data)
        if named:  # the train config the trainer saved (fm's sections, or upstream's flat keys)
            for cand in (home / named, Path(named)):
                if cand.is_file():
                    return load_model_config(cand, family), f"{p}:config={named}"
            return load_model_config(named, family), f"{p}:config={named}"
    return None


def _model_config_named_by(train_config: Any) -> str | None:
    if not isinstance(train_config, dict):
        return None
    model = train_config.get("model")
    named = model.get("config") if isinstance(model, dict) else train_config.get("config")
    return named if isinstance(named, str) and named else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointFormError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded ``.pt`` (bare, or under ``model``/``state_dict``/``module``)."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), dict):
                return extract_state_dict(obj[key], source)
    raise CheckpointFormError(f"{source}: not a state dict (expected a dict of parameter name -> tensor, possibly "
                              "under 'model' or 'state_dict')")


def write_config_beside(weights: str | Path, config: Any) -> Path:
    """``<weights stem>.json``: the model config of a lone ``.pt``, where :func:`open_checkpoint` looks first."""
    from fm.io import atomic_write_json
    from fm.models.config import config_to_dict

    out = Path(weights).with_suffix(".json")
    atomic_write_json(config_to_dict(config), out)
    return out


def _few(names: list[str], n: int = 8) -> str:
    return f"{names[:n]}{'…' if len(names) > n else ''}"

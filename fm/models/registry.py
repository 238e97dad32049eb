"""Model families: config loading by path or name, building, muP parameter classification."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fm.models.config import ModelConfigError, config_from_dict, read_json
from fm.models.dragonfly import Dragonfly, DragonflyConfig
from fm.models.spark import Spark, SparkConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "assets" / "models"  # package data: <family>/<name>.json


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type
    app_dir: str  # apps/<app_dir>/ in a checkout (its model_configs/ links to this family's shipped configs)


FAMILIES: dict[str, Family] = {
    "dragonfly": Family("dragonfly", DragonflyConfig, Dragonfly, "fm9g_2b"),
    "spark": Family("spark", SparkConfig, Spark, "spark_13b"),
}


def families() -> dict[str, Family]:
    return dict(FAMILIES)


def _family(name: str, source: str = "") -> Family:
    fams = FAMILIES
    if name not in fams:
        where = f"{source}: " if source else ""
        raise ModelConfigError(f"{where}unknown model family {name!r}; use one of {', '.join(fams)}")
    return fams[name]


def shipped_configs() -> dict[str, list[Path]]:
    """``{family: [the shipped <family>/*.json, …]}`` (package data: they install with fm)."""
    return {name: sorted((CONFIG_DIR / name).glob("*.json")) for name in FAMILIES}


def resolve_model_config(path_or_name: str | Path, family: str | None = None) -> tuple[Path, str | None]:
    """The one place a model config name becomes a file: ``(path, family or None)``.

    ``path_or_name``: a JSON file; or a shipped config, ``<name>`` or ``<family>/<name>`` (``2.4b``, ``tiny``,
    ``spark/13b``; the app names ``fm9g_2b/…`` and ``spark_13b/…`` work too). An unqualified name is looked up
    in ``family`` if given, else in dragonfly first (upstream FM9G's configs), then the other families."""
    path = Path(path_or_name)
    if path.is_file():
        return path, family
    name = str(path_or_name).removesuffix(".json")
    fams = FAMILIES
    order = [family] if family else list(fams)
    if "/" in name:
        prefix, name = name.split("/", 1)
        order = [f for f, fam in fams.items() if prefix in (f, fam.app_dir)]
    for fam_name in order:
        if fam_name in fams and (CONFIG_DIR / fam_name / f"{name}.json").is_file():
            return CONFIG_DIR / fam_name / f"{name}.json", fam_name
    known = sorted(f"{fam}/{p.stem}" for fam, paths in shipped_configs().items() for p in paths)
    raise ModelConfigError(f"model config {str(path_or_name)!r}: no such file and no shipped config of that name; "
                           f"known: {', '.join(known)}")


def load_model_config(path_or_name: str | Path | dict[str, Any], family: str | None = None) -> Any:
    """Load a typed config (:class:`DragonflyConfig` / :class:`SparkConfig`).

    ``path_or_name``: a JSON file, a shipped config name (see :func:`resolve_model_config`), or a dict. The
    family comes from ``family``, else the file's ``model_family`` key, else the shipped family the name
    resolved to, else ``dragonfly``.
    """
    if isinstance(path_or_name, dict):
        data, source, guessed = dict(path_or_name), "<dict>", None
    else:
        path, guessed = resolve_model_config(path_or_name, family)
        data, source = read_json(path), str(path)
        if guessed is None and path.resolve().parent.parent == CONFIG_DIR:
            guessed = path.resolve().parent.name
    name = family or (data.get("model_family") if isinstance(data, dict) else None) or guessed or "dragonfly"
    fam = _family(name, source)
    if family is not None and isinstance(data, dict) and data.get("model_family", family) != family:
        raise ModelConfigError(f"{source}: model_family is {data['model_family']!r} but family={family!r} was asked")
    return config_from_dict(fam.config_cls, data, source)


def family_of(config: Any) -> Family:
    for fam in FAMILIES.values():
        if isinstance(config, fam.config_cls):
            return fam
    raise TypeError(f"not a model config: {type(config).__name__}")


def build_model(config: Any, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Build the model of ``config``'s family. ``device="meta"``: no memory; materialise later with
    ``model.to_empty(device=...)`` + ``model.init_weights()`` (or layer by layer). ``dtype`` None:
    the config's dtype (``dtype`` / ``half_type`` keys)."""
    return family_of(config).model_cls(config, device=device, dtype=dtype)


def mup_scaled_param_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the hidden matrices whose lr is lr/scale_width.

    These are the weight matrices of the linear layers inside ``encoder.layers`` (attention and FFN
    projections); not the embedding, the output head, norms or biases, nor LoRA adapters. Empty
    when muP is off (``scale_width == 1``).
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "scale_width", 1.0) == 1.0:
        return set()
    names = set()
    param_names = {id(p): n for n, p in model.named_parameters()}
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "lora" in mod_name.lower():
            continue
        if ".layers." not in f".{mod_name}":
            continue
        name = param_names.get(id(module.weight))
        if name is not None:
            names.add(name)
    return names

"""muP parameter groups for AdamW (betas 0.9/0.95), as upstream FM9G/MiniCPM built them.

Two groups: hidden matrices named by ``fm.models.registry.mup_scaled_param_names`` get
``lr_scale = 1/scale_width`` (lr / 9 for the 2.4B model); everything else (embedding, norms, any
bias) keeps the base lr. Weight decay: upstream passed one ``weight_decay`` to the whole optimizer, so
norms and the (tied) embedding are decayed too; we keep that by default for parity
(``decay_norms_and_embeddings=False`` gives the common "no decay on norms/biases/embeddings" rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn


def _canonical(name: str) -> str:
    # Wrappers (FSDP's checkpoint wrapper, torch.compile) insert prefixes; compare on the model's own names.
    for junk in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.", "module."):
        name = name.replace(junk, "")
    return name


def mup_param_groups(model: nn.Module, *, weight_decay: float, scale_width: float | None = None,
                     decay_norms_and_embeddings: bool = True, scaled_names: set[str] | None = None,
                     shapes: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """Param groups for ``Engine.build_optimizer``. ``scaled_names`` defaults to the registry's answer for
    ``model`` (pass it explicitly when ``model`` is a sharded wrapper whose names gained prefixes).

    ``shapes``: the full shape of each parameter by name (``Engine.param_shapes``). Pass it for a sharded
    model: a shard's own shape says nothing (BMTrain keeps every shard as a flat 1-D slice)."""
    if scale_width is None:
        scale_width = float(getattr(getattr(model, "config", None), "scale_width", 1.0) or 1.0)
    if scaled_names is None:
        from fm.models.registry import mup_scaled_param_names  # here: the models import the layers (heavy)

        scaled_names = set(mup_scaled_param_names(model))
    scaled_names = {_canonical(n) for n in scaled_names}
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        cname = _canonical(name)
        scale = 1.0 / scale_width if cname in scaled_names else 1.0
        ndim = len(shapes[name]) if shapes is not None and name in shapes else p.dim()
        is_vector_or_emb = ndim < 2 or "embedding" in cname or "lm_head" in cname
        wd = weight_decay if (decay_norms_and_embeddings or not is_vector_or_emb) else 0.0
        groups.setdefault((scale, wd), []).append(p)
    return [{"params": ps, "lr_scale": s, "weight_decay": wd}
            for (s, wd), ps in sorted(groups.items(), key=lambda kv: -kv[0][0])]

"""BMTrain 1.0.1 on the CPU: BMTrain's own Python code, with only its CUDA-bound parts substituted.

Test support, not part of the ``fm`` package (the wheel does not ship it). The ``bmtrain`` engine runs
on CUDA GPUs. So that every line of it can be tested on machines without one, :func:`install` makes
``import bmtrain`` load the installed BMTrain 1.0.1 with these changes and no others (what is
substituted, and why the rest is the real code: ``docs/engines.md``):

* ``bmtrain.nccl``: the same 14 NCCL wrappers, carried by gloo (:mod:`.nccl`); collectives whose
  ranks disagree on count or dtype raise instead of hanging;
* ``bmtrain.optim._function`` and ``bmtrain.loss._function``: the Adam, cross-entropy, overflow-check
  and cast kernels as torch ops with the kernels' math (:mod:`.optim_function`, :mod:`.loss_function`);
* ``bmtrain.C``: a module that raises on any use (every call into it has a substitute above);
* in every other module, at import time and without touching the installed files, the syntax nodes
  that name the GPU: ``torch.cuda`` → :mod:`.cuda` (no-op streams and events, CPU storages and
  RNG), ``device="cuda"`` → ``"cpu"``, ``x.cuda()`` → a fresh copy (as a host-to-device copy is),
  ``x.is_cuda`` → "on the CPU", ``x.record_stream(s)`` → nothing, ``pin_memory`` → plain memory, and
  ``fork_rng(devices=[gpu])`` → the CPU generator only.

Only BMTrain 1.0.1 with the exact sources pinned in ``SOURCE_SHA256`` is accepted. Call :func:`install`
before anything imports ``bmtrain``: a test's own process or spawned worker calls it first, and a
process that torchrun starts runs its script through ``tests/support/worker.py --bmtrain-cpu`` (what
``tests.helpers.launch(..., bmtrain_cpu=True)`` does). Without a GPU the engine
(:class:`fm.distributed.bmtrain.BMTrainEngine`) runs on the CPU only when ``bmtrain`` was loaded by
this backend (its modules carry ``__fm_cpu_backend__``).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from tests.support.bmtrain_cpu import cuda as fake_cuda

BMTRAIN_VERSION = "1.0.1"
HERE = Path(__file__).resolve().parent

# Modules written here instead of rewritten (module name -> file in this package).
REPLACED = {"bmtrain.nccl": "nccl.py", "bmtrain.optim._function": "optim_function.py",
            "bmtrain.loss._function": "loss_function.py"}

SOURCE_SHA256 = {
    "__init__.py": "5f877ab6d5df748029949ea0a2cdc1657b9c826fb0b651eea4fe0721562a5c6c",
    "benchmark/__init__.py": "87d25fc42e51f43e593c4ce269f99fb75636b1aa32292543cb6dfa2b887a97b6",
    "benchmark/all_gather.py": "16e1504d12951666d9f710c5b8ea0b4fecdc66553059b81f3d2abd4219addc18",
    "benchmark/reduce_scatter.py": "38d435edd55cea09e0b6cddb9b28d9e7c152920c5c63b76089c0ae63e347c054",
    "benchmark/send_recv.py": "778d49e8b5a1f678b714034169abda3a5822421af94525cd72f25a6d889a4af1",
    "benchmark/shape.py": "f81c71d3d4b7f2539abe8811becac864bf5bab0c6e5850037504b81b95ce783e",
    "benchmark/utils.py": "6ca402f7e26b5fb5a4f4292d6033bea44a279d4c79e5c547f92d09f09f910b78",
    "block_layer.py": "58176dff7c602b5097b171b846862ee0c1f9e7a20d499830fccea93b93ddced1",
    "debug.py": "0de194d33dc90a63285e147b4bd6a158e7a7538d869e40c55ef5757f7b25e14e",
    "distributed/__init__.py": "8657affa079bc79acd72ad74cf7761bfde5b0f33e1bfa2064e0d6f1f2cdb85bd",
    "distributed/ops.py": "a96dcf3fb3300864b20a063ebb890638ca1c837671f069729b9252a29cbae865",
    "global_var.py": "a71fb2baf6d7fcf949fd0cff6e366f201d4c392de042107403481c32bd1a6108",
    "hook_func.py": "175fee75169f755f23eddb0807e3db49755710fbbbdf6c9b6ab3b568748f3f0a",
    "init.py": "9719f31a9543b0e16355af5de700130891c4dfdc21c54ae8eb69121532f5e1ae",
    "inspect/__init__.py": "babcf5924126372042cc6574ade8af66bde90add1bcbc9bfab60a162ba55a4c3",
    "inspect/format.py": "a0d37a35d0d781971505082cf3ccad256cab12977bdca9c68b1f4316cafaf8f2",
    "inspect/model.py": "31d779b5ac77af5aee8f6c0c57c579878b5d00b30342349adafad5352e7c4442",
    "inspect/tensor.py": "428436688de512c7816229cc3ccb201c2263df31e2651c35227072e0bd8535e4",
    "layer.py": "395def07fc49d953ed08e5cdec63cd1f92ea89009ecad518e4ff674373b8ec94",
    "loss/__init__.py": "9c8189e0159180af7eb1ac062885b6f67c132343e22fe884d493550a64e19961",
    "loss/_function.py": "37acc7979e33aeed7e895d7e2a30b00c48af53388a3b3029d3168eb1ed7147bb",
    "loss/cross_entropy.py": "af84732a2288690c54591fc368cab68d11b7839eba23e86a8ed6b984bc89f578",
    "lr_scheduler/__init__.py": "04fe9088ba53826ac0bfa166b92da369badce6e7ab32bcb65d1580f59c7e2541",
    "lr_scheduler/cosine.py": "03d13cc70e219d394e13f9302c29c5e61f0fb7c1d7a2316fea86ad0404963a02",
    "lr_scheduler/exponential.py": "02f141eb7d4af203440dc46bca6766ed301f4d3636625509bc7972a9de75c4ee",
    "lr_scheduler/linear.py": "c1687ed05e4e5164f6931bc333637bc70389ef97ce0a241cdbf6240a4afcc47a",
    "lr_scheduler/no_decay.py": "7c4359a1f0f781707f16f0a9b6ca7314813e9467e50c6c8698adbfd262581dd6",
    "lr_scheduler/noam.py": "b63019527b7ada7b4cac8acf34d22e8d50416ae024c0499e2f253304079f56a0",
    "lr_scheduler/warmup.py": "6dfc6807bcb6b61db4c2734ee3650e41af9d6fc58bbda222290ae32533403697",
    "nccl/__init__.py": "079844a94de208439b492a15a0798ef06dd9057c0cc12e18703fb0ee407bf758",
    "nccl/enums.py": "ceafb69ffdcc4fda7796fcde71ca064f6f959892e384c4930f7c81944f03e646",
    "nn/__init__.py": "6121c019713f59830334b09d9e9032a88a0fa24b463edbe83e981f636fa49353",
    "nn/column_parallel_linear.py": "e3130c206a5dd7a25ab45a03da8284bb3e18eddd8f81827884e347ac7e1b67ff",
    "nn/linear.py": "8a0ce3d5d32aa7b3944a35b85306233955d2991b9f28f237987114c0f603ed85",
    "nn/parallel_embedding.py": "6700356ae2bd293a11e77f7950d4f6f7a16ed43ef8682991f37d2d2f5de71046",
    "nn/parallel_linear_func.py": "7937f3c29bb4bb51064715c7554e39d1658e193bc2616f2ef36499882773a2f5",
    "nn/row_parallel_linear.py": "23162234e0af292a20b92dfcbfc3b4432403c727a17039e00696c52508290d8d",
    "optim/__init__.py": "02a0ad827ecdd969165743f1b70410796c6eff24a79f9ab2dca5671f132c1f7f",
    "optim/_distributed.py": "981a4d558761b57e504ca79a505563a4a577924c77aef626f2feff40cbc261f7",
    "optim/_function.py": "f27280521fe64c138aba692941e55a426b0bee9308ec687091e90d78007e6775",
    "optim/adam.py": "888de989a7e4f42ec501d23bcd1749170f012f6abe6274d1a14c9c23ea9b8435",
    "optim/adam_offload.py": "e16090f0da6e6edc9cdb9e05320d87419e98fce698b08aeb3bb8bb960b02f174",
    "optim/optim_manager.py": "331b406beac8633ed1067d8b93e3b69bd02b3c589d938e3fb9f4e0eac0e69cf5",
    "param_init.py": "b90bcc4f46ca8ddbebb445653dc301cc8a1fc69d3b5ce53a15393943652ebcd0",
    "parameter.py": "1edb7a4e84c13c0cb9d234aef5a1b6fb1b808bff56ffcce63306320e929c8fb9",
    "pipe_layer.py": "eac5006d084bc56e0301030e39fbd993c917e8c452de61b7686003d34db812b7",
    "store.py": "a1cf3a319070042fd0cdb8ccc12db8bf4fc19a86502b516fc5605a8a356c3a63",
    "synchronize.py": "d62462a71f305afa72cb13e73eb21cc7eb7d572421a90b1f1fcc45f29ab13673",
    "utils.py": "2e53aaab57cbc577f117838bf224dbeabdd544a09edf086e02aa22549673f8ed",
    "wrapper.py": "94b04370b9d2898685a3bcf9afe425bbcef893ed462e88d664ca4be0a10589e7",
    "zero_context.py": "9cafd4006d0a39f6dd480505493f5f17dd3454e997ede8191d2077dd8ed3cb70",
}


class BackendError(RuntimeError):
    """The CPU backend cannot run: wrong BMTrain version or sources, or BMTrain already imported."""


# ---------------------------------------------------------------------------------------- the shim
def _on_device(x: Any) -> bool:
    return x.device.type == "cpu"


def _record_stream(x: Any, stream: Any) -> None:
    del x, stream  # CPU work is complete when issued: nothing to keep alive for another stream


def _pin_memory(x: torch.Tensor) -> torch.Tensor:
    return x.clone()  # pin_memory() returns a copy; page-locking needs an accelerator


def _to_device(x: torch.Tensor) -> torch.Tensor:
    # BMTrain calls .cuda() on host tensors (loaded weights, pickled bytes) and relies on getting a fresh
    # allocation, e.g. reading the result's storage from offset 0; x.cpu() on the CPU would return x itself.
    return x.clone()


SHIM = types.SimpleNamespace(cuda=fake_cuda, on_device=_on_device, to_device=_to_device,
                             record_stream=_record_stream, pin_memory=_pin_memory)
SHIM_NAME = "_fm_cpu"


def _shim(attr: str, node: ast.AST) -> ast.Attribute:
    return ast.copy_location(ast.Attribute(value=ast.Name(id=SHIM_NAME, ctx=ast.Load()), attr=attr,
                                           ctx=ast.Load()), node)


class CudaToCpu(ast.NodeTransformer):
    """Rewrites the syntax nodes of a BMTrain module that name the GPU; ``counts`` says how many of each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        if node.attr == "cuda" and isinstance(node.value, ast.Name) and node.value.id == "torch":
            self.counts["torch.cuda"] += 1
            return _shim("cuda", node)
        if node.attr == "is_cuda" and isinstance(node.ctx, ast.Load):
            self.counts[".is_cuda"] += 1
            return ast.copy_location(ast.Call(func=_shim("on_device", node), args=[node.value], keywords=[]), node)
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        for kw in node.keywords:
            if kw.arg == "device" and isinstance(kw.value, ast.Constant) and kw.value.value == "cuda":
                self.counts['device="cuda"'] += 1
                kw.value = ast.copy_location(ast.Constant("cpu"), kw.value)
            elif kw.arg == "pin_memory":
                self.counts["pin_memory="] += 1
                kw.value = ast.copy_location(ast.Constant(False), kw.value)
        func = node.func
        if not isinstance(func, ast.Attribute):
            return node
        if func.attr == "fork_rng":
            for kw in node.keywords:
                if kw.arg == "devices":
                    self.counts["fork_rng(devices=)"] += 1
                    kw.value = ast.copy_location(ast.List(elts=[], ctx=ast.Load()), kw.value)
            return node
        methods = {"cuda": "to_device", "pin_memory": "pin_memory", "record_stream": "record_stream"}
        if func.attr in methods and not (func.attr == "cuda" and (node.args or node.keywords)):
            self.counts[f".{func.attr}()"] += 1
            return ast.copy_location(ast.Call(func=_shim(methods[func.attr], node), args=[func.value, *node.args],
                                              keywords=node.keywords), node)
        return node


def rewrite(source: str, filename: str) -> tuple[types.CodeType, Counter[str]]:
    """Compiled code of a BMTrain module with its GPU nodes rewritten (line numbers kept), and the counts."""
    tree = ast.parse(source, filename)
    t = CudaToCpu()
    tree = ast.fix_missing_locations(t.visit(tree))
    return compile(tree, filename, "exec"), t.counts


# ---------------------------------------------------------------------------------------- import hook
class _NoCudaExtension(types.ModuleType):
    """``bmtrain.C`` on the CPU backend: every call has a substitute, so any use is a bug to report."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"bmtrain.C.{name} was called: BMTrain's CUDA extension has no substitute on the CPU "
                           "backend (tests/support/bmtrain_cpu); add one next to the kernels it ports")


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _NoCudaExtension(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__fm_cpu_backend__ = True  # type: ignore[attr-defined]


class _Loader(importlib.abc.Loader):
    def __init__(self, path: Path, replacement: Path | None) -> None:
        self.path, self.replacement = path, replacement

    def exec_module(self, module: types.ModuleType) -> None:
        if self.replacement is not None:
            code = compile(self.replacement.read_text(encoding="utf-8"), str(self.replacement), "exec")
        else:
            code, counts = rewrite(_verified_source(self.path), str(self.path))
            REWRITES[module.__name__] = counts
        module.__dict__[SHIM_NAME] = SHIM
        module.__dict__["__fm_cpu_backend__"] = True
        exec(code, module.__dict__)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        del path, target
        if fullname != "bmtrain" and not fullname.startswith("bmtrain."):
            return None
        if fullname == "bmtrain.C":
            return importlib.machinery.ModuleSpec(fullname, _StubLoader())
        parts = fullname.split(".")[1:]
        pkg_dir = self.root.joinpath(*parts)
        if (pkg_dir / "__init__.py").is_file():
            file, search = pkg_dir / "__init__.py", [str(pkg_dir)]
        else:
            file, search = self.root.joinpath(*parts[:-1], parts[-1] + ".py") if parts else pkg_dir, None
            if not file.is_file():
                return None
        replacement = HERE / REPLACED[fullname] if fullname in REPLACED else None
        return importlib.util.spec_from_file_location(fullname, file, loader=_Loader(file, replacement),
                                                      submodule_search_locations=search)


REWRITES: dict[str, Counter[str]] = {}  # module -> substitutions made when it was imported


def _root() -> Path:
    spec = importlib.util.find_spec("bmtrain")
    if spec is None or spec.origin is None:
        raise BackendError("bmtrain is not installed: pip install bmtrain==1.0.1 (requirements.txt pins it)")
    return Path(spec.origin).resolve().parent


def _verified_source(path: Path) -> str:
    data = path.read_bytes()
    rel = path.relative_to(_root()).as_posix()
    want = SOURCE_SHA256.get(rel)
    if want is None or hashlib.sha256(data).hexdigest() != want:
        raise BackendError(f"{path}: not the BMTrain {BMTRAIN_VERSION} source this backend was written against "
                           "(sha256 differs); reinstall with pip install --force-reinstall bmtrain==1.0.1")
    return data.decode("utf-8")


def installed() -> bool:
    return any(isinstance(f, _Finder) for f in sys.meta_path)


def install() -> None:
    """Make ``import bmtrain`` load BMTrain 1.0.1 on the CPU backend (idempotent).

    Raises :class:`BackendError` for another BMTrain version or changed sources, and when the real
    ``bmtrain`` was imported already in this process."""
    if installed():
        return
    loaded = sys.modules.get("bmtrain")
    if loaded is not None and not getattr(loaded, "__fm_cpu_backend__", False):
        raise BackendError("bmtrain was imported before tests.support.bmtrain_cpu.install(): install the CPU "
                           "backend first, before the process imports bmtrain")
    try:
        version = importlib.metadata.version("bmtrain")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version != BMTRAIN_VERSION:
        raise BackendError(f"the BMTrain CPU backend runs BMTrain {BMTRAIN_VERSION} only; found "
                           f"{version or 'no bmtrain'}: pip install bmtrain=={BMTRAIN_VERSION}")
    root = _root()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    unknown = [f for f in files if f not in SOURCE_SHA256]
    if unknown or len(files) != len(SOURCE_SHA256):
        raise BackendError(f"{root}: files differ from BMTrain {BMTRAIN_VERSION} (unexpected {unknown[:5]}, "
                           f"{len(files)} .py files, expected {len(SOURCE_SHA256)}); "
                           f"reinstall bmtrain=={BMTRAIN_VERSION}")
    for rel in files:
        _verified_source(root / rel)
    sys.meta_path.insert(0, _Finder(root))

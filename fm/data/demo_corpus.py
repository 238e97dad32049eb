"""Build the demo pretraining corpus from text that ships with Python itself (no download).

The corpus is the documentation of the standard library: module, class and function docstrings
plus the language-reference topics in ``pydoc_data``. It is real English prose with code, a few
MB in size, and the same on every machine with the same Python version.

Usage: python -m fm.data.demo_corpus OUT.txt [--min-mb 2] (``fm demo`` runs it)
Paragraphs are separated by blank lines, so ``convert_txt2jsonl.py --doc-sep blank`` makes one
document per paragraph group (``fm txt2jsonl --doc-sep blank``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import pkgutil
import sys
import warnings

# Modules whose import has side effects (GUI, test suites, interpreter exit) are skipped.
_SKIP_PREFIXES = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3",
                  "ensurepip", "venv", "__main__", "__phello__", "pydoc_data", "_test", "xxlimited", "msvc",
                  "winreg", "winsound", "_winapi", "nt")


def _docstrings(module) -> list[str]:
    docs = []
    if module.__doc__:
        docs.append(module.__doc__)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) not in (module.__name__, None):
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            if isinstance(obj.__doc__, str):
                docs.append(obj.__doc__)
            if inspect.isclass(obj):
                for mname, member in sorted(vars(obj).items()):
                    doc = getattr(member, "__doc__", None)
                    if not mname.startswith("_") and inspect.isroutine(member) and isinstance(doc, str):
                        docs.append(doc)
    return docs


def _clean(doc: str) -> str:
    text = inspect.cleandoc(doc)
    # Collapse internal blank lines so one docstring stays one document.
    lines = [ln.rstrip() for ln in text.splitlines()]
    return "\n".join(ln for ln in lines if ln.strip())


def _comment_blocks(min_lines: int = 3):
    """Runs of full-line ``#`` comments in the standard library's own source: prose about code."""
    import pathlib
    import sysconfig

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "test" in rel or rel.startswith(("idlelib", "tkinter", "lib2to3")):
            continue
        block: list[str] = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines() + [""]:
            stripped = line.strip()
            if stripped.startswith("#") and not stripped.startswith("#!"):
                text = stripped.lstrip("#").strip()
                if text:
                    block.append(text)
                continue
            if len(block) >= min_lines:
                yield " ".join(block)
            block = []


def iter_documents():
    from pydoc_data import topics

    for key in sorted(topics.topics):
        yield _clean(topics.topics[key])
    stdlib = [m for m in pkgutil.iter_modules() if getattr(m.module_finder, "path", "").startswith(sys.base_prefix)
              and "site-packages" not in m.module_finder.path]
    names = sorted(m.name for m in stdlib)
    for m in stdlib:
        if m.ispkg and not m.name.startswith(_SKIP_PREFIXES):
            try:
                pkg = importlib.import_module(m.name)
                subs = pkgutil.walk_packages(pkg.__path__, m.name + ".", onerror=lambda _: None)
                names += sorted(s.name for s in subs
                                if ".test" not in s.name)
            except BaseException:  # noqa: BLE001
                continue
    names += sorted(sys.builtin_module_names)
    seen = set()
    for name in names:
        if name in seen or name.startswith(_SKIP_PREFIXES):
            continue
        seen.add(name)
        try:
            # Some modules print (or run self-tests) on import; keep our stdout clean.
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - any import failure just skips that module
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated aliases (typing.io, …) warn on access
            docs = _docstrings(module)
        for doc in docs:
            text = _clean(doc)
            if len(text) >= 40:
                yield text
    yield from _comment_blocks()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fm.data.demo_corpus", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="path of the .txt file to write")
    parser.add_argument("--min-mb", type=float, default=2.0, help="fail if the corpus is smaller")
    args = parser.parse_args(argv)
    seen = set()
    total = 0
    with open(args.output, "w", encoding="utf-8") as f:
        for doc in iter_documents():
            if doc in seen:
                continue
            seen.add(doc)
            f.write(doc + "\n\n")
            total += len(doc.encode("utf-8")) + 2
    mb = total / 1e6
    print(f"wrote {args.output}: {len(seen)} documents, {mb:.2f} MB", file=sys.stderr)
    if mb < args.min_mb:
        print(f"error: corpus is {mb:.2f} MB, less than --min-mb {args.min_mb}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

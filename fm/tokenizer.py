"""Tokenizers: one interface, two backends (SentencePiece ``.model``, Hugging Face ``tokenizers``).

:func:`load_tokenizer` (or ``Tokenizer(spec)``, which does the same) takes what :func:`resolve_tokenizer` accepts:

* a SentencePiece ``.model`` file → :class:`SentencePieceTokenizer` (``kind == "sentencepiece"``);
* a ``tokenizer.json`` file (the ``tokenizers`` library's format) → :class:`HFTokenizer` (``kind == "hf"``); when
  the file is named ``tokenizer.json`` the files of its directory (``tokenizer_config.json``, ...) belong to it;
* a Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``: BOS/EOS/pad/unk tokens, added
  tokens, ``chat_template``; maybe ``special_tokens_map.json``, ``chat_template.jinja``) → :class:`HFTokenizer`;
* a shipped name (``demo``: the demo SentencePiece model, 8,000 pieces).

Both backends offer the same attributes and methods (:class:`Tokenizer`): ``path``, ``kind``, ``vocab_size`` (what
the embedding needs: the highest id + 1, added tokens included), ``bos_id`` / ``unk_id`` (None when the tokenizer
has none: Qwen's have no BOS), ``eos_id``, ``pad_id`` (the EOS when there is no pad token), ``encode`` /
``encode_batch`` / ``encode_batch_arrays`` (raw text: no special tokens added; the packer adds BOS/EOS itself),
``add_bos`` (whether the tokenizer itself puts its BOS before text, as transformers' ``tokenizer(text)`` does:
SentencePiece always; a Hugging Face tokenizer when its post-processor adds it — Llama-3, Llama-2 — and not
GPT-2/NeoX style ``bos = eos = <|endoftext|>`` nor Qwen; plain text gets a BOS iff ``add_bos``, a chat template's
text only the BOS the template writes),
``decode``, ``piece_to_id`` (None when absent), ``id_to_piece``, ``is_byte``, ``chat_template`` (a Jinja string or
None), ``apply_chat_template`` and ``save``.

How a checkpoint carries a tokenizer (:mod:`fm.checkpoint.layout`): a SentencePiece model as the file
``tokenizer.model``, a Hugging Face tokenizer as the directory ``tokenizer/`` holding copies of its files
(:data:`HF_FILES`, those present; :func:`copy_tokenizer_files`), the model directory's ``generation_config.json``
among them: its ``eos_token_id`` stop ``fm generate`` too (:attr:`Tokenizer.stop_ids`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fm.errors import FmError

SHIPPED_TOKENIZERS = {"demo": os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer.model")}
DEFAULT_TOKENIZER = SHIPPED_TOKENIZERS["demo"]  # package data: the demo SentencePiece model (8,000 pieces)
KINDS = ("sentencepiece", "hf")
HF_JSON = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"  # a model directory's: its eos_token_id (int or list) stop generation
# The files of a Hugging Face tokenizer that fm reads and copies (checkpoints, fm import), those present.
HF_FILES = (HF_JSON, HF_CONFIG, "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", GENERATION_CONFIG)
ACCEPTED = ("a SentencePiece .model file, a tokenizer.json file, a Hugging Face tokenizer directory (tokenizer.json + "
            "tokenizer_config.json), or 'demo' for the shipped demo tokenizer")


class TokenizerError(FmError, ValueError):
    """A tokenizer file that cannot be read as either kind, or a token it lacks; the message names the path."""


# ----------------------------------------------------------------------------------------------- resolving
def resolve_tokenizer(path_or_name: str | os.PathLike) -> str:
    """A tokenizer file or directory, or the name of a shipped one (``demo``), as an absolute path.

    FileNotFoundError when nothing is there (or a directory holds no tokenizer); the message names the path and
    says what is accepted."""
    spec = os.fspath(path_or_name)
    if os.path.isfile(spec):
        return os.path.abspath(spec)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, HF_JSON)):
            return os.path.abspath(spec)
        if os.path.isfile(os.path.join(spec, "tokenizer.model")):  # a SentencePiece model in a directory
            return os.path.abspath(os.path.join(spec, "tokenizer.model"))
        if spec in SHIPPED_TOKENIZERS:  # `fm demo --out demo` makes a directory of that name: the name still wins
            return SHIPPED_TOKENIZERS[spec]
        raise FileNotFoundError(f"tokenizer directory {spec} holds no {HF_JSON} (nor tokenizer.model); give "
                                f"{ACCEPTED} (key data.tokenizer / option --tokenizer)")
    if spec in SHIPPED_TOKENIZERS:
        return SHIPPED_TOKENIZERS[spec]
    raise FileNotFoundError(f"tokenizer not found: {spec} (give {ACCEPTED}; key data.tokenizer / option --tokenizer)")


def tokenizer_kind(path: str | os.PathLike) -> str:
    """``"hf"`` for a directory or a JSON file, else ``"sentencepiece"`` (of a resolved path)."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".json":
        return "hf"
    try:
        with open(p, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return "sentencepiece"
    return "hf" if head.startswith(b"{") else "sentencepiece"


def load_tokenizer(spec: str | os.PathLike = DEFAULT_TOKENIZER, extra_special_tokens: Sequence[str] = ()) -> Tokenizer:
    """The tokenizer ``spec`` names (see :func:`resolve_tokenizer`), of the backend its kind needs.

    ``extra_special_tokens``: strings that must each encode as one id wherever they occur (they must already be
    tokens of the vocabulary: adding ids after training would change the embedding size silently)."""
    path = resolve_tokenizer(spec)
    cls = HFTokenizer if tokenizer_kind(path) == "hf" else SentencePieceTokenizer
    return cls(path, extra_special_tokens)


def hf_tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The files of the Hugging Face tokenizer at ``path`` (a directory, or a ``tokenizer.json`` file: then its
    directory's :data:`HF_FILES`; a JSON file of another name: itself)."""
    p = Path(path)
    if p.is_dir():
        home = p
    elif p.name == HF_JSON:
        home = p.parent
    else:
        return [p]
    return [home / name for name in HF_FILES if (home / name).is_file()]


def tokenizer_files(src: str | os.PathLike) -> list[tuple[Path, str]]:
    """``(file, name in a copy)`` of each file of the tokenizer ``src`` (anything :func:`resolve_tokenizer`
    accepts): a Hugging Face tokenizer's :data:`HF_FILES` that exist (a JSON file of another name becomes
    ``tokenizer.json``); a SentencePiece model as ``tokenizer.model``."""
    path = resolve_tokenizer(src)
    if tokenizer_kind(path) != "hf":
        return [(Path(path), "tokenizer.model")]
    return [(f, HF_JSON if f.name not in HF_FILES else f.name) for f in hf_tokenizer_files(path)]


@dataclass(frozen=True)
class TokenizerFiles:
    """The files of a tokenizer read into memory (a few MB): what a training run writes into every checkpoint, read
    once at its start (:func:`read_tokenizer_files`), so that a save never reads the tokenizer's source again (with
    ``data.tokenizer`` empty the source is the resume checkpoint, which ``keep_last_n`` may delete meanwhile).

    ``kind``: ``"sentencepiece"`` (one file, ``tokenizer.model``) or ``"hf"``; ``files``: ``(name in a copy,
    contents)``; ``source``: the path they were read from."""

    kind: str
    files: tuple[tuple[str, bytes], ...]
    source: str

    @property
    def checkpoint_name(self) -> str:
        """Its name in a checkpoint step directory: ``tokenizer.model`` or ``tokenizer`` (a directory)."""
        return "tokenizer" if self.kind == "hf" else "tokenizer.model"

    def write_into(self, directory: str | os.PathLike) -> list[str]:
        """Write the files into ``directory`` (created), each atomically and fsynced, then fsync the directory.
        Returns the names written."""
        from fm.io import atomic_write_bytes, fsync_dir

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self.files:
            atomic_write_bytes(data, d / name)
        fsync_dir(d)
        return [name for name, _ in self.files]


def read_tokenizer_files(src: str | os.PathLike | TokenizerFiles) -> TokenizerFiles:
    """The files of the tokenizer ``src`` (anything :func:`resolve_tokenizer` accepts; a :class:`TokenizerFiles` is
    returned as it is) read into memory, named as :func:`tokenizer_files` names them."""
    if isinstance(src, TokenizerFiles):
        return src
    path = resolve_tokenizer(src)
    return TokenizerFiles(tokenizer_kind(path), tuple((name, f.read_bytes()) for f, name in tokenizer_files(path)),
                          path)


def copy_tokenizer_files(src: str | os.PathLike | TokenizerFiles, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the files of the tokenizer ``src`` (anything :func:`resolve_tokenizer` accepts, or a
    :class:`TokenizerFiles`) into the directory ``dst_dir``, which is replaced as a whole (written beside it, every
    file and the directory fsynced, then renamed: readers never see half of it, a crash leaves the old one or the
    new one).

    A Hugging Face tokenizer: its :data:`HF_FILES` that exist (a JSON file of another name is copied as
    ``tokenizer.json``); a SentencePiece model: ``tokenizer.model``. Returns the names written."""
    from fm.io import fsync_dir

    snap = read_tokenizer_files(src)
    dst = Path(dst_dir)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".tmp-{dst.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        names = snap.write_into(tmp)
        old = None
        if dst.exists():
            old = dst.parent / f".tmp-old-{dst.name}-{secrets.token_hex(4)}"
            os.replace(dst, old)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


# ----------------------------------------------------------------------------------------------- the interface
class Tokenizer:
    """The interface both backends offer (see the module docstring). ``Tokenizer(spec)`` is :func:`load_tokenizer`:
    it returns the backend ``spec`` needs."""

    kind: str = ""
    path: str
    add_bos: bool = False
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    special_tokens: dict[str, int]
    chat_template: str | None = None

    def __new__(cls, path: str | os.PathLike = DEFAULT_TOKENIZER, extra_special_tokens: Sequence[str] = ()):
        if cls is Tokenizer:
            cls = HFTokenizer if tokenizer_kind(resolve_tokenizer(path)) == "hf" else SentencePieceTokenizer
        return object.__new__(cls)

    # -- what a backend implements
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, tid: int) -> str:
        """The token string of ``tid``; IndexError outside the vocabulary."""
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> int | None:
        """The id of the token string ``piece``; None when the vocabulary has no such token."""
        raise NotImplementedError

    def is_byte(self, tid: int) -> bool:
        """True for a byte-fallback token (``<0x0A>``): one byte of a character, not text by itself."""
        raise NotImplementedError

    def save(self, dst: str | os.PathLike) -> Path:
        """Copy the tokenizer's files to ``dst`` (SentencePiece: the file ``dst``; Hugging Face: the directory
        ``dst``, see :func:`copy_tokenizer_files`). Returns ``dst``."""
        raise NotImplementedError

    # -- common
    @property
    def checkpoint_name(self) -> str:
        """Its name in a checkpoint step directory: ``tokenizer.model`` or ``tokenizer`` (a directory)."""
        return "tokenizer" if self.kind == "hf" else "tokenizer.model"

    def __len__(self) -> int:
        return self.vocab_size

    def _setup_specials(self, extra_special_tokens: Sequence[str], native: set[str] = frozenset()) -> None:
        """``special_tokens``: ``extra_special_tokens`` → id; those the backend does not already split off (``native``)
        are split off before encoding."""
        self.special_tokens = {}
        for token in extra_special_tokens:
            tid = self.piece_to_id(token)
            if tid is None:
                raise TokenizerError(f"special token {token!r} is not in the tokenizer {self.path}; "
                                     "retrain it with the token as a user-defined symbol")
            self.special_tokens[token] = tid
        split = [t for t in self.special_tokens if t not in native]
        self._special_re = (re.compile("(" + "|".join(map(re.escape, sorted(split, key=len, reverse=True))) + ")")
                            if split else None)

    def _encode_with_specials(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._special_re.split(text):
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode(part))
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of raw text (no special tokens added); ``bos``: add the BOS as the tokenizer itself adds it to
        text (only when :attr:`add_bos`); ``eos``: add the EOS."""
        ids = self._encode(text) if self._special_re is None else self._encode_with_specials(text)
        head = [self.bos_id] if bos and self.add_bos else []
        return head + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text, in one backend call where it can."""
        if self._special_re is None:
            return self._encode_many(list(texts))
        return [self._encode_with_specials(t) for t in texts]

    def encode_batch_arrays(self, texts: Sequence[str], threads: int = 1) -> list[np.ndarray]:
        """:meth:`encode_batch` as int32 arrays (the training loader's hot path). ``threads``: 1 (the loader: its
        processes are the parallelism) encodes in the calling thread; more lets the backend use its threads."""
        return [np.asarray(ids, dtype=np.int32) for ids in self.encode_batch(texts)]

    def encode_split(self, texts: Sequence[str], splits: Sequence[int], threads: int = 1) -> list[tuple[np.ndarray,
                                                                                                      np.ndarray]]:
        """Each text encoded whole and cut where character ``splits[i]`` falls: ``(ids before, ids from there)``
        (a token that straddles the cut goes before it). Backends without offsets encode the two parts apart.
        ``threads`` as in :meth:`encode_batch_arrays`."""
        out = []
        for text, k in zip(texts, splits):
            a, b = self.encode_batch_arrays([text[:k], text[k:]], threads)
            out.append((a, b))
        return out

    @property
    def special_token_strings(self) -> dict[str, str]:
        """``bos_token``, ``eos_token``, ``pad_token``, ``unk_token`` as strings (those it has): what a chat
        template sees, as transformers passes them."""
        out = {}
        for name in ("bos", "eos", "unk", "pad"):
            tid = getattr(self, f"{name}_id")
            if tid is not None:
                try:
                    out[f"{name}_token"] = self.id_to_piece(tid)
                except IndexError:
                    pass
        return out

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a generation: the EOS, and (a Hugging Face tokenizer) the ``eos_token_id`` of the
        ``generation_config.json`` beside it (Llama-3 instruct: ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``)."""
        out = [self.eos_id] if self.eos_id is not None else []
        for tid in getattr(self, "generation_eos_ids", ()):
            if tid not in out:
                out.append(tid)
        return tuple(out)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            **kwargs: Any) -> str:
        """The text of a conversation rendered with :attr:`chat_template` (as transformers renders it; no
        tokenization: :meth:`encode` the result, which keeps the template's special tokens whole)."""
        if not self.chat_template:
            raise TokenizerError(f"the tokenizer {self.path} has no chat_template")
        from fm.chat import render_jinja

        return render_jinja(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                            **{**self.special_token_strings, **kwargs})


# ----------------------------------------------------------------------------------------------- SentencePiece
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model. ``extra_special_tokens`` already in the model (user-defined symbols) keep their ids
    and are split off before encoding."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike = DEFAULT_TOKENIZER, extra_special_tokens: Sequence[str] = ()):
        import sentencepiece as spm

        self.path = resolve_tokenizer(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path} is not a tokenizer: not a SentencePiece model ({e}) nor a "
                                 f"tokenizer.json; give {ACCEPTED}") from None

        def known(i: int) -> int | None:
            return i if i >= 0 else None

        self.bos_id, self.eos_id, self.unk_id = known(self.sp.bos_id()), known(self.sp.eos_id()), \
            known(self.sp.unk_id())
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id
        self.add_bos = self.bos_id is not None  # SentencePiece models are trained for text that starts with BOS
        self.chat_template = None
        self._setup_specials(extra_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)  # one SentencePiece call for the whole batch

    def encode_batch_arrays(self, texts: Sequence[str], threads: int = 1) -> list[np.ndarray]:
        """``threads``: SentencePiece threads for the call (1: the caller's processes are the parallelism)."""
        if self._special_re is not None:
            return [np.asarray(self._encode_with_specials(t), dtype=np.int32) for t in texts]
        if threads == 1:
            # SentencePiece's batch call hands the work to a thread even for one thread: a fixed cost per call
            # (hundreds of µs on a busy machine) that the loader's many small refills would pay each time.
            encode = self.sp.encode
            return [encode(t, return_type="numpy") for t in texts]
        return self.sp.encode(list(texts), return_type="numpy", num_threads=threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, tid: int) -> str:
        return self.sp.id_to_piece(tid)

    def piece_to_id(self, piece: str) -> int | None:
        tid = self.sp.piece_to_id(piece)
        if tid == self.unk_id and piece != self.sp.id_to_piece(tid):
            return None
        return tid

    def is_byte(self, tid: int) -> bool:
        return self.sp.is_byte(tid)

    def save(self, dst: str | os.PathLike) -> Path:
        from fm.io import atomic_write_bytes

        dst = Path(dst)
        atomic_write_bytes(Path(self.path).read_bytes(), dst)
        return dst


# ----------------------------------------------------------------------------------------------- Hugging Face
# Special tokens guessed for a bare tokenizer.json (no tokenizer_config.json), among its special added tokens.
_GUESS = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
    "unk": ("<unk>", "[UNK]"),
}
_BYTE_RE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def rayon_off() -> bool:
    """Whether ``TOKENIZERS_PARALLELISM`` turns the ``tokenizers`` library's thread pool off in this process (read
    as the library reads it, at every batch call)."""
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    return value is not None and value.lower() in ("", "off", "false", "f", "no", "n", "0")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict (``content``)."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``), with the special tokens, added tokens and chat
    template of its ``tokenizer_config.json`` (and ``special_tokens_map.json``, ``chat_template.jinja``). Encodes
    as ``AutoTokenizer.from_pretrained(dir)(text, add_special_tokens=False)`` does: added tokens in the text
    become their ids."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike, extra_special_tokens: Sequence[str] = ()):
        from tokenizers import Tokenizer as _Rust

        self.path = resolve_tokenizer(path)
        p = Path(self.path)
        self.files = hf_tokenizer_files(p)
        json_file = p / HF_JSON if p.is_dir() else p
        try:
            self.tk = _Rust.from_file(str(json_file))
        except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
            raise TokenizerError(f"{json_file} is not a tokenizer: not a Hugging Face tokenizer.json "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); give {ACCEPTED}") \
                from None
        names = {f.name: f for f in self.files}
        config = _read_json(names[HF_CONFIG]) if HF_CONFIG in names else {}
        stmap = _read_json(names["special_tokens_map.json"]) if "special_tokens_map.json" in names else {}
        if not isinstance(config, dict) or not isinstance(stmap, dict):
            raise TokenizerError(f"{p}: {HF_CONFIG} / special_tokens_map.json must hold a JSON object")
        self.config = config
        self._add_config_tokens(config.get("added_tokens_decoder") or {}, names.get(HF_CONFIG))
        added = self.tk.get_added_tokens_decoder()
        self.added_tokens = {t.content: i for i, t in added.items()}
        specials = {t.content for t in added.values() if t.special}
        ids = {}
        for name in ("bos", "eos", "pad", "unk"):
            key = f"{name}_token"
            token = _token_text(config.get(key)) if key in config else _token_text(stmap.get(key))
            if token is None and not config and not stmap:  # a bare tokenizer.json: the usual names
                token = next((t for t in _GUESS[name] if t in specials), None)
                if name == "unk" and token is None:
                    token = self._model_unk()
            if token is not None and self.tk.token_to_id(token) is None:
                raise TokenizerError(f"{p}: {key} {token!r} is not a token of {json_file}")
            ids[name] = self.tk.token_to_id(token) if token is not None else None
        self.bos_id, self.eos_id, self.unk_id = ids["bos"], ids["eos"], ids["unk"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
        # A BOS only where the tokenizer's own post-processor adds one to text, as transformers does (Llama-3,
        # Llama-2/MiniCPM: yes; GPT-2/NeoX with bos = eos = <|endoftext|>, Qwen: no)
        self.add_bos = self.bos_id is not None and self.tk.encode("a", add_special_tokens=True).ids[:1] == \
            [self.bos_id]
        self.chat_template = self._chat_template(config, names)
        self.generation_eos_ids = self._generation_eos(names.get(GENERATION_CONFIG))
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self._vocab_size = max(max(vocab.values(), default=-1) + 1, self.tk.get_vocab_size(with_added_tokens=True))
        self._setup_specials(extra_special_tokens, native=set(self.added_tokens))
        self._batch = getattr(self.tk, "encode_batch_fast", None) or self.tk.encode_batch

    def _add_config_tokens(self, decoder: Mapping[str, Any], where: Path | None) -> None:
        """Tokens of tokenizer_config.json's ``added_tokens_decoder`` that tokenizer.json lacks (transformers adds
        them too); each must land on the id the config gives it."""
        from tokenizers import AddedToken

        for sid, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = _token_text(spec)
            if content is None or self.tk.token_to_id(content) is not None:
                continue
            tok = AddedToken(content, single_word=bool(spec.get("single_word")), lstrip=bool(spec.get("lstrip")),
                             rstrip=bool(spec.get("rstrip")), normalized=bool(spec.get("normalized", False)),
                             special=bool(spec.get("special", True)))
            self.tk.add_special_tokens([tok]) if tok.special else self.tk.add_tokens([tok])
            got = self.tk.token_to_id(content)
            if got != int(sid):
                raise TokenizerError(f"{where}: added token {content!r} has id {sid} there but would get id {got} in "
                                     f"{HF_JSON}; put it into {HF_JSON}'s added_tokens")

    @staticmethod
    def _generation_eos(path: Path | None) -> tuple[int, ...]:
        """``eos_token_id`` of a ``generation_config.json`` (an int or a list; none: ``()``)."""
        if path is None:
            return ()
        cfg = _read_json(path)
        eos = cfg.get("eos_token_id") if isinstance(cfg, dict) else None
        ids = [] if eos is None else [eos] if not isinstance(eos, list) else eos
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise TokenizerError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
        return tuple(ids)

    def _model_unk(self) -> str | None:
        try:
            model = json.loads(self.tk.to_str()).get("model", {})
        except ValueError:
            return None
        if isinstance(model.get("unk_token"), str):
            return model["unk_token"]
        if isinstance(model.get("unk_id"), int):
            return self.tk.id_to_token(model["unk_id"])
        return None

    @staticmethod
    def _chat_template(config: Mapping[str, Any], names: Mapping[str, Path]) -> str | None:
        if "chat_template.jinja" in names:  # transformers' own file for it, which wins over the config's key
            return names["chat_template.jinja"].read_text(encoding="utf-8")
        tmpl = config.get("chat_template")
        if isinstance(tmpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, Mapping)}
            tmpl = named.get("default")
        return tmpl if isinstance(tmpl, str) and tmpl else None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["tk"] = self.tk.to_str()
        del state["_batch"]
        return state

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer as _Rust

        self.__dict__.update(state)
        self.tk = _Rust.from_str(state["tk"])
        self._batch = getattr(self.tk, "encode_batch_fast", None) or self.tk.encode_batch

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._batch(texts, add_special_tokens=False)]

    def _encodings(self, texts: Sequence[str], threads: int, offsets: bool = False) -> list:
        """The ``tokenizers`` encodings of ``texts``. ``threads`` 1: none of the library's threads — one batch call
        where its parallelism is off (``TOKENIZERS_PARALLELISM=false``: what fm's loader workers set), else one
        call per text (a batch call would run on the library's pool of every core, in each loader process).
        ``threads`` > 1: one batch call on the library's pool (its size: ``RAYON_NUM_THREADS``, else every
        core)."""
        if threads == 1 and not rayon_off():
            encode = self.tk.encode
            return [encode(t, add_special_tokens=False) for t in texts]
        batch = self.tk.encode_batch if offsets else self._batch
        return batch(list(texts), add_special_tokens=False)

    def encode_batch_arrays(self, texts: Sequence[str], threads: int = 1) -> list[np.ndarray]:
        """Int32 arrays of ``texts``; ``threads``: see :meth:`_encodings` (1: the calling thread only)."""
        if self._special_re is not None:
            return [np.asarray(self._encode_with_specials(t), dtype=np.int32) for t in texts]
        asarray, i32 = np.asarray, np.int32
        return [asarray(e.ids, dtype=i32) for e in self._encodings(texts, threads)]

    def encode_split(self, texts: Sequence[str], splits: Sequence[int], threads: int = 1) -> list[tuple[np.ndarray,
                                                                                                      np.ndarray]]:
        if self._special_re is not None:
            return super().encode_split(texts, splits, threads)
        out = []
        for enc, k in zip(self._encodings(texts, threads, offsets=True), splits):
            ids = np.asarray(enc.ids, dtype=np.int32)
            starts = np.fromiter((s for s, _ in enc.offsets), dtype=np.int64, count=len(enc.offsets))
            cut = int(np.count_nonzero(starts < k))
            out.append((ids[:cut], ids[cut:]))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, tid: int) -> str:
        token = self.tk.id_to_token(int(tid)) if tid >= 0 else None
        if token is None:
            raise IndexError(f"token id {tid} is not in the tokenizer {self.path} (vocab_size {self.vocab_size})")
        return token

    def piece_to_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)

    def is_byte(self, tid: int) -> bool:
        token = self.tk.id_to_token(int(tid))
        return token is not None and _BYTE_RE.fullmatch(token) is not None

    def save(self, dst: str | os.PathLike) -> Path:
        copy_tokenizer_files(self.path, dst)
        return Path(dst)

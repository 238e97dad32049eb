"""SentencePiece tokenizer wrapper: special-token ids, extra special tokens, batch encode."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

SHIPPED_TOKENIZERS = {"demo": os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer.model")}
DEFAULT_TOKENIZER = SHIPPED_TOKENIZERS["demo"]  # package data: the demo SentencePiece model (8,000 pieces)


def resolve_tokenizer(path_or_name: str | os.PathLike) -> str:
    """A tokenizer file, or the name of a shipped one (``demo``), as an absolute path; FileNotFoundError else."""
    spec = os.fspath(path_or_name)
    if os.path.isfile(spec):
        return os.path.abspath(spec)
    if spec in SHIPPED_TOKENIZERS:
        return SHIPPED_TOKENIZERS[spec]
    raise FileNotFoundError(f"tokenizer model not found: {spec} (give a SentencePiece .model file, or 'demo' for "
                            "the shipped demo tokenizer; key tokenizer_path / option --tokenizer)")


class Tokenizer:
    """A SentencePiece model with the ids training needs.

    ``extra_special_tokens`` are strings that must map to one id each. Tokens already in the model
    (user-defined symbols) keep their ids; unknown ones are an error, because adding ids after
    training would change the embedding size silently.
    """

    def __init__(self, path: str = DEFAULT_TOKENIZER, extra_special_tokens: Sequence[str] = ()):
        self.path = resolve_tokenizer(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id
        self.special_tokens: dict[str, int] = {}
        for token in extra_special_tokens:
            tid = self.sp.piece_to_id(token)
            if tid == self.unk_id and token != self.sp.id_to_piece(self.unk_id):
                raise ValueError(f"special token {token!r} is not in the tokenizer {path}; "
                                 "retrain it with the token as a user-defined symbol")
            self.special_tokens[token] = tid
        self._special_re = (re.compile("(" + "|".join(map(re.escape, self.special_tokens)) + ")")
                            if self.special_tokens else None)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text) if self._special_re is None else self._encode_with_specials(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """One SentencePiece call for the whole batch (faster than a loop of ``encode``)."""
        if self._special_re is None:
            return self.sp.encode(list(texts))
        return [self._encode_with_specials(t) for t in texts]

    def encode_batch_arrays(self, texts: Sequence[str], threads: int = 1) -> list[np.ndarray]:
        """:meth:`encode_batch` as int32 arrays: no Python int per token (the training loader's hot path).
        ``threads``: SentencePiece threads for the call (1: the caller's processes are the parallelism)."""
        if self._special_re is not None:
            return [np.asarray(self._encode_with_specials(t), dtype=np.int32) for t in texts]
        if threads == 1:
            # SentencePiece's batch call hands the work to a thread even for one thread: a fixed cost per call
            # (hundreds of µs on a busy machine) that the loader's many small refills would pay each time.
            encode = self.sp.encode
            return [encode(t, return_type="numpy") for t in texts]
        return self.sp.encode(list(texts), return_type="numpy", num_threads=threads)

    def _encode_with_specials(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._special_re.split(text):
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, tid: int) -> str:
        return self.sp.id_to_piece(tid)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def is_byte(self, tid: int) -> bool:
        return self.sp.is_byte(tid)

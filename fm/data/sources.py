"""Datasets as the loader reads them: one way to open either format, and records → token ids.

* :func:`fm.data.datasets.open_dataset` opens a dataset of either format.
* :class:`Source` turns line numbers of one dataset into ``(input ids, output ids)``: a jsonl record through the
  dataset's transform, its ``json_keys``, or (``messages_key``) a conversation rendered with the tokenizer's chat
  template (its ids exactly: the packer adds no BOS to them, :attr:`Source.bos_id`); a Megatron document as it is
  stored, without the BOS/EOS the packer adds (so a document made with ``--append-eod`` ends in exactly one EOS,
  like one made without).
* :func:`check_vocabulary` refuses token ids the model has no embedding for, naming the file and the id.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np

from fm.data.datasets import Dataset, json_keys, open_dataset
from fm.data.megatron import MegatronDataset
from fm.data.mixture import DatasetSpec, TransformError, _short, check_transformed, load_transform
from fm.data.order import stable_key

# Lines read and tokenized per dataset at a time (one tokenizer call): about REFILL_BYTES of text for a dataset
# with half of the mixture's weight or more, proportionally less for lighter ones but at least REFILL_MIN_BYTES,
# and at most REFILL_MAX lines. Large calls make tokenizing cheaper per token; scaling by weight keeps what a
# stream buffers for the many small datasets of a large mixture small (docs/benchmarks-loader.md).
REFILL_BYTES = 1 << 20
REFILL_MIN_BYTES = 16 << 10
REFILL_MAX = 1024

try:  # msgspec decodes faster than json (a dependency of the converter)
    import msgspec

    _decode = msgspec.json.Decoder().decode
except ImportError:  # pragma: no cover
    import json

    _decode = json.loads

def refill_lines(ds: Dataset, weight: float = 1.0) -> int:
    """Lines per refill for dataset ``ds`` with share ``weight`` of the mixture (see REFILL_BYTES)."""
    nlines = len(ds)
    if isinstance(ds, MegatronDataset):  # about 4 bytes of text per token once read
        nbytes = os.path.getsize(ds.bin_path) // ds.dtype.itemsize * 4
    else:
        nbytes = ds.nbytes
    if not nbytes or not nlines:
        return REFILL_MAX
    budget = max(REFILL_MIN_BYTES, REFILL_BYTES * min(1.0, 2.0 * weight))
    return int(max(1, min(REFILL_MAX, budget * nlines // nbytes)))


def check_vocabulary(spec: DatasetSpec, ds: Dataset, tokenizer, vocab_size: int | None) -> None:
    """Refuse a dataset whose token ids the model cannot embed (``vocab_size``: the model's, or the tokenizer's)."""
    limit = vocab_size or tokenizer.vocab_size
    if isinstance(ds, MegatronDataset):
        ds.check_ids(limit, where=f"task {spec.task_name!r}")
    elif vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"task {spec.task_name!r} ({ds.path}): the tokenizer {getattr(tokenizer, 'path', '')} has "
                         f"{tokenizer.vocab_size} pieces but the model's vocab_size is {vocab_size}: ids from "
                         f"{vocab_size} on have no embedding row; use the model's tokenizer or a model with "
                         "vocab_size >= the tokenizer's")


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS before text (fm.tokenizer's ``add_bos``; another tokenizer: it has one)."""
    add = getattr(tokenizer, "add_bos", None)
    return tokenizer.bos_id is not None if add is None else bool(add and tokenizer.bos_id is not None)


class _LazyRandom:
    """The ``r`` a transform gets: a ``random.Random`` seeded on first use (seeding per line would cost more
    than most transforms).

    It forwards every attribute to one shared ``random.Random``; most transforms never touch it.
    """

    __slots__ = ("_rng", "_seed", "_seeded")

    def __init__(self, rng: random.Random, seed: int):
        self._rng, self._seed, self._seeded = rng, seed, False

    def __getattr__(self, name: str) -> Any:
        if not self._seeded:
            self._rng.seed(self._seed)
            self._seeded = True
        return getattr(self._rng, name)


class Source:
    """Reads records of one dataset and turns them into token ids (input, output)."""

    def __init__(self, spec: DatasetSpec, tokenizer, seed: int, vocab_size: int | None = None):
        self.spec = spec
        self.tokenizer = tokenizer
        self.seed = seed
        self.rng = random.Random(0)
        self.ds = open_dataset(spec.path, spec.format)
        self.megatron = isinstance(self.ds, MegatronDataset)
        self.vocab_limit = vocab_size or tokenizer.vocab_size
        self.transform = load_transform(spec.transforms) if spec.transforms else None
        self.messages_key = getattr(spec, "messages_key", None)
        if self.messages_key is not None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"task {spec.task_name!r}: messages_key {self.messages_key!r} needs a tokenizer with a "
                             f"chat_template, and {getattr(tokenizer, 'path', 'the tokenizer')} has none (give a "
                             "Hugging Face tokenizer whose tokenizer_config.json carries one)")
        self.in_key, self.out_key = (None, "") if self.megatron or self.messages_key else \
            json_keys(spec.json_keys, self.ds)
        # The BOS the packer puts before each sample: the tokenizer's own (add_bos: SentencePiece, or a Hugging Face
        # tokenizer whose post-processor adds it) for text; none for a conversation, whose ids are exactly the chat
        # template's (a BOS only where the template writes one), as transformers' apply_chat_template and vLLM make
        # them. A function of the dataset alone: the same on resume.
        self.bos_id = tokenizer.bos_id if self.messages_key is None and _adds_bos(tokenizer) else None

    def __len__(self) -> int:
        return len(self.ds)

    def _records(self, lines: np.ndarray) -> list[dict]:
        out = []
        for line, raw in zip(lines.tolist(), self.ds.get_many(lines)):
            try:
                rec = _decode(raw)
            except Exception as e:
                raise ValueError(f"{self.ds.data_path}: line {line + 1} is not valid JSON ({e}); "
                                 "rebuild the index with fm convert") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{self.ds.data_path}: line {line + 1} is not a JSON object")
            out.append(rec)
        return out

    def tokenize(self, lines: np.ndarray, epochs: np.ndarray, roots: np.ndarray) -> list[tuple[Any, Any]]:
        if self.megatron:
            return [((), self._document(i)) for i in lines.tolist()]
        if self.messages_key is not None:
            return self._conversations(lines)
        inputs, outputs = [], []
        epoch_keys: dict[int, int] = {}
        records = self._records(lines)
        transform, rng = self.transform, self.rng  # locals: this loop runs once per line
        for line, epoch, root, record in zip(lines.tolist(), epochs.tolist(), roots.tolist(), records):
            if transform is None:
                inp, out = self._keyed(record, line)
            else:
                # The RNG is a function of (seed, task, line, epoch): no RNG state to save, same result on resume.
                if epoch not in epoch_keys:
                    epoch_keys[epoch] = stable_key(self.seed, self.spec.task_name, "rng", epoch)
                r = _LazyRandom(rng, epoch_keys[epoch] ^ ((line * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF))
                try:
                    result = transform(record, root, r)
                except Exception as e:
                    raise TransformError(f"task {self.spec.task_name!r}: transform {self.spec.transforms} raised "
                                         f"{type(e).__name__}: {e} on line {line + 1} of {self.ds.data_path} "
                                         f"{_short(record)}") from e
                if type(result) is dict and type(result.get("input")) is str and type(result.get("output")) is str:
                    inp, out = result["input"], result["output"]  # check_transformed's common case, inlined
                else:
                    inp, out = check_transformed(result, self.spec.task_name, record)
            inputs.append(inp)
            outputs.append(out)
        # int32 arrays where the tokenizer offers them (fm.tokenizer.Tokenizer): no Python int per token
        enc = getattr(self.tokenizer, "encode_batch_arrays", None) or self.tokenizer.encode_batch
        out_ids = enc(outputs)
        nonempty = [i for i, s in enumerate(inputs) if s]
        if not nonempty:
            return [((), ids) for ids in out_ids]
        in_ids: list = [()] * len(inputs)
        for i, ids in zip(nonempty, enc([inputs[i] for i in nonempty])):
            in_ids[i] = ids
        return list(zip(in_ids, out_ids))

    def _conversations(self, lines: np.ndarray) -> list[tuple[Any, Any]]:
        """Records holding a conversation under ``messages_key``: input = the chat template of all but the last
        message with the generation prompt, output = the rest of the template of the whole conversation. The
        whole text is encoded at once (special-token strings the template writes become their ids, a BOS the
        template writes included: the packer adds none to these) and cut where the input ends. The output is cut
        just before its last EOS when it holds one: the packer's final EOS label takes its place (ChatML with EOS
        ``<|im_end|>``: the answer trains ``…<|im_end|>``, the template's trailing newline is dropped). Rendered
        with ``strftime_now`` fixed at :data:`fm.chat.TRAINING_DATE` (the same text every day: exact resume)."""
        from fm.chat import training_strftime_now

        tok, key = self.tokenizer, self.messages_key
        texts, cuts = [], []
        for line, record in zip(lines.tolist(), self._records(lines)):
            where = f"{self.ds.data_path}: line {line + 1} (task {self.spec.task_name!r})"
            msgs = record.get(key)
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise ValueError(f"{where}: {key!r} must be a non-empty list of messages ({{\"role\": ..., "
                                 f"\"content\": ...}}), got {_short(msgs)}")
            if msgs[-1].get("role") != "assistant":
                raise ValueError(f"{where}: the last message must be the assistant's (the answer trained on), got "
                                 f"role {msgs[-1].get('role')!r}")
            try:
                prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True,
                                                 strftime_now=training_strftime_now)
                full = tok.apply_chat_template(msgs, strftime_now=training_strftime_now)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if not full.startswith(prompt):
                raise ValueError(f"{where}: the chat template renders the conversation without its last message "
                                 "(with the generation prompt) as something other than the start of the whole "
                                 "conversation; the prompt cannot be masked")
            texts.append(full)
            cuts.append(len(prompt))
        out = []
        eos = tok.eos_id
        for in_ids, out_ids in tok.encode_split(texts, cuts):
            at = np.flatnonzero(np.asarray(out_ids) == eos) if eos is not None else ()
            if len(at):
                out_ids = out_ids[:int(at[-1])]  # the packer's EOS label replaces the template's last EOS
            out.append((in_ids, out_ids))
        return out

    def _keyed(self, record: dict, line: int) -> tuple[str, str]:
        """(input, output) of a record read through the dataset's json_keys (a missing input is "")."""
        out = record.get(self.out_key)
        inp = record.get(self.in_key) if self.in_key is not None else None
        if isinstance(out, str) and (inp is None or isinstance(inp, str)):
            return inp or "", out
        if self.out_key not in record:
            raise ValueError(f"{self.ds.data_path}: line {line + 1} has no {self.out_key!r} key (its keys: "
                             f"{sorted(record)[:8]}); name the text's key with \"json_keys\" in the mixture entry "
                             f"of task {self.spec.task_name!r} (see docs/mixtures.md)")
        return check_transformed({"input": inp or "", "output": out}, self.spec.task_name, record)

    def _document(self, i: int) -> np.ndarray:
        """Document i without a leading BOS or trailing EOS (the packer adds one of each)."""
        ids = self.ds[i]
        if len(ids):
            top, low = int(ids.max()), int(ids.min())
            if top >= self.vocab_limit or low < 0:
                bad = top if top >= self.vocab_limit else low
                raise ValueError(f"{self.ds.bin_path}: document {i} holds token id {bad}, outside the model's "
                                 f"vocabulary [0, {self.vocab_limit}) (task {self.spec.task_name!r}): the data was "
                                 "tokenized with another tokenizer; tokenize it again with the model's")
            tok = self.tokenizer
            a = int(self.bos_id is not None and ids[0] == self.bos_id)  # the packer adds it again
            b = len(ids) - int(ids[-1] == tok.eos_id)
            ids = ids[a:max(a, b)]
        return ids

"""Retrain the demo SentencePiece tokenizer shipped as ``quick_start/tokenizer.model``.

The shipped model keeps tests and the demo deterministic; run this only to change it:

    python quick_start/build_demo_corpus.py /tmp/corpus.txt
    python quick_start/train_tokenizer.py /tmp/corpus.txt quick_start/data/instructions.jsonl \
        --output quick_start/tokenizer

Ids: <unk> 0, <s> 1, </s> 2, <pad> 3, then the chat markers of both model families
(<用户> <AI> for FM9G, <User> <Bot> <end> <ret> for Spark). Byte fallback is on, so any
UTF-8 text round-trips.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

INSTRUCTION_REPEAT = 20
SPECIAL_TOKENS = ["<用户>", "<AI>", "<User>", "<Bot>", "<end>", "<ret>"]


def _sentences(paths: list[str]):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if path.endswith(".jsonl"):
                    record = json.loads(line)
                    # The instruction file is tiny next to the corpus; repeat it so its Chinese
                    # characters get their own pieces instead of byte fallback.
                    for key in ("input", "output"):
                        for s in record[key].splitlines():
                            if s.strip():
                                yield from [s] * INSTRUCTION_REPEAT
                elif line.strip():
                    yield line.rstrip("\n")


def main(argv=None) -> int:
    import sentencepiece as spm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help=".txt corpus files and/or .jsonl instruction files")
    parser.add_argument("--output", default="quick_start/tokenizer", help="model prefix (writes PREFIX.model)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args(argv)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as tmp:
        for sentence in _sentences(args.inputs):
            tmp.write(sentence + "\n")
    spm.SentencePieceTrainer.train(
        input=tmp.name, model_prefix=args.output, vocab_size=args.vocab_size, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, max_sentence_length=16384,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=SPECIAL_TOKENS,
        num_threads=1, minloglevel=2,
    )
    print(f"wrote {args.output}.model", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

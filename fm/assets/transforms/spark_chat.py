"""iFlytekSpark chat transform: ``{"input", "target"}`` (Spark's SFT format) or ``{"input", "output"}`` →
``{"input": "<User> {input}<end><Bot> ", "output": target}``.

The loss covers the output and the end token the packer appends: set ``eos_token: "<end>"`` in the
train config (the spark SFT configs do), so each sample ends with Spark's ``<end>``. Newlines and tabs
are written as Spark's tokenizer expects them (``<ret>``, ``<tab>``), as ``fm.generate --template spark``
does at inference.
"""

import random

TEMPLATE = "<User> {}<end><Bot> "


def spark_text(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", "<ret>").replace("\t", "<tab>")


def transform(data: dict, num_sample: int, r: random.Random) -> dict:
    if "target" in data:
        answer = data["target"]
    elif "output" in data:
        answer = data["output"]
    else:
        raise KeyError(f"SFT record has neither 'target' nor 'output' (keys: {sorted(data)})")
    question = data.get("input", "")
    if not isinstance(question, str) or not isinstance(answer, str):
        raise TypeError("SFT record: 'input' and 'target'/'output' must be strings")
    return {"input": TEMPLATE.format(spark_text(question)), "output": spark_text(answer)}

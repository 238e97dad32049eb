"""Example transform: wrap an instruction pair in the demo tokenizer's chat markers.

``transform(data, num_sample, r)`` gets the parsed jsonl record, the record's position in the dataset's
(multi-epoch) sequence, and a ``random.Random`` seeded from (seed, task, line, epoch): deterministic, so a
resumed run sees exactly the same samples. It returns {"input": str, "output": str}; loss is on the output.
"""

import random


def transform(data: dict, num_sample: int, r: random.Random) -> dict:
    question = data.get("input", "")
    answer = data.get("output", "")
    return {"input": f"<用户>{question}<AI>", "output": answer}

"""fm: train Chinese and English LLMs (FM9G dragonfly, iFlytekSpark-13B) on BMTrain or FSDP2."""

__version__ = "0.1.0"

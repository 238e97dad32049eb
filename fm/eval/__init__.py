"""Offline evaluation from local files, and the validation loss the trainer reports.

* ``python -m fm.eval`` — C-Eval / MMLU / CMMLU multiple choice (answer-letter log-likelihood),
  GSM8K exact match (greedy generation), perplexity of an index directory; see docs/evaluation.md.
* :func:`fm.eval.validation.evaluate_loss` and :func:`fm.eval.validation.fixed_batches` — per-task
  validation loss during training.
"""

from fm.eval.validation import evaluate_loss, fixed_batches, from_sums_tensor, sums_tensor, token_losses

__all__ = ["evaluate_loss", "fixed_batches", "from_sums_tensor", "sums_tensor", "token_losses"]

"""Upstream FM9G's dialect, read at one edge: its flat train keys (:mod:`fm.compat.upstream`) and its command-line
grammar (:mod:`fm.compat.argv`). Nothing past this package sees an upstream key name, a ``"True"`` string or a
misspelling; the rest of fm works on the typed sections of :class:`fm.train.config.TrainConfig`."""

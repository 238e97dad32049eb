"""Training: the typed train config (:mod:`fm.train.config`), lr schedules, muP param groups, metrics, callbacks and
the pretraining loop (:mod:`fm.train.trainer`).

Entry point: ``fm.train.trainer.run(load_config(path, cli=...))`` (what ``apps/fm9g_2b/pretrain_dragonfly.py``
does through :mod:`fm.train.cli`). Importing this package imports nothing: the launchers read the config before
the preflight without importing torch.
"""

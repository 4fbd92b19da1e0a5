"""Retriever training and evaluation on Ray Train.

:mod:`~knowmap.train.data` (episodes per split), :mod:`~knowmap.train.pairs` (KnowMap's env, experience and joint
pairs), :mod:`~knowmap.train.loop` (the Ray-free training step), :mod:`~knowmap.train.ray_run` (``TorchTrainer``,
checkpoints, resume), the two tasks :mod:`~knowmap.train.embedder_trainer` (masked InfoNCE, WiSE-FT) and
:mod:`~knowmap.train.reranker_trainer`, and :mod:`~knowmap.train.evaluate` with :mod:`~knowmap.train.metrics`.
"""

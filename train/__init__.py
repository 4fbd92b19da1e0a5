"""Retriever training: pairs, the torch loop, and its data-parallel run on Ray Train.

:mod:`~knowmap.train.pairs` (KnowMap's env, experience and joint pairs from the moments of
:mod:`knowmap.evaluation.moments`), :mod:`~knowmap.train.loop` (the Ray-free training step, also run in one process
by the throughput benchmark), :mod:`~knowmap.train.ray_run` (``TorchTrainer``, checkpoints, resume) and the two
tasks it runs: :mod:`~knowmap.train.embedder_trainer` (masked InfoNCE, WiSE-FT) and
:mod:`~knowmap.train.reranker_trainer` (listwise cross-encoder). Judging the trained models is
:mod:`knowmap.evaluation`'s.
"""

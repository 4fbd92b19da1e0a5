"""The retrieval service on Ray Serve, for this project's agents and for external ones.

Deployments: :mod:`~knowmap.serve.deployments` (the embedder, held in the ingress replica, and the reranker
deployment, each batched over a pure function) and :mod:`~knowmap.serve.retriever` (the backend in the ingress:
:class:`knowmap.models.retrieval.Retriever` over those and the KB actors, with hot-swap pinning; the env-KB actors
it keeps are bounded by :mod:`~knowmap.serve.envs`). HTTP: :mod:`~knowmap.serve.api` (thin routes),
:mod:`~knowmap.serve.http` (the app without routes: error shapes, key and role dependencies, limits),
:mod:`~knowmap.serve.guard` (what every request passes first: key, body, deadline), :mod:`~knowmap.serve.auth`
(keys and tenants) and :mod:`~knowmap.serve.proxy` (what takes connections: HAProxy or Serve's proxy).
:mod:`~knowmap.serve.app` builds, starts and hot-swaps the application; :mod:`~knowmap.serve.metrics` exports its
metrics; :mod:`~knowmap.serve.client` is the typed HTTP client and :mod:`~knowmap.serve.mcp_tools` the MCP server
over it.
"""

"""KnowMap on Ray: adapt a frozen LLM agent to an environment through knowledge, not fine-tuning.

``knowmap/`` is the Ray-free core, grouped by concern, each subpackage readable on its own:
:mod:`knowmap.environment` (ScienceWorld, typed actions, episodes), :mod:`knowmap.kb` (both knowledge bases and
the vector store), :mod:`knowmap.models` (embedder, reranker, the one ranking pipeline, the model registry),
:mod:`knowmap.agent` (policies, the LLM scaffold, the episode worker) and :mod:`knowmap.evaluation` (every judge and
metric). Beside them: ``config`` (one typed config,
with ``config.paths`` for every file under ``data_dir``, laid out by ``layout``), ``errors`` (every exception),
``schemas`` (domain types), ``api_schemas`` (the HTTP contract), ``results`` (the typed results of evaluations and
jobs) and ``tenancy`` (tenant names and roles). The Ray layer wraps the core: :mod:`knowmap.actors` (KB actors and the
rollout pool), :mod:`knowmap.serve` (the retrieval service), :mod:`knowmap.train` (Ray Train) and
:mod:`knowmap.jobs` (what the CLI runs).

Where one observation becomes facts: :class:`knowmap.agent.worker.AgentWorker` steps the env and hands each
:class:`~knowmap.schemas.StepRecord` to its env KB (in-process, or the env-KB actor through
:mod:`knowmap.actors.kb_handles`); :class:`knowmap.kb.durable_kb.DurableEnvironmentKB` logs it, and
:class:`knowmap.kb.environment_kb.EnvironmentKB` runs :mod:`knowmap.kb.extraction` over the text and applies the
triples with the replacement rule. Where a ``/v1/retrieve`` goes: :mod:`knowmap.serve.api` (the ingress: auth,
limits) -> :class:`knowmap.serve.retriever.RetrievalBackend` (in the same replica) ->
:class:`knowmap.models.retrieval.Retriever`, whose embedder calls go to the ingress's own
:class:`knowmap.serve.deployments.EmbedderModels`, env facts to the env-KB actor and sub-goals to the
experiential-KB actor (:mod:`knowmap.actors`).
"""

"""The Ray actors: each wraps a plain class of the core with options from ``config.ray``.

:mod:`~knowmap.actors.env_kb` (one durable env-KB actor per environment instance), :mod:`~knowmap.actors.experience`
(the shared experiential-KB actor that owns the Milvus store), :mod:`~knowmap.actors.kb_handles` (the agent's KB
interfaces over those actors' handles) and :mod:`~knowmap.actors.pool` (the rollout pool, which runs
:class:`knowmap.agent.worker.AgentWorker` as Ray actors, or in this process with zero workers).
"""

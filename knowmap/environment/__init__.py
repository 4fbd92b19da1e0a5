"""The environment: ScienceWorld behind a typed wrapper, its actions typed, and episodes played from it.

:mod:`~knowmap.environment.sciworld` owns one JVM per :class:`~knowmap.environment.sciworld.ScienceWorld`, turns
every step into a :class:`~knowmap.schemas.StepRecord` at once, validates tasks and variations per split, produces
gold trajectories, and offers the cheap step path (no valid-action list) for expert replay.
:mod:`~knowmap.environment.action_types` types actions by ScienceWorld's own tables (template and object types), so
a judgement made on one variation holds on another. :mod:`~knowmap.environment.episodes` collects gold replays per
split (cached, annotated on request) as :class:`~knowmap.environment.episodes.Episode` s: a trajectory with its env
KB and sub-goals, what training and evaluation read. Nothing here knows about models or Ray.
"""

"""The environment: ScienceWorld behind a typed wrapper (:mod:`knowmap.environment.sciworld`).

It owns one JVM per :class:`~knowmap.environment.sciworld.ScienceWorld`, turns every step into a
:class:`~knowmap.schemas.StepRecord` at once, validates tasks and variations per split, produces gold
trajectories, and offers the cheap step path (no valid-action list) for expert replay. Nothing here knows about
knowledge bases, models or Ray.
"""

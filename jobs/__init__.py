"""Jobs: what the CLI runs, each a function over a config, and the one way to start or join Ray.

:func:`knowmap.jobs.session.ray_session` starts a local Ray or joins a cluster and releases what the job opened
(the experiential-KB actor and its Milvus Lite file, Ray itself if it started it). The jobs: :mod:`~knowmap.jobs.build`
(build-kb), :mod:`~knowmap.jobs.training` (train, eval-retrieval), :mod:`~knowmap.jobs.agent_eval` (eval, with
:mod:`~knowmap.jobs.agent_runs`), :mod:`~knowmap.jobs.retrain` (the retrain controller), :mod:`~knowmap.jobs.main_job`
(``knowmap run``, with :mod:`~knowmap.jobs.report` and :mod:`~knowmap.jobs.console`). :mod:`~knowmap.jobs.cli` only
parses options and calls them.
"""

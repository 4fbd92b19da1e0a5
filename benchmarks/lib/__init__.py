"""What the benchmark programs beside this folder share, and nothing that runs on its own: the result file and its
goal checks (:mod:`lib.results`), a retrieval service in a local Ray of its own (:mod:`lib.service`), and training
pairs synthesised from the fixture trajectories (:mod:`lib.fixture_pairs`).

Imported as ``lib``: ``python benchmarks/X.py`` puts ``benchmarks/`` first on ``sys.path``.
"""

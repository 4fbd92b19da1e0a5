"""Every judge and metric, Ray-free: what the project measures itself by, none of it made by a model under test.

- :mod:`~knowmap.evaluation.decision`: decision support, judged by the gold next action: per knowledge mode,
  support@k of env facts and sub-goals, and whether the actuator's shortlist holds the gold action (the retrain
  gate and ``benchmarks/decision_support.py`` run it);
- :mod:`~knowmap.evaluation.retrieval` with :mod:`~knowmap.evaluation.metrics`: recall@k, MRR and nDCG@10 of each
  retrieval system (``knowmap eval-retrieval``), and their chart;
- :mod:`~knowmap.evaluation.moments`: the retrieval moments of an episode (the query at a step, what the expert
  touches next, corpora and relevance), shared with the training pairs of :mod:`knowmap.train.pairs`;
- :mod:`~knowmap.evaluation.fidelity`: the env KB judged against ScienceWorld's object tree, counted over episodes by
  :mod:`~knowmap.evaluation.fidelity_tally` (``benchmarks/kb_fidelity.py``).

Every ranking these judge is made by the served pipeline, :class:`knowmap.models.retrieval.Retriever`.
"""

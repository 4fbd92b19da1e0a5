"""Both knowledge bases and what they stand on, Ray-free.

The environmental KB: :mod:`~knowmap.kb.extraction` (rules, no LLM: observation text -> triples, with
:mod:`~knowmap.kb.extraction_patterns`; :mod:`~knowmap.kb.identity` names the objects an observation describes),
:mod:`~knowmap.kb.environment_kb` (facts with the replacement rule and step-ranged history) and
:mod:`~knowmap.kb.durable_kb` (write-ahead log and snapshots, on the file format of :mod:`~knowmap.kb.storage`).
Its judge against ScienceWorld's object tree lives with the other judges, in :mod:`knowmap.evaluation.fidelity`.

The experiential KB: :mod:`~knowmap.kb.segmentation` (trajectory -> sub-goals) and :mod:`~knowmap.kb.experience_kb`
over the Milvus facade :mod:`~knowmap.kb.vectorstore` (rows and filters in :mod:`~knowmap.kb.store_rows`), one
collection per embedder version, re-indexed without losing adds (:mod:`~knowmap.kb.experience_versions`); the
trajectories training reads are kept by :mod:`~knowmap.kb.trajectory_store`. The Ray actors in
:mod:`knowmap.actors` wrap these classes unchanged.
"""

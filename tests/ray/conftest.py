"""The Ray tier uses the session's one local Ray (``ray_local``, tests/conftest.py): started on first use, shut down
at the session's end. The multi-node module stops it to start a ``ray.cluster_utils.Cluster`` of its own, and runs
after every other test (``RUN_LAST``), so no test has to start Ray again after it.
"""

"""Authorization: the OpenFGA model (``model.fga``), its in-process evaluator and the authorizers.

``model.fga`` is the source of truth; ``model.json`` is its ``fga model transform`` output, kept
equal by a test.
"""

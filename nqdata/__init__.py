"""The NaturalQuestions evaluation data (``data/nq/``) as questions, passages and items.

A package of its own so that ``bench/``, ``training/``, ``locustfiles/`` and the tests all depend
on it, and none of them on another: ``training`` must not import ``bench`` (benchmarks are not a
training dependency) and ``bench/load.py`` imports ``locustfiles``, which must not import back.
"""

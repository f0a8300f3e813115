"""Real servers on loopback (bentoml serve, llama.cpp's server, LiteLLM, haproxy, Redis) and
throwaway PostgreSQL databases, for the tests and the benchmarks alike.

Its own package so that ``bench`` need not import ``tests`` (which import ``bench``): both
depend on ``harness``, and it on neither.
"""

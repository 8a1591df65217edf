"""Pieces of the quality benchmark (`benchmarks/quality.py` runs it): the KL estimator (kl),
the independent judge and fluency measures (judges) and the report built from the stored
results (report)."""

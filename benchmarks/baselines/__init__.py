"""Baselines the load benchmark compares cdserve with, each a small OpenAI-compatible server so
the same load tool drives it: `args_server` (ARGS-style reward-guided search) and
`best_of_n_proxy` (client-side best-of-N in front of a server)."""

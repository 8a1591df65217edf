"""The `vllm` backend: vLLM's AsyncLLM in-process, token mode as a V1 logits processor in the
worker, block mode and best_of_n through `n=K` candidates. See README.md in this folder."""

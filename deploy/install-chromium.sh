#!/usr/bin/env bash
# Installs the browser the playground tests drive (tests/cdserve/server/test_playground.py):
# Chromium from Debian, at /usr/bin/chromium. Playwright for Python (the `dev` extra) drives it
# through `executable_path`; Playwright's own browser download is never used.
# Usage: deploy/install-chromium.sh   (idempotent: quick when Chromium is already there)
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ ! -x "${CHROMIUM}" ]]; then
  sudo=""
  if [[ "$(id -u)" != 0 ]]; then sudo="sudo"; fi
  ${sudo} apt-get update -qq
  DEBIAN_FRONTEND=noninteractive ${sudo} apt-get install -y -q chromium
fi

"${CHROMIUM}" --version 2>/dev/null | sed -n 1p  # sed reads all input: head would SIGPIPE it under pipefail

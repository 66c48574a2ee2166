#!/usr/bin/env bash
# On the GPU machine, from the repo root: gather the parts written by bench/gpu/pack.py, and once all are there,
# unpack them and run a command with Lantern's dependencies importable (bench/gpu/README.md).
#
#   bash bench/gpu/device.sh                                   # a call that only brings its part
#   bash bench/gpu/device.sh bash bench/gpu/measure.sh 420     # the last part's call: unpack, then measure
#
# Each call carries one or more part folders (.gpu/partN/: the part and the manifest); the parts are kept in
# /tmp/lantern-gpu between calls of one warm machine. A command given before all parts have arrived is not run
# (exit 3).
set -euo pipefail
keep=/tmp/lantern-gpu
mkdir -p "$keep/parts"
for folder in .gpu/part*/; do
    [ -d "$folder" ] && cp "$folder"/* "$keep/parts/"
done
if [ ! -e "$keep/parts/manifest.json" ]; then
    echo "no part has arrived: carry a .gpu/partN folder (made by bench/gpu/pack.py)"
    exit 3
fi
missing=$(python3 - "$keep/parts" <<'PY'
import hashlib, json, sys
from pathlib import Path
parts = Path(sys.argv[1])
manifest = json.loads((parts / "manifest.json").read_text())
here = "%d.%d" % sys.version_info[:2]
if manifest["python"] != here:
    sys.exit(f"the parts were packed for Python {manifest['python']}, this machine's python3 is {here}: "
             f"change DEVICE_PYTHON in bench/gpu/pack.py and pack again")
missing = []
for part in manifest["parts"]:
    path = parts / part["name"]
    if not path.exists() or path.stat().st_size != part["bytes"]:
        missing.append(part["name"])
    elif hashlib.sha256(path.read_bytes()).hexdigest() != part["sha256"]:
        path.unlink()
        missing.append(part["name"] + " (damaged, removed)")
print(" ".join(missing))
PY
)
if [ -n "$missing" ]; then
    echo "parts here: $(cd "$keep/parts" && ls part* 2>/dev/null | tr '\n' ' ')- still missing: $missing"
    [ $# -eq 0 ] && exit 0 || exit 3
fi
if [ ! -d "$keep/site" ]; then
    python3 - "$keep" <<'PY'
import json, lzma, sys, tarfile
from pathlib import Path
keep = Path(sys.argv[1])
names = [part["name"] for part in json.loads((keep / "parts" / "manifest.json").read_text())["parts"]]

class Joined:
    """The parts read one after another, as one stream."""
    def __init__(self, paths):
        self.files = [path.open("rb") for path in paths]
    def read(self, size=-1):
        while self.files:
            chunk = self.files[0].read(size)
            if chunk:
                return chunk
            self.files.pop(0).close()
        return b""

with lzma.open(Joined([keep / "parts" / name for name in names])) as stream, \
        tarfile.open(fileobj=stream, mode="r|") as tar:
    tar.extractall(keep, filter="tar")
PY
    # pip wrote the console scripts for the packing machine's interpreter; point them at this one
    sed -i '1s|^#!.*python.*$|#!/usr/bin/env python3|' "$keep"/site/bin/* 2>/dev/null || true
    echo "unpacked $(ls "$keep/site" | grep -c dist-info) distributions into $keep/site"
fi
export PYTHONPATH="$keep/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$keep/site/bin:$PATH"
# the tests run the `lantern` console script found beside the interpreter
python=$(python3 -c 'import sys; print(sys.executable)')
if [ ! -e "$(dirname "$python")/lantern" ]; then
    printf '#!/bin/sh\nexec %s -m lantern "$@"\n' "$python" > "$(dirname "$python")/lantern"
    chmod +x "$(dirname "$python")/lantern"
fi
[ $# -eq 0 ] && exit 0
exec "$@"

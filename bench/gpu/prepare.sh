#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before the device checks: fills .gpu_carry/ (ignored by
# git) with what the lent GPU machine lacks, to be named in the device run's `carry`:
#   whl/    DeepSpeed (built here as a wheel; PyPI has only its sdist) and the packages it
#           and this project need that the machine's image lacks (Python 3.12 wheels), and
#           transformers at this project's pinned version;
#   cache/  SmolLM2's tokenizer and config only (the 7B-shape models use its tokenizer; no
#           weights travel);
#   data/   NQ-open and GSM8K from ../shared/data (which does not travel).
# Then: run(command="bash bench/gpu/checks.sh", carry=[".gpu_carry"], timeout_s=600).
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=.gpu_carry
PY=${PY:-.venv/bin/python}
grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
rm -rf "$CARRY" && mkdir -p "$CARRY/whl" "$CARRY/cache" "$CARRY/data"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CARRY/whl" \
  "deepspeed==$(version deepspeed)"
platforms=()
for n in 2_28 2_27 2_17 2014 1; do
  case $n in 2014|1) platforms+=(--platform "manylinux${n}_x86_64");;
             *) platforms+=(--platform "manylinux_${n}_x86_64");; esac
done
for pkg in hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions \
    transformers; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$CARRY/whl" "$pkg==$(version "$pkg")"
done
src=$("$PY" -c "from meft_ds.models import loader; print(loader.smollm2_dir())")
mkdir -p "$CARRY/cache/$(basename "$src")"
cp "$src"/*.json "$src"/*.jinja "$CARRY/cache/$(basename "$src")/" 2>/dev/null || true
data=${MEFT_DS_DATA:-../shared/data}
cp -r "$data/nq_open" "$data/gsm8k" "$CARRY/data/"
du -sh "$CARRY" && ls "$CARRY/whl"

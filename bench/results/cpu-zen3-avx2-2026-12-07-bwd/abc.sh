#!/bin/bash
# Paired runs of several builds in alternating processes, the order rotated each round.
# usage: PYTHON=python abc.sh ROUNDS "threads dtype NxC secs [mode]" DIR...
# each DIR holds a copy of the nllfused package with its own _C build; lmloop.py, next to this
# script, times one configuration.
here=$(cd "$(dirname "$0")" && pwd)
R=$1; cfg=$2; shift 2
dirs=("$@")
for r in $(seq "$R"); do
  n=${#dirs[@]}
  for k in $(seq 0 $((n - 1))); do
    d=${dirs[$(( (k + r) % n ))]}
    echo -n "$(basename "$d") $cfg: "
    PYTHONPATH=$d "${PYTHON:-python}" "$here/lmloop.py" $cfg | sed 's/.*median/median/'
  done
done

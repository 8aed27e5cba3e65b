#!/bin/bash
# Paired A/B of two builds in alternating processes.
# usage: A=DIR_A B=DIR_B [PYTHON=python] ab.sh ROUNDS "threads dtype NxC secs [mode]" ...
# DIR_A, DIR_B: each a directory holding a copy of the nllfused package with its own _C build
# (put first on PYTHONPATH); lmloop.py, next to this script, times one configuration.
here=$(cd "$(dirname "$0")" && pwd)
R=$1; shift
for r in $(seq "$R"); do
  for cfg in "$@"; do
    for v in A B; do
      echo -n "$v $cfg: "
      PYTHONPATH=${!v} "${PYTHON:-python}" "$here/lmloop.py" $cfg | sed 's/.*median/median/'
    done
  done
done

#!/usr/bin/env bash
# Split a model file into parts that fit one device call (a call carries at most 64 MiB) under
# .carry-parts/NAME.partNN-of-MM. Before each call move the next part into .carry/ and name ".carry" in
# the call's carry list; device_check.sh collects the parts and joins them once all have arrived.
set -euo pipefail
file=$1; size=${2:-56m}
mkdir -p .carry-parts
name=$(basename "$file")
split -b "$size" -d -a 2 "$file" ".carry-parts/$name.tmp."
parts=(.carry-parts/"$name".tmp.*)
total=$(printf '%02d' "${#parts[@]}")
for p in "${parts[@]}"; do
  n=${p##*.tmp.}
  mv "$p" ".carry-parts/$name.part$n-of-$total"
done
ls -la .carry-parts

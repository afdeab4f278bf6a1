#!/usr/bin/env bash
# Assemble the vmm test guests into flat binaries next to their sources:
# `vmm/tests/guests/assemble.sh`. The tests embed the .bin files and check
# (where GNU as is installed) that they match the sources.
set -euo pipefail
cd "$(dirname "$0")"
for src in *.S; do
  name="${src%.S}"
  tmp="$(mktemp -d)"
  as --64 -o "$tmp/$name.o" "$src"
  objcopy -O binary -j .text "$tmp/$name.o" "$name.bin"
  rm -rf "$tmp"
done

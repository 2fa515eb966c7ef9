#!/usr/bin/env bash
# Real English text, offline except for Debian's package archive: documentation packages fetched
# with apt (not installed) and unpacked into local/text/<package>/.
#
#   bash scripts/fetch_text_corpus.sh                    # python3.11-doc (497 .rst.txt files, 11 M characters, PSF licence)
#   bash scripts/fetch_text_corpus.sh linux-doc-6.1 perl-doc python3.11-doc
#   TEXT_DIR=elsewhere bash scripts/fetch_text_corpus.sh
#
# linux-doc-6.1: 3,183 reST files (.rst.gz), 23 M characters (GPL-2); perl-doc: 206 .pod files,
# 8.8 M characters (Artistic / GPL). apt serves the current version only, so packages are named,
# not versioned. Any folder of text files works instead: point a recipe's
# `stages.data.source.text_folder` at it. Idempotent: an unpacked package is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
TEXT_DIR=${TEXT_DIR:-local/text}
PACKAGES=("$@")
[ ${#PACKAGES[@]} -gt 0 ] || PACKAGES=(python3.11-doc)

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "fetch_text_corpus: apt-get and dpkg-deb are needed (a Debian or Ubuntu machine)." >&2
  echo "  Any folder of .txt / .rst / .md files works instead: set stages.data.source.text_folder to it." >&2
  exit 2
fi

mkdir -p "$TEXT_DIR" local/downloads
updated=0
for package in "${PACKAGES[@]}"; do
  target="$TEXT_DIR/$package"
  if [ -d "$target/usr" ]; then
    echo "$target: already unpacked"
    continue
  fi
  if ! ls local/downloads/"${package}"_*.deb >/dev/null 2>&1; then
    if [ "$updated" = 0 ]; then
      apt-get update -qq || { echo "fetch_text_corpus: apt-get update failed (no access to the package archive?)" >&2; exit 2; }
      updated=1
    fi
    (cd local/downloads && apt-get download "$package") \
      || { echo "fetch_text_corpus: apt-get download $package failed" >&2; exit 2; }
  fi
  tmp="$TEXT_DIR/.$package.partial"
  rm -rf "$tmp"
  dpkg-deb -x local/downloads/"${package}"_*.deb "$tmp"
  mv "$tmp" "$target"  # whole or not at all: a killed run leaves only the .partial folder
  echo "$target: $(find "$target" -type f \( -name '*.rst*' -o -name '*.txt' -o -name '*.pod' \) | wc -l) text files"
done

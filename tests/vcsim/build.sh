#!/bin/sh
# Build the vSphere simulator used by the tests; print the binary's path.
# Idempotent: rebuilds only when main.go changed (its sha256 is part of the cache key).
# Needs: apt-get install golang-go golang-github-vmware-govmomi-dev
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cache=${SNAPCOORD_GO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/snapcoord-go}
sum=$(sha256sum "$here/main.go" | cut -c1-16)
bin="$cache/vcsim-$sum"
if [ ! -x "$bin" ]; then
    mkdir -p "$cache/gocache"
    tmp="$bin.tmp.$$"
    (cd "$here" && GOPATH=/usr/share/gocode GO111MODULE=off GOFLAGS= \
        GOCACHE="$cache/gocache" go build -o "$tmp" main.go) >&2
    mv -f "$tmp" "$bin"
fi
echo "$bin"

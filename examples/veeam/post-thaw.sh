#!/bin/sh
# post-thaw.sh VM - Veeam post-thaw script: put the database VM back after the snapshot.
#
# The counterpart of pre-freeze.sh (read its header first): same VM argument ($1, else
# $SNAPCOORD_VM), same SNAPCOORD_CONFIG. `snapcoord thaw VM` tells the helper that
# pre-freeze.sh left running to start everything it stopped (or release the held commits) and
# verifies it; without a helper it restores from the run journal.
#
# Exit code: snapcoord's, passed through unchanged (docs/exit-codes.md). Veeam treats a non-zero
# exit as a failed script (a failed job, or a warning, by the job's setting):
#   0   everything runs again (also when nothing was frozen: then snapcoord notes
#       "nothing was frozen")
#   5   the freeze had already ended before this thaw (its limit was reached, or its helper died
#       while holding commits): the snapshot Veeam took may NOT be consistent. Everything runs.
#       Raise SNAPCOORD_MAX_SECONDS / freeze_max_seconds and take another backup.
#   6   a service could not be started again: it may be down now, act at once (the message
#       names it; the guest watchdog will also try to start it)
#   2   usage or configuration error; other codes: docs/exit-codes.md
set -eu

me=post-thaw.sh
vm=${1:-${SNAPCOORD_VM:-}}
if [ -z "$vm" ]; then
    echo "$me: no VM: pass the snapcoord VM key as the first argument, or set SNAPCOORD_VM" >&2
    exit 2
fi
PATH=$PATH:/usr/local/bin:/usr/bin:/bin
export PATH

status=0
snapcoord thaw "$vm" || status=$?
case $status in
    0) ;;
    5) echo "$me: the freeze of $vm ended before thaw: this snapshot may not be consistent" >&2 ;;
    6) echo "$me: a service of $vm may be DOWN: act now (exit 6)" >&2 ;;
    *) echo "$me: snapcoord thaw $vm failed (exit $status, see docs/exit-codes.md)" >&2 ;;
esac
exit "$status"

#!/bin/sh
# pre-freeze.sh VM - Veeam pre-freeze script: quiesce the database VM before the snapshot.
#
# Veeam runs the pre-freeze script right before it takes the VM snapshot and the post-thaw
# script (post-thaw.sh) right after; both are set in the job's guest processing (application
# settings, Scripts), and run on the Linux guest (uploaded over SSH) or on the machine the job
# names. Wherever they run, snapcoord must be installed there with a configuration whose
# [vms.VM.guest] reaches the database guest: over SSH, or with transport = "exec" when the
# script runs inside the guest itself.
#
#   VM                  the snapcoord VM key ([vms.VM]): the first argument, else $SNAPCOORD_VM.
#                       Where the script gets no arguments and no environment, put the key in
#                       a copy: vm=${1:-${SNAPCOORD_VM:-db1}}
#   SNAPCOORD_CONFIG    the configuration (unset: snapcoord's own search, ending at
#                       /etc/snapcoord/config.toml)
#   SNAPCOORD_MAX_SECONDS  optional: put everything back after this many seconds even if
#                       post-thaw.sh never runs (default: [vms.VM.guest] freeze_max_seconds,
#                       300). Keep it above the time Veeam needs from pre-freeze to post-thaw.
#
# What it does: `snapcoord freeze VM` stops the VM's services and database (or, with
# consistency = "pause", holds the database's commits) and returns; a helper process keeps the
# guest quiesced until post-thaw.sh (`snapcoord thaw VM`) or the limit, whichever comes first.
# If Veeam never runs post-thaw.sh (the job was cancelled, the snapshot failed before it), the
# helper puts everything back by itself at the limit.
#
# Exit code: snapcoord's, passed through unchanged (docs/exit-codes.md). Veeam treats any
# non-zero exit as a failed script: the job fails ("Require successful script execution") or
# goes on with a warning and an unquiesced snapshot ("Ignore script execution failures").
#   0   quiesced: take the snapshot now
#   2   usage or configuration error (no VM given, unknown VM, no [vms.VM.guest] table)
#   3   hypervisor error (the VM could not be looked up)
#   4   preflight or guest failure (SSH, sudo, a service): nothing was changed in the guest
#   75  already frozen (by another job, or an earlier freeze that was never thawed): nothing was
#       changed; `snapcoord thaw VM` ends that freeze
#   other codes: docs/exit-codes.md (6: a service may be down, act now)
set -eu

me=pre-freeze.sh
vm=${1:-${SNAPCOORD_VM:-}}
if [ -z "$vm" ]; then
    echo "$me: no VM: pass the snapcoord VM key as the first argument, or set SNAPCOORD_VM" >&2
    exit 2
fi
# Veeam starts scripts with a short PATH; snapcoord is usually in /usr/local/bin.
PATH=$PATH:/usr/local/bin:/usr/bin:/bin
export PATH

status=0
if [ -n "${SNAPCOORD_MAX_SECONDS:-}" ]; then
    snapcoord freeze "$vm" --max-seconds "$SNAPCOORD_MAX_SECONDS" || status=$?
else
    snapcoord freeze "$vm" || status=$?
fi
case $status in
    0) ;;
    75) echo "$me: $vm is already frozen: not taking over another freeze (exit 75)" >&2 ;;
    4) echo "$me: $vm could not be quiesced; nothing was changed (exit 4)" >&2 ;;
    *) echo "$me: snapcoord freeze $vm failed (exit $status, see docs/exit-codes.md)" >&2 ;;
esac
exit "$status"

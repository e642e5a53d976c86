#!/bin/sh
# The baseline for bench/window.py: what an admin would write by hand (issue 3). One plain `ssh`
# per command, no connection reuse, sequential; the snapshot is `virsh snapshot-create-as` on the
# same libvirt test-driver node. Prints the service window (first stop issued -> last start returned) in
# seconds on the last line.
#   usage: window-script.sh SSH_CONFIG HOST LIBVIRT_URI DOMAIN SNAPSHOT_NAME
set -eu
cfg=$1; host=$2; uri=$3; dom=$4; name=$5
g() { ssh -F "$cfg" "$host" "$@"; }
now() { date +%s.%N; }

t0=$(now)
g service apache2 stop
g service cron stop
g service mariadb stop
virsh -q -c "$uri" snapshot-create-as "$dom" "$name" >/dev/null
g service mariadb start
g service cron start
g service apache2 start
t1=$(now)
echo "$t1 - $t0" | bc

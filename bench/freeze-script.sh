#!/bin/sh
# The baseline for bench/freeze.py: a backup product's pre-freeze and post-thaw scripts as an
# admin would write them by hand. One plain `ssh` per command, no connection reuse, sequential.
#   usage: freeze-script.sh pre|post SSH_CONFIG HOST
set -eu
half=$1; cfg=$2; host=$3
g() { ssh -F "$cfg" "$host" "$@"; }
case $half in
  pre)  g service apache2 stop; g service cron stop; g service mariadb stop ;;
  post) g service mariadb start; g service cron start; g service apache2 start ;;
  *) echo "usage: $0 pre|post SSH_CONFIG HOST" >&2; exit 2 ;;
esac

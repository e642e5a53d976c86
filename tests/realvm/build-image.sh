#!/usr/bin/env bash
# Build the Debian 12 (bookworm) guest image of the real-VM tests (tests/realvm_guest.py).
#
# Output: /var/cache/snapcoord-realvm/<hash>/ (override the parent with SNAPCOORD_REALVM_CACHE),
# <hash> = the first 16 hex digits of this script's sha256: editing the script means a rebuild.
#   disk.qcow2                 ext4 root file system, no partition table (root=/dev/vda), 3 GiB virtual
#   vmlinuz, initrd.img        the guest's own kernel and initramfs (direct kernel boot)
#   id_ed25519[.pub]           root's SSH client key (root's authorized_keys in the guest)
#   ssh_host_ed25519_key[.pub] the guest's only SSH host key
#   manifest.json              versions, sizes, build seconds
#   build.log                  everything the build printed
# Idempotent: does nothing if the output exists. Builds into a temporary directory next to it
# and renames it into place; a flock on <cache>/.lock serialises concurrent builds. Keeps the
# three newest images, and the downloaded packages in <cache>/debs (a rebuild downloads nothing).
# On success prints only the output directory; on failure the tail of the log (kept as
# <cache>/<hash>.failed.log).
#
# Needs root, network access to the Debian mirror this machine's apt uses (read from
# /etc/apt/sources.list[.d]; override with SNAPCOORD_REALVM_MIRROR), and the host packages
# debootstrap, e2fsprogs, qemu-utils, openssh-client, python3.
set -euo pipefail

die() {
    echo "build-image: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root"
for cmd in debootstrap mkfs.ext4 qemu-img ssh-keygen python3 flock chroot findmnt; do
    PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null || die "$cmd is missing"
done
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true

self=$(readlink -f "${BASH_SOURCE[0]}")
hash=$(sha256sum "$self" | cut -c1-16)
cache=${SNAPCOORD_REALVM_CACHE:-/var/cache/snapcoord-realvm}
out=$cache/$hash
suite=bookworm

# Guest packages (installed with --no-install-recommends). dbus: systemd-logind and
# hostnamectl/timedatectl need it (a stock Debian server has it through systemd's Recommends);
# e2fsprogs: fsck.ext4 for the root file system. python3-venv, python3-libvirt, man-db,
# bash-completion: what scripts/install uses on a Debian 12 host (tests/test_realvm_install.py
# installs snapcoord into the guest from a wheelhouse); make, openssl: `make demo`.
packages=(systemd-sysv openssh-server mariadb-server mariadb-client apache2 cron qemu-guest-agent
          linux-image-amd64 procps curl sudo util-linux dbus e2fsprogs
          python3 python3-venv python3-libvirt man-db bash-completion make openssl)
# Units enabled in the guest (the packages enable most of them already; this makes it explicit).
units=(ssh.service mariadb.service apache2.service cron.service systemd-networkd.service
       serial-getty@ttyS0.service)

if [ -f "$out/manifest.json" ]; then
    echo "$out"
    exit 0
fi
mkdir -p "$cache"
chmod 755 "$cache"
exec 9>"$cache/.lock"
flock 9
if [ -f "$out/manifest.json" ]; then # built by someone else while we waited
    echo "$out"
    exit 0
fi

# The Debian mirror apt uses on this machine (first 'deb' source for the suite).
detect_mirror() {
    if [ -n "${SNAPCOORD_REALVM_MIRROR:-}" ]; then
        echo "$SNAPCOORD_REALVM_MIRROR"
        return
    fi
    local f uri
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # deb [opts] URI SUITE COMPONENTS...
        uri=$(awk -v suite="$suite" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f")
        if [ -n "$uri" ]; then
            echo "$uri"
            return
        fi
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk -v suite="$suite" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^[ \t]*#/) continue
                    key = tolower(line); sub(/:.*/, "", key)
                    val = line; sub(/^[^:]*:[ \t]*/, "", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = tolower(val)
                }
                if (enabled != "no" && (" " types " ") ~ / deb / \
                    && (" " suites " ") ~ (" " suite " ")) {
                    split(uris, u, /[ \t]+/); print u[1]; exit
                }
            }' "$f")
        if [ -n "$uri" ]; then
            echo "$uri"
            return
        fi
    done
    echo "http://deb.debian.org/debian"
}
mirror=$(detect_mirror)
mirror=${mirror%/}

t0=$(date +%s.%N)
work=$(mktemp -d "$cache/.build-$hash.XXXXXX")
tree=$work/tree
dest=$work/out
log=$work/build.log
mkdir -p "$tree" "$dest" "$cache/debs"
: >"$log"

umount_under() { # everything mounted at or below $1, deepest first
    findmnt -rn -o TARGET | awk -v t="$1" 'index($0, t "/") == 1 || $0 == t' | sort -r |
        while read -r m; do umount -l "$m" || true; done
}
remove_dir() {
    umount_under "$1"
    rm -rf --one-file-system "$1"
}
# Leftovers of builds that were killed (we hold the lock: nobody else is building).
for old in "$cache"/.build-*; do
    [ -d "$old" ] && [ "$old" != "$work" ] && remove_dir "$old"
done

finish() {
    local rc=$?
    umount_under "$tree"
    if [ "$rc" -ne 0 ]; then
        cp -f "$log" "$cache/$hash.failed.log" 2>/dev/null || true
        {
            echo "build-image: FAILED (exit $rc) after $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.0f", b-a}') s; log: $cache/$hash.failed.log"
            tail -n 40 "$log"
        } >&2
    fi
    rm -rf --one-file-system "$work"
}
trap finish EXIT

declare -A seconds=()
step_start=0
step() { # step NAME: start timing a new step (and log it)
    local now
    now=$(date +%s.%N)
    if [ -n "${current:-}" ]; then
        seconds[$current]=$(awk -v a="$step_start" -v b="$now" 'BEGIN{printf "%.1f", b-a}')
    fi
    current=$1
    step_start=$now
    echo "=== $(date -u +%H:%M:%S) $1" >>"$log"
}
q() { "$@" >>"$log" 2>&1; }
in_tree() { chroot "$tree" "$@" >>"$log" 2>&1; }

echo "mirror=$mirror suite=$suite hash=$hash" >>"$log"

# -- 1. debootstrap, two stages: dpkg excludes, unsafe-io and policy-rc.d are in place before
#       dpkg configures anything
step debootstrap
include=()
case $mirror in https:*) include=(--include=ca-certificates) ;; esac
q debootstrap --foreign --variant=minbase --components=main --cache-dir="$cache/debs" \
    "${include[@]}" "$suite" "$tree" "$mirror"

mkdir -p "$tree/etc/dpkg/dpkg.cfg.d" "$tree/etc/apt/apt.conf.d" "$tree/usr/sbin"
cat >"$tree/etc/dpkg/dpkg.cfg.d/01-snapcoord-nodoc" <<'EOF'
# No documentation, manual pages or translations in the test guest.
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/groff/*
path-exclude=/usr/share/lintian/*
path-exclude=/usr/share/linda/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
echo force-unsafe-io >"$tree/etc/dpkg/dpkg.cfg.d/99-snapcoord-build-unsafe-io"
cat >"$tree/etc/apt/apt.conf.d/01-snapcoord" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
cat >"$tree/etc/fstab" <<'EOF'
# <file system> <mount point> <type> <options> <dump> <pass>
/dev/vda / ext4 errors=remount-ro 0 1
EOF
# initramfs-tools probes the root device for its fsck hook; in the build chroot there is none.
mkdir -p "$tree/etc/initramfs-tools/conf.d"
echo FSTYPE=ext4 >"$tree/etc/initramfs-tools/conf.d/snapcoord-fstype"
# Nothing may start on the build machine.
printf '#!/bin/sh\nexit 101\n' >"$tree/usr/sbin/policy-rc.d"
chmod 755 "$tree/usr/sbin/policy-rc.d"

step debootstrap-second-stage
in_tree /debootstrap/debootstrap --second-stage
umount_under "$tree"

# -- 2. the guest's packages
step apt-install
mount -t proc proc "$tree/proc"
mount -t sysfs sysfs "$tree/sys"
cp -f /etc/resolv.conf "$tree/etc/resolv.conf" 2>/dev/null || true
if ! ls "$tree"/var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
    in_tree apt-get update -q
fi
# Debs of earlier builds (hard links: same file system).
find "$cache/debs" -maxdepth 1 -name '*.deb' -exec ln -f {} "$tree/var/cache/apt/archives/" \;
in_tree apt-get install -y -q --no-install-recommends "${packages[@]}"
find "$tree/var/cache/apt/archives" -maxdepth 1 -name '*.deb' -exec ln -f {} "$cache/debs/" \;
in_tree apt-get clean
umount_under "$tree"

# -- 3. configuration
step configure
kver=$(basename "$(find "$tree/lib/modules" -mindepth 1 -maxdepth 1 -type d | sort -V | tail -n 1)")
[ -n "$kver" ] || die "no kernel modules in the tree"

echo snapcoord-guest >"$tree/etc/hostname"
cat >"$tree/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	snapcoord-guest
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
# QEMU user networking: DHCP gives 10.0.2.15, DNS is 10.0.2.3 (unreachable with restrict=on).
mkdir -p "$tree/etc/systemd/network"
cat >"$tree/etc/systemd/network/10-ethernet.network" <<'EOF'
[Match]
Type=ether
Name=eth0 en*

[Network]
DHCP=ipv4
EOF
rm -f "$tree/etc/resolv.conf"
echo "nameserver 10.0.2.3" >"$tree/etc/resolv.conf"

# SSH: one fixed ed25519 host key, root logs in with the client key only.
rm -f "$tree"/etc/ssh/ssh_host_*
q ssh-keygen -q -t ed25519 -N '' -C root@snapcoord-guest -f "$dest/ssh_host_ed25519_key"
q ssh-keygen -q -t ed25519 -N '' -C snapcoord-realvm-client -f "$dest/id_ed25519"
install -m 600 "$dest/ssh_host_ed25519_key" "$tree/etc/ssh/ssh_host_ed25519_key"
install -m 644 "$dest/ssh_host_ed25519_key.pub" "$tree/etc/ssh/ssh_host_ed25519_key.pub"
install -d -m 700 "$tree/root/.ssh"
install -m 600 "$dest/id_ed25519.pub" "$tree/root/.ssh/authorized_keys"
mkdir -p "$tree/etc/ssh/sshd_config.d"
cat >"$tree/etc/ssh/sshd_config.d/snapcoord.conf" <<'EOF'
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
EOF

q systemctl --root="$tree" enable "${units[@]}"
# qemu-guest-agent has no [Install] section: udev starts it when the virtio port appears.
q systemctl --root="$tree" enable qemu-guest-agent.service || true
# Debian's mariadb-server enables mariadb.socket on a fresh install; keep that default.
socket_state=$(systemctl --root="$tree" is-enabled mariadb.socket 2>>"$log" || true)
echo "mariadb.socket after install: $socket_state" >>"$log"
if [ "$socket_state" != enabled ]; then
    q systemctl --root="$tree" enable mariadb.socket
fi
[ "$(systemctl --root="$tree" is-enabled mariadb.socket)" = enabled ] || die "mariadb.socket not enabled"

# The initramfs must mount ext4 on virtio-blk (MODULES=most).
in_tree sh -c "lsinitramfs /boot/initrd.img-$kver >/tmp/initrd.list"
for mod in virtio_blk virtio_pci ext4; do
    grep -q "/$mod\.ko" "$tree/tmp/initrd.list" || grep -q "/$mod\.ko" "$tree/lib/modules/$kver/modules.builtin" ||
        die "initramfs lacks $mod"
done
rm -f "$tree/tmp/initrd.list"

# -- 4. clean up: the build helpers go, services start normally in the guest
step cleanup
rm -f "$tree/usr/sbin/policy-rc.d" "$tree/etc/dpkg/dpkg.cfg.d/99-snapcoord-build-unsafe-io" \
    "$tree/etc/apt/apt.conf.d/01-snapcoord"
rm -rf "$tree/debootstrap"
find "$tree/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete 2>/dev/null || true
find "$tree/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$tree"/usr/share/man/* "$tree"/usr/share/info/* "$tree"/usr/share/groff/* \
    "$tree"/usr/share/lintian/* "$tree"/usr/share/linda/*
find "$tree/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/*.bin "$tree"/var/cache/debconf/*-old \
    "$tree"/var/log/*.log "$tree"/tmp/* "$tree"/var/tmp/*
cp -f "$tree/boot/vmlinuz-$kver" "$dest/vmlinuz"
cp -f "$tree/boot/initrd.img-$kver" "$dest/initrd.img"
versions=$(chroot "$tree" dpkg-query -W -f '${Package}=${Version}\n' \
    linux-image-amd64 systemd mariadb-server apache2 openssh-server qemu-guest-agent cron)
pkg_count=$(chroot "$tree" dpkg-query -W -f '${Status}\n' | grep -c ' installed$')
tree_bytes=$(du -sx --block-size=1 "$tree" | cut -f1)

# -- 5. the disk: ext4 straight from the tree, no partition table, then qcow2
step mkfs
truncate -s 3G "$work/disk.raw"
q mkfs.ext4 -q -F -L snapcoord-root -d "$tree" "$work/disk.raw"
remove_dir "$tree"
step qcow2
q qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd -m 4 "$work/disk.raw" "$dest/disk.qcow2"
rm -f "$work/disk.raw"
q qemu-img check "$dest/disk.qcow2"
step manifest

qcow2_bytes=$(stat -c %s "$dest/disk.qcow2")
virtual_bytes=$(qemu-img info --output=json "$dest/disk.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
steps=$(for k in "${!seconds[@]}"; do printf '%s=%s\n' "$k" "${seconds[$k]}"; done)
build_seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
python3 - "$dest/manifest.json" <<EOF
import json, sys
steps = dict(line.split("=", 1) for line in """$steps""".split() if line)
versions = dict(line.split("=", 1) for line in """$versions""".split() if line)
json.dump({
    "hash": "$hash",
    "suite": "$suite",
    "mirror": "$mirror",
    "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "build_seconds": float("$build_seconds"),
    "step_seconds": {k: float(v) for k, v in sorted(steps.items())},
    "kernel_version": "$kver",
    "packages": "${packages[*]}".split(),
    "installed_package_count": int("$pkg_count"),
    "versions": versions,
    "tree_bytes": int("$tree_bytes"),
    "qcow2_bytes": int("$qcow2_bytes"),
    "virtual_bytes": int("$virtual_bytes"),
    "kernel_bytes": $(stat -c %s "$dest/vmlinuz"),
    "initrd_bytes": $(stat -c %s "$dest/initrd.img"),
    "files": {
        "disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img",
        "client_key": "id_ed25519", "host_public_key": "ssh_host_ed25519_key.pub",
    },
}, open(sys.argv[1], "w"), indent=2)
EOF
echo "=== done in $build_seconds s" >>"$log"
cp -f "$log" "$dest/build.log"

# QEMU runs as libvirt-qemu: everything but the private keys is world-readable.
chmod 755 "$dest"
chmod 644 "$dest"/*
chmod 600 "$dest/id_ed25519" "$dest/ssh_host_ed25519_key"
mv -T "$dest" "$out"
rm -f "$cache/$hash.failed.log"

# Keep the three newest images (other checkouts may use other versions of this script);
# never remove one that a running process (QEMU) has open.
find "$cache" -mindepth 1 -maxdepth 1 -type d -regextype egrep -regex '.*/[0-9a-f]{16}' \
    -printf '%T@ %p\n' | sort -rn | tail -n +4 | cut -d' ' -f2- | while read -r old; do
    if ! find /proc/[0-9]*/fd -lname "$old/*" -print -quit 2>/dev/null | grep -q .; then
        rm -rf --one-file-system "$old" "$old.failed.log"
    fi
done
echo "$out"

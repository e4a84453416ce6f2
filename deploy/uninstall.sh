#!/usr/bin/env bash
# Removes the emotion-agent service and its virtualenv. Keeps /etc/emotion-agent (config and
# secrets), /var/lib/emotion-agent and the emotion-agent user unless --purge.
# Usage: sudo deploy/uninstall.sh [--root DIR] [--purge] [--no-systemctl]
set -eu

root=/
purge=0
use_systemctl=1
die() { echo "uninstall.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        --purge) purge=1; shift ;;
        --no-systemctl) use_systemctl=0; shift ;;
        -h|--help) sed -n "2,/^set -eu$/{/^#/p}" "$0"; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done
[ -d "$root" ] || die "root directory not found: $root"
root=$(cd "$root" && pwd)
root=${root%/}  # "" for the live system
is_live_root=0
[ -z "$root" ] && is_live_root=1
if [ "$is_live_root" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo), or use --root DIR"
fi
live_systemctl=0
[ "$use_systemctl" = 1 ] && [ "$is_live_root" = 1 ] && live_systemctl=1

units=$root/etc/systemd/system
if [ "$live_systemctl" = 1 ]; then
    # Not installed (any more) is fine: uninstalling twice must work.
    systemctl disable --now emotion-agent.service 2>/dev/null || true
    # The instances' enablement links go with the rm below (as `disable` would remove them).
    systemctl stop 'emotion-agent@*.service' 2>/dev/null || true
fi
rm -f "$units/emotion-agent.service" "$units/emotion-agent@.service" \
      "$units/multi-user.target.wants/emotion-agent.service" "$units"/multi-user.target.wants/emotion-agent@*.service
if [ "$live_systemctl" = 1 ]; then
    systemctl daemon-reload
    systemctl reset-failed emotion-agent.service 'emotion-agent@*.service' 2>/dev/null || true
fi
rm -rf "$root/opt/emotion-agent"
if [ "$purge" = 1 ]; then
    rm -rf "$root/etc/emotion-agent" "$root/var/lib/emotion-agent"
    if [ "$is_live_root" = 1 ] && id emotion-agent >/dev/null 2>&1; then
        userdel emotion-agent
    fi
    echo "removed emotion-agent, its configuration, its state and its user"
else
    echo "removed emotion-agent; kept $root/etc/emotion-agent (use --purge to remove it)"
fi

#!/usr/bin/env bash
# Installs (or upgrades) emotion-agent as a systemd service:
#   virtualenv /opt/emotion-agent/venv, config /etc/emotion-agent/config.yaml (never overwritten),
#   secrets /etc/emotion-agent/env (mode 600), units /etc/systemd/system/emotion-agent.service and
#   emotion-agent@.service (one more camera each, configured by /etc/emotion-agent/NAME.yaml).
# Usage: sudo deploy/install.sh [--root DIR] [--source DIR] [--no-systemctl]
#                               [--system-site-packages] [--pip-args "ARGS"]
#   --root DIR      install under DIR instead of / (tests); no user, no systemctl there
#   --source DIR    the project checkout (default: the one this script is in)
#   --no-systemctl  do not reload/enable/restart the service (containers, image builds)
set -eu

root=/
source_dir=$(cd "$(dirname "$0")/.." && pwd)
use_systemctl=1
venv_args=()
pip_args=()

die() { echo "install.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        --source) source_dir=${2:?--source needs a directory}; shift 2 ;;
        --no-systemctl) use_systemctl=0; shift ;;
        --system-site-packages) venv_args+=(--system-site-packages); shift ;;
        --pip-args) read -r -a pip_args <<< "${2?--pip-args needs a value}"; shift 2 ;;
        -h|--help) sed -n "2,/^set -eu$/{/^#/p}" "$0"; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done
[ -f "$source_dir/pyproject.toml" ] || die "no pyproject.toml in $source_dir (use --source)"
[ -d "$root" ] || die "root directory not found: $root"
root=$(cd "$root" && pwd)
root=${root%/}  # "" for the live system
prefix=$root/opt/emotion-agent
etc=$root/etc/emotion-agent
unit_dir=$root/etc/systemd/system
is_live_root=0
[ -z "$root" ] && is_live_root=1

if [ "$is_live_root" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo), or use --root DIR for a scratch install"
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || die "needs python3 >= 3.10 (found: $(python3 --version 2>&1))"

echo "==> virtualenv in $prefix/venv"
mkdir -p "$prefix"
python3 -m venv ${venv_args[@]+"${venv_args[@]}"} "$prefix/venv" \
    || die "cannot create a virtualenv (on Debian/Raspberry Pi OS: apt install python3-venv)"
# Build from a copy: an in-tree build would leave build/ and *.egg-info, owned by root, in the checkout.
build_dir=$(mktemp -d)
trap 'rm -rf "$build_dir"' EXIT
tar -C "$source_dir" --exclude=./.git --exclude=./build --exclude='./*.egg-info' --exclude=./.pytest_cache \
    --exclude=./.venv -cf - . | tar -C "$build_dir" -xf -
"$prefix/venv/bin/python" -m pip install --quiet --upgrade ${pip_args[@]+"${pip_args[@]}"} "$build_dir"
install -m 0644 "$source_dir/README.md" "$prefix/README.md"

if [ "$is_live_root" = 1 ]; then
    if ! id emotion-agent >/dev/null 2>&1; then
        echo "==> system user emotion-agent (in group video)"
        groups=()
        getent group video >/dev/null && groups=(--groups video)
        useradd --system --user-group --home-dir /var/lib/emotion-agent --no-create-home \
            --shell /usr/sbin/nologin ${groups[@]+"${groups[@]}"} emotion-agent
    fi
else
    # useradd --root would need root and a passwd file under DIR; the unit's User= is created
    # on the machine that runs it.
    echo "==> scratch root: the emotion-agent user is created only on a live install"
fi

echo "==> configuration in $etc"
install -d -m 0750 "$etc"
if [ -e "$etc/config.yaml" ]; then
    echo "    keeping the existing $etc/config.yaml"
else
    install -m 0640 "$source_dir/config.yaml" "$etc/config.yaml"
fi
if [ ! -e "$etc/env" ]; then
    ( umask 077; printf '%s\n' '# Secrets for emotion-agent, read by systemd (keep mode 600).' \
        '# EMOTION_AGENT_MQTT_PASSWORD=' > "$etc/env" )
fi
if [ "$is_live_root" = 1 ]; then
    chown root:emotion-agent "$etc" "$etc/config.yaml"
    chown root:root "$etc/env"
fi
# The same validation as `run`, of the main config and of every instance's (emotion-agent@NAME
# reads NAME.yaml): a bad config stops here, before a service is (re)started with the new code.
for config in "$etc"/*.yaml; do  # config.yaml at least, installed above
    "$prefix/venv/bin/emotion-agent" check-config "$config" || die "fix $config, then run this again"
done

echo "==> units $unit_dir/emotion-agent.service and emotion-agent@.service"
install -d "$unit_dir"
upgrade=0
[ -e "$unit_dir/emotion-agent.service" ] && upgrade=1
install -m 0644 "$source_dir/deploy/emotion-agent.service" "$unit_dir/emotion-agent.service"
# One more camera per instance: emotion-agent@kitchen runs with /etc/emotion-agent/kitchen.yaml.
# The template is the unit above with its description and config file changed, made from it so
# the two cannot drift apart; the unit's header comment, above [Unit], gives way to its own. (Not
# '1,/^\[Unit\]$/': that looks for [Unit] from line 2 on, and on a unit with no header comment it
# would take in the whole file and drop every comment.)
sed -e '/^\[Unit\]$/,$!{/^#/d;}' \
    -e 's|^Description=emotion-agent: |Description=emotion-agent %i: |' \
    -e 's|--config /etc/emotion-agent/config.yaml$|--config /etc/emotion-agent/%i.yaml|' \
    "$source_dir/deploy/emotion-agent.service" \
    | { printf '%s\n' '# emotion-agent@NAME: one more camera, configured by /etc/emotion-agent/NAME.yaml. Made by' \
                     '# deploy/install.sh from emotion-agent.service (see docs/deploy.md); local changes belong' \
                     '# in a drop-in (systemctl edit emotion-agent@NAME), not in this file.'; cat; } \
    > "$build_dir/emotion-agent@.service"
grep -q '^Description=emotion-agent %i: ' "$build_dir/emotion-agent@.service" \
    && grep -q -- '--config /etc/emotion-agent/%i.yaml$' "$build_dir/emotion-agent@.service" \
    || die "could not make emotion-agent@.service from emotion-agent.service (its Description= or ExecStart= changed?)"
install -m 0644 "$build_dir/emotion-agent@.service" "$unit_dir/emotion-agent@.service"

if [ "$use_systemctl" = 1 ] && [ "$is_live_root" = 1 ]; then
    systemctl daemon-reload
    if [ "$upgrade" = 1 ]; then
        # An upgrade replaces the running processes, and leaves alone a unit someone stopped or disabled.
        systemctl try-restart emotion-agent.service 'emotion-agent@*.service'
        echo "==> upgraded; running services restarted; logs: journalctl -u 'emotion-agent*' -f"
    else
        systemctl enable emotion-agent.service
        systemctl restart emotion-agent.service
        echo "==> running; logs: journalctl -u emotion-agent -f"
    fi
else
    echo "==> not started; on the device: systemctl daemon-reload && systemctl enable --now emotion-agent"
fi

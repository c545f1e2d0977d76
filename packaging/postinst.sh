#!/bin/sh
# After unpacking: make the venv for this system's python3 from the shipped wheels (offline),
# create the service user, make systemd see the (new) unit, and restart the service on an
# upgrade if it was running. A fresh install is not started: it needs a coordinator and
# its key in /etc/gpu-agent/agent.toml first.
# Triggered by a change of /usr/bin/python3 (an upgrade of python3, as from Debian 12 to
# 13): remake the venvs for the new python3 now, not at the service's next start, and
# restart a running service on the new one.
set -e
remade=
if [ "$1" = configure ] || [ "$1" = triggered ]; then
    remade=$(/usr/lib/gpu-agent/make-venv)
    [ -z "$remade" ] || echo "$remade"
fi
if [ "$1" = configure ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers /usr/lib/sysusers.d/gpu-agent.conf
    else
        # No systemd-sysusers (a container, a system without systemd): the same user and
        # groups as gpu-agent.sysusers, made with the shadow tools (package passwd).
        for group in docker video render; do
            getent group "$group" >/dev/null || groupadd --system "$group"
        done
        if ! getent passwd gpu-agent >/dev/null; then
            getent group gpu-agent >/dev/null || groupadd --system gpu-agent
            useradd --system --gid gpu-agent --home-dir /var/lib/gpu-agent --no-create-home \
                --shell /usr/sbin/nologin --comment "GPU provider agent" gpu-agent
        fi
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
    if { [ "$1" = configure ] && [ -n "$2" ]; } || { [ "$1" = triggered ] && [ -n "$remade" ]; }
    then
        # deb-systemd-invoke honours policy-rc.d (a chroot or image build that must not
        # start services); try-restart leaves a stopped service stopped.
        deb-systemd-invoke try-restart gpu-agent.service >/dev/null || true
    fi
fi

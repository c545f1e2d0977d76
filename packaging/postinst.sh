#!/bin/sh
# After unpacking: create the service user, make systemd see the (new) unit, and restart
# the service on an upgrade if it was running. A fresh install is not started: it needs
# a coordinator and its key in /etc/gpu-agent/agent.toml first.
set -e
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers /usr/lib/sysusers.d/gpu-agent.conf
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if [ "$1" = configure ] && [ -n "$2" ]; then
        systemctl try-restart gpu-agent.service || true
    fi
fi

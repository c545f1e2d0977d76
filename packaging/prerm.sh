#!/bin/sh
# Before removal (not upgrade): stop and disable the service. Jobs it was running get
# their grace period and are reported interrupted, as on any stop. systemctl itself, not
# deb-systemd-helper: an admin enabled the unit (the package never does), and the helper
# only undoes what it did.
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl disable --now gpu-agent.service || true
fi

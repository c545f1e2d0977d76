#!/bin/sh
# After removal: remove the venvs make-venv made (they are not dpkg's files), and forget
# the unit. The node's identity and ledger in /var/lib/gpu-agent are kept, even on purge:
# deleting them would turn this machine into a new node.
set -e
case "$1" in
    remove|purge)
        rm -rf /opt/gpu-agent/venv /opt/gpu-agent/venv.* /opt/gpu-agent/.venv.new \
            /opt/gpu-agent/tray-venv /opt/gpu-agent/tray-venv.* /opt/gpu-agent/.tray-venv.new \
            /opt/gpu-agent/.lock
        rmdir /opt/gpu-agent 2>/dev/null || true
        ;;
esac
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi

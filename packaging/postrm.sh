#!/bin/sh
# After removal: forget the unit. The node's identity and ledger in /var/lib/gpu-agent
# are kept, even on purge: deleting them would turn this machine into a new node.
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi

#!/bin/sh
# After unpacking: make the tray's venv (/opt/gpu-agent/tray-venv) from gpu-agent's wheels
# and the tray's, offline. The service's own venv is left as it is.
set -e
if [ "$1" = configure ]; then
    /usr/lib/gpu-agent/make-venv
fi

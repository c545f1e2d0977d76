#!/bin/sh
# After removal: remove the tray's venv (make-venv made it: it is not dpkg's). gpu-agent's
# venv, which a running service uses, is not touched.
set -e
case "$1" in
    remove|purge)
        rm -rf /opt/gpu-agent/tray-venv /opt/gpu-agent/tray-venv.* /opt/gpu-agent/.tray-venv.new
        ;;
esac

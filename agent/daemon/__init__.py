"""The daemon: wiring and lifecycle (``main``), its answers to control requests
(``control``), the Prometheus endpoint (``metrics``) and systemd's notify protocol
(``systemd``)."""

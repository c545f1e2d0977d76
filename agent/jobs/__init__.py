"""Jobs on the node: the manager that carries offers through to receipts (``manager``), the
ledger they are kept in (``ledger``), their logs (``logs``), which job goes next and on
which GPUs (``scheduler``, ``gpus``), and ``gpu-agent run-local`` (``run_local``)."""

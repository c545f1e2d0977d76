"""The local control API, both ends: the wire format (``wire``), the socket file and who
may connect (``socket_file``), the server and the client, and the CLI commands built on the
client (``cli``, ``args``). Reaches neither hal nor sandbox: the tray app stands on it."""

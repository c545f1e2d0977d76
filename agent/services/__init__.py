"""The node's services: servers that run until their lease ends (``supervisor``: probed,
restarted, stopped; ``health``: what each probe means), reached by the coordinator
through the node's own outbound connection (``tunnel``: streams carried to them)."""

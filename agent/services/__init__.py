"""The node's services: what the coordinator reaches on the node, through the node's own
outbound connections (``tunnel``: streams carried to local services)."""

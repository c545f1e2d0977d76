"""The node's link to its coordinator: the websocket driver (``connection``), the durable
outbox of what must be delivered (``outbox``) and the node's key (``identity``)."""

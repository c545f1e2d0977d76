"""Files that hold a private key: read only when they are private and ours, created
atomically. A library, as hal and sandbox are: the agent (its node key) and the
coordinator (its signing key) both use it, and it imports neither."""

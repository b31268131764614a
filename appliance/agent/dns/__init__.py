"""The resolver each node runs on its own mesh addresses: mesh names from memory,
everything else forwarded (zone.py: what it serves; server.py: the sockets)."""

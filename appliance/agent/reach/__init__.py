"""Reachability: how a node reaches its peers (port mapping, STUN, hole punching, the relay)."""

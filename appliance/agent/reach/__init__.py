"""Reachability from afar: port mapping on the home router, STUN endpoint discovery, the relay."""

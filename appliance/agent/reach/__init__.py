"""Reachability from afar: port mapping on the home router, endpoint discovery, relay."""

"""Clients of meshpi's local services, with no server code in them: what the CLI,
the web UI and first boot use to talk to a running agent (`localapi`).
"""

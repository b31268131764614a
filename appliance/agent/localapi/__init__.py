"""The LocalAPI: HTTP/JSON on a unix socket for the CLI and the web UI (LOCALAPI.md).
Handlers see the agent through narrow read-only views, never the agent itself."""

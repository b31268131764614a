"""Stock WireGuard clients (phones) this node hosts."""

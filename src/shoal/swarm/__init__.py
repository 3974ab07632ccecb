"""swarm layer; see docs/architecture.md."""

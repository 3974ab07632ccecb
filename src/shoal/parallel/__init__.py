"""parallel layer; see docs/architecture.md."""

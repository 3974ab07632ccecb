"""compress layer; see docs/architecture.md."""

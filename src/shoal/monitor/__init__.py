"""monitor layer; see docs/architecture.md."""

"""testbed layer; see docs/architecture.md."""

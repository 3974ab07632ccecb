"""parallel/tensor layer; see docs/architecture.md."""

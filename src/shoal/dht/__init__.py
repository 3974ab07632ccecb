"""dht layer; see docs/architecture.md."""

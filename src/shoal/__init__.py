"""Shoal: train one neural network on a swarm of unreliable computers joined by slow links.

The package is layered; imports only point down (see docs/architecture.md):

    cli -> train -> {parallel, state, monitor} -> swarm -> dht -> net
    compress and models are leaves used from above; testbed builds test networks.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

"""Suite-wide settings. Peers in tests share two cores; spinning OpenMP threads would starve
them (see shoal.cli.main), so torch is told to wait passively before anything imports it."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

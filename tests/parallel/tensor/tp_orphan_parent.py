"""A launcher process for the orphan test: starts a hanging 2-rank group and waits forever.

Run as ``python tp_orphan_parent.py PID_DIR``; the test kills it with SIGKILL and checks that
its ranks die with it.
"""

from __future__ import annotations

import sys

import tp_rank_checks as rc

from shoal.parallel.tensor import LaunchConfig, launch_tp_group

if __name__ == "__main__":
    launch_tp_group(2, rc.hang, (sys.argv[1],), config=LaunchConfig(run_timeout_s=600.0))

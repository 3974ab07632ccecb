"""``Host``: one namespace of a testbed and the processes started in it."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Any, Literal

from shoal.testbed.netns import TestbedError, netns_exec_argv

__all__ = ["Host"]

Role = Literal["public", "router", "lan"]


class Host:
    """A host (or router) of a testbed: run processes inside its network namespace."""

    def __init__(
        self, *, name: str, netns: str, address: str, public_address: str, role: Role
    ) -> None:
        self.name = name
        self.netns = netns
        self.address = address
        """The host's own address."""
        self.public_address = public_address
        """The address hosts on the internet segment see (its router's WAN address if NATed)."""
        self.role = role
        self._procs: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.role}, {self.address})"

    @property
    def argv_prefix(self) -> tuple[str, ...]:
        """What runs a command inside this host when put before its argv."""
        return tuple(netns_exec_argv(self.netns, []))

    def exec(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float = 30.0,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host and wait for it (text output captured).

        Raises:
            TestbedError: it did not finish within ``timeout_s``, or (``check``) it failed.
        """
        try:
            done = subprocess.run(
                netns_exec_argv(self.netns, argv),
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TestbedError(f"{self.name}: {list(argv)} timed out after {timeout_s}s") from exc
        if check and done.returncode != 0:
            raise TestbedError(
                f"{self.name}: {list(argv)} exited {done.returncode}: {done.stderr.strip()[-2000:]}"
            )
        return done

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this host; the testbed stops it at teardown.

        ``kwargs`` go to ``subprocess.Popen`` (e.g. ``stdout=subprocess.PIPE, text=True``).
        """
        proc = subprocess.Popen(netns_exec_argv(self.netns, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def stop_processes(self, timeout_s: float) -> None:
        """Terminate what ``popen`` started (SIGKILL after ``timeout_s``); reap them."""
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

"""Child-process launchers (zfabric/_process.py): readiness is the new child's, even right after a kill."""

from __future__ import annotations

import re
import sys

import pytest

from zfabric._process import ChildProcess

READY_AFTER = """
import subprocess, sys, time
{before}
print("READY", flush=True)
time.sleep(60)
"""


class Scripted(ChildProcess):
    READY = re.compile(r"^READY")
    what = "scripted child"

    def run_script(self, before: str) -> Scripted:
        self.args = [sys.executable, "-c", READY_AFTER.format(before=before)]
        return self.start()


@pytest.mark.timeout(30)
def test_a_restart_waits_for_the_new_childs_ready_line_not_the_old_childs_end_of_output() -> None:
    """The end of a killed child's output arrives after the next start began (here a grandchild holds
    its stdout open for a second). That end must not pass for the new child's readiness; it did, and a
    supervisor or the demo restarting a sidecar under load failed with "did not become ready"."""
    child = Scripted([], ready_timeout=10)
    try:
        child.run_script('subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])')
        first = child.pid
        child.kill()
        child.run_script("time.sleep(2)")  # ready well after the old output ends
        assert child.pid != first
        assert child.proc is not None and child.proc.poll() is None
        assert child.output.count("READY\n") == 2
    finally:
        child.kill()

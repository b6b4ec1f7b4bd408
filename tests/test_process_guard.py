"""fedgov/process_guard.py and fedgov/instance_lock.py with real processes (no Flower): a
guard stops its groups when its holder is SIGKILLed, a dead predecessor's recorded helpers are
stopped (a reused pid is not), a lock dies with its holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fedgov.errors import FedgovError
from fedgov.instance_lock import hold_lock, release_lock
from fedgov.process_guard import _start_ticks, stop_leftovers

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _wait_dead(pid: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _start_ticks(pid) is None:
            return True
        time.sleep(0.1)
    return False


def test_a_guard_stops_its_groups_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import subprocess, sys, time\n"
                "from fedgov.process_guard import ProcessGuard\n"
                "guard = ProcessGuard()\n"
                f"helper = subprocess.Popen({SLEEPER!r}, start_new_session=True)\n"
                "guard.watch(helper.pid)\n"
                "print(helper.pid, guard.pid, flush=True)\n"
                "time.sleep(600)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    helper, guard = (int(pid) for pid in holder.stdout.readline().split())
    try:
        assert _start_ticks(helper) is not None
        holder.kill()  # SIGKILL: the holder cannot clean up
        holder.wait(timeout=30)
        assert _wait_dead(helper), "the helper outlived its killed holder"
        assert _wait_dead(guard), "the guard did not exit"
    finally:
        for pid in (helper, guard):
            if _start_ticks(pid) is not None:
                os.kill(pid, signal.SIGKILL)


def test_leftovers_are_stopped_but_a_reused_pid_is_not():
    leftover = subprocess.Popen(SLEEPER, start_new_session=True)
    other = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        recorded = {
            "supernode": {"pid": leftover.pid, "pid_start": _start_ticks(leftover.pid)},
            # the pid of a live process, but another start time: not the recorded helper
            "superexec": {"pid": other.pid, "pid_start": (_start_ticks(other.pid) or 0) - 1},
            "broken": {"pid": "x"},
        }
        assert stop_leftovers(recorded, grace=5) == ["supernode"]
        assert leftover.wait(timeout=30) == -signal.SIGTERM
        assert other.poll() is None
    finally:
        for process in (leftover, other):
            process.kill()
            process.wait()


def test_a_lock_refuses_a_second_holder_and_dies_with_the_first(tmp_path):
    lock = tmp_path / "daemon.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import time\n"
                "from fedgov.instance_lock import hold_lock\n"
                f"hold_lock({str(lock)!r}, 'held by {{pid}}')\n"
                "print('held', flush=True)\n"
                "time.sleep(600)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    try:
        with pytest.raises(FedgovError, match=f"^site x: runs as pid {holder.pid}$"):
            hold_lock(lock, "site x: runs as pid {pid}")
    finally:
        holder.kill()
        holder.wait()
    hold_lock(lock, "unexpected: {pid}")  # the kernel dropped the dead holder's lock
    assert lock.read_text().strip() == str(os.getpid())
    release_lock(lock)


def test_an_exited_helper_not_yet_collected_counts_as_stopped():
    """A helper that exits on SIGTERM stays a zombie until its parent waits for it; stopping
    its group must see it gone (not wait out the grace period), and the exit status is kept."""
    from fedgov.process_guard import _group_alive, stop_groups

    helper = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        assert _group_alive(helper.pid)
        os.kill(helper.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(f"/proc/{helper.pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.05)
        os.killpg(helper.pid, 0)  # the kernel still lists the group: the old check said alive
        assert not _group_alive(helper.pid)
        stop_groups([helper.pid], grace=600)  # returns at once: nothing is left to stop
        assert helper.wait(timeout=5) == -signal.SIGTERM
    finally:
        helper.kill()
        helper.wait()

"""Loaded by every Python of a foreign-platform run (run_all.py; PYTHONPATH names this
folder): fcntl loses the Linux-only lease calls and os the calls that choose a thread's
CPUs, as on macOS and the BSDs, where they do not exist, and select its poll(), as in
Python builds for macOS without it. /proc is hidden by the run
itself: an empty tmpfs mounted over it in a mount namespace of its own (unshare), as on a
host that has none."""

import fcntl
import os
import select

for name in ("F_SETLEASE", "F_GETLEASE"):
    if hasattr(fcntl, name):
        delattr(fcntl, name)

for name in ("sched_getaffinity", "sched_setaffinity"):
    if hasattr(os, name):
        delattr(os, name)

if hasattr(select, "poll"):
    del select.poll

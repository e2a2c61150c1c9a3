"""Run tests/run.py on every Python 3.6+ interpreter found, then print one closing line.

Interpreters: every python3.X under $(pyenv root)/versions/*/bin and every python3.X on
PATH, one per minor version (pyenv's first). PYTHONS="path ..." names them instead.
Closing line: 'N passed, N failed, N skipped' summed over the interpreters.
"""

import glob
import os
import re
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
PROBE = "import sys; print('%d.%d' % sys.version_info[:2], sys.executable)"


def candidates():
    if os.environ.get("PYTHONS"):
        return os.environ["PYTHONS"].split()
    found = []
    root = pyenv_root()
    if root:
        found += sorted(glob.glob(os.path.join(root, "versions", "*", "bin", "python3.*")))
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        found += sorted(glob.glob(os.path.join(directory, "python3.*")))
    return [p for p in found if re.search(r"python3\.\d+$", p) and os.access(p, os.X_OK)]


def pyenv_root():
    if os.environ.get("PYENV_ROOT"):
        return os.environ["PYENV_ROOT"]
    try:
        return subprocess.check_output(["pyenv", "root"], stderr=subprocess.DEVNULL,
                                       timeout=10).decode().strip()
    except (OSError, subprocess.SubprocessError):
        default = os.path.expanduser("~/.pyenv")
        return default if os.path.isdir(default) else None


def interpreters():
    """{(major, minor): path} for every working interpreter of 3.6 or newer."""
    chosen = {}
    for path in candidates():
        try:
            out = subprocess.check_output([path, "-c", PROBE], stderr=subprocess.DEVNULL,
                                          timeout=30).decode().split()
        except (OSError, subprocess.SubprocessError):
            continue   # e.g. a pyenv shim for a version that is not selected
        version = tuple(int(x) for x in out[0].split("."))
        if version >= (3, 6) and version not in chosen:
            chosen[version] = path
    return chosen


def main():
    found = interpreters()
    if not found:
        print("no Python 3.6+ interpreter found")
        print("0 passed, 1 failed")
        return 1
    totals = [0, 0, 0]
    for version in sorted(found):
        print("=== Python %d.%d: %s" % (version + (found[version],)), flush=True)
        done = subprocess.run([found[version], os.path.join(TESTS, "run.py")],
                              stdout=subprocess.PIPE)
        out = done.stdout.decode("utf-8", "replace")
        match = re.search(r"^RESULT (\d+) (\d+) (\d+)$", out, re.M)
        counts = [int(x) for x in match.groups()] if match else [0, 1, 0]
        if done.returncode != 0 and counts[1] == 0:
            counts[1] = 1   # crashed or ran nothing: never a silent pass
        print("--- Python %d.%d: %d passed, %d failed, %d skipped"
              % (version + tuple(counts)), flush=True)
        totals = [a + b for a, b in zip(totals, counts)]
    print("interpreters: %s" % " ".join("%d.%d" % v for v in sorted(found)))
    print("%d passed, %d failed, %d skipped" % tuple(totals))
    return 1 if totals[1] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Run tests/run.py on every Python 3.6+ interpreter found, then print one closing line.

Interpreters: every python3.X under $(pyenv root)/versions/*/bin and every python3.X on
PATH, one per minor version (pyenv's first). PYTHONS="path ..." names them instead.
They run side by side, S3PUSH_TEST_JOBS at a time (default: twice the cores, as a suite
waits on its servers and writers much of the time), each with its own ports
(S3PUSH_TEST_PORTS), temporary folders and servers; the output of each is printed as one
block when it is done. The soak tests run in full on the oldest and the
newest interpreter and as one short round on those in between (S3PUSH_TEST_SOAK, see
helpers.soak). make test adds, on the oldest and the newest, a foreign-platform run
(FOREIGN_MODULES, as root: see helpers.FOREIGN). Closing line: 'N passed, N failed'
summed over the interpreters (skips on the line before).

--server rgw|moto|localstack: start Ceph RGW, moto with IAM enforced, or LocalStack's S3
once and run the suites that talk to a server (SERVER_MODULES; LocalStack, which checks
no signature, only the checksum tests) against it. LocalStack on every interpreter; RGW
and moto each on the oldest, the newest and every other one in between (RGW the 1st,
3rd, ..., moto the 2nd, 4th, ...), so that each interpreter meets a strict server and
make test-all stays within CI's time.
--python-at-least 3.X: print the newest interpreter found of 3.X or later (make installs
LocalStack, which needs 3.12, with it).
"""

import glob
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
SERVER_MODULES = ("test_integration test_faults test_writers test_security test_operations "
                  "test_resume test_handover test_compress test_checksums")
MODULES_FOR = {"localstack": "test_checksums "   # and a crash window under If-None-Match
                              "test_handover.Handover.test_killed_after_the_confirmation_"
                              "under_if_exists_keep_and_number"}
# The foreign-platform run (make test, on the oldest and the newest interpreter, as root):
# these suites again with fcntl's lease calls absent and /proc an empty tmpfs in a mount
# namespace of the run's own, as on macOS and the BSDs (helpers.FOREIGN).
FOREIGN_MODULES = ("test_integration test_handover test_accounts test_security.HostileWriter "
                   "test_security.BadInput test_faults.ChangingFiles test_writers.WritersUnseen")
FOREIGN_WRAP = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount -t tmpfs -o ro,size=4k s3push-no-proc /proc && exec "$@"', "sh"]
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


def chosen_for(found, kind):
    """[(version, soak: "full", "short" or "foreign")] to run, oldest and newest first (the
    longest); the foreign-platform runs (make test only) last."""
    versions = sorted(found)
    ends, middle = versions[:1] + versions[-1:], versions[1:-1]
    if kind == "rgw":
        middle = middle[0::2]
    elif kind == "moto":
        middle = middle[1::2]
    foreign = [(v, "foreign") for v in sorted(set(ends))] if kind is None else []
    return [(v, "full") for v in sorted(set(ends))] + [(v, "short") for v in middle] + foreign


def foreign_run(env):
    """(argv prefix, environment) of a foreign-platform run, or a reason it cannot be."""
    if os.geteuid() != 0:
        return "it needs root, for a mount namespace that hides /proc"
    if subprocess.run(FOREIGN_WRAP + ["true"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode != 0:
        return "unshare or mount failed: no mount namespace here"
    return FOREIGN_WRAP, dict(env, S3PUSH_TEST_FOREIGN="1", S3PUSH_TEST_SOAK="short",
                              PYTHONPATH=os.path.join(TESTS, "foreign"),
                              S3PUSH_TEST_MODULES=FOREIGN_MODULES)


def run_one(version, path, soak, env, slot):
    """Run the suite on one interpreter; (its output, (passed, failed, skipped))."""
    env = dict(env or os.environ, S3PUSH_TEST_SOAK=soak,
               S3PUSH_TEST_PORTS="%d-%d" % (10000 + 2000 * slot, 12000 + 2000 * slot))
    prefix = []
    if soak == "foreign":
        answer = foreign_run(env)
        if isinstance(answer, str):
            return ("=== Python %d.%d: foreign-platform run skipped: %s\n" % (version + (
                answer,)), [0, 0, 1])
        prefix, env = answer
    started = time.monotonic()
    with tempfile.TemporaryFile() as log:
        done = subprocess.run(prefix + [path, os.path.join(TESTS, "run.py")], stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.seek(0)
        out = log.read().decode("utf-8", "replace")
    match = re.search(r"^RESULT (\d+) (\d+) (\d+)$", out, re.M)
    counts = [int(x) for x in match.groups()] if match else [0, 1, 0]
    if done.returncode != 0 and counts[1] == 0:
        counts[1] = 1   # crashed or ran nothing: never a silent pass
    what = "foreign-platform run: no lease, no /proc" if soak == "foreign" else \
        "soak tests: " + soak
    block = "=== Python %d.%d: %s (%s)\n%s--- Python %d.%d: %d passed, %d " \
            "failed, %d skipped in %.0f s\n" % (version + (path, what, out) + version +
                                                  tuple(counts) + (time.monotonic() - started,))
    return block, counts


def run_everywhere(found, env, kind=None):
    """Run the suite on the chosen interpreters, side by side; (passed, failed, skipped)."""
    todo = chosen_for(found, kind)
    totals, lock = [0, 0, 0], threading.Lock()
    jobs = int(os.environ.get("S3PUSH_TEST_JOBS") or 2 * (os.cpu_count() or 1))

    def work(slot):
        while True:
            with lock:
                if not todo:
                    return
                version, soak = todo.pop(0)
            block, counts = run_one(version, found[version], soak, env, slot)
            with lock:
                sys.stdout.write(block)
                sys.stdout.flush()
                for i, count in enumerate(counts):
                    totals[i] += count
    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return totals


def shared_server(kind):
    """A server started once for every interpreter's run, and the environment naming it."""
    sys.path.insert(0, TESTS)
    import s3server
    servers = {"rgw": s3server.RgwServer, "moto": s3server.MotoServer,
               "localstack": s3server.LocalStackServer}
    if kind not in servers:
        raise SystemExit("unknown --server %r (known: %s)" % (kind, " ".join(sorted(servers))))
    server = servers[kind]()
    env = dict(os.environ, S3PUSH_TEST_ENDPOINT=server.endpoint,
               S3PUSH_TEST_BUCKET=server.bucket, S3PUSH_TEST_ACCESS_KEY_ID=server.access_key,
               S3PUSH_TEST_SECRET_ACCESS_KEY=server.secret_key, S3PUSH_TEST_SERVER_KIND=kind,
               S3PUSH_TEST_MODULES=MODULES_FOR.get(kind, SERVER_MODULES))
    if server.reader_key:
        env.update(S3PUSH_TEST_READER_ACCESS_KEY_ID=server.reader_key[0],
                   S3PUSH_TEST_READER_SECRET_ACCESS_KEY=server.reader_key[1])
    return server, env


def main(argv):
    found = interpreters()
    if len(argv) == 2 and argv[0] == "--python-at-least":
        wanted = tuple(int(x) for x in argv[1].split("."))
        newer = [version for version in found if version >= wanted]
        if not newer:
            sys.stderr.write("no Python %s or newer found\n" % argv[1])
            return 1
        print(found[max(newer)])
        return 0
    if not found:
        print("no Python 3.6+ interpreter found")
        print("0 passed, 1 failed")
        return 1
    kind = argv[1] if len(argv) == 2 and argv[0] == "--server" else None
    server, env = None, None
    if kind is not None:
        print("starting the %s server for every interpreter" % kind, flush=True)
        server, env = shared_server(kind)
    try:
        totals = run_everywhere(found, env, kind)
    finally:
        if server is not None:
            server.stop()
    print("interpreters: %s; %d skipped (named in each run's output)"
          % (" ".join("%d.%d%s" % (v + (" (foreign)" if soak == "foreign" else "",))
                      for v, soak in chosen_for(found, kind)), totals[2]))
    print("%d passed, %d failed" % tuple(totals[:2]))
    return 1 if totals[1] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What the integration test modules share: one server per test process, files, runs.

The server (see s3server.start_server) starts on first use and stops when the process
exits. The script runs as a subprocess with a cron-like environment: no LANG, an empty
HOME, credentials only from what the test sets.

TEST SEAMS: every way the suite reaches into the script or is steered from outside, here
and nowhere else. s3push.py has no test mode. Its seams are module globals and default
arguments that change nothing when left alone; a unit test sets them in its own process
(and puts them back), an integration test in a launcher of its own: `-c` code put in
place of LAUNCH at argv[1:3] of IntegrationCase.command (helpers.LAUNCH is the default,
the README's start from bytecode; test_integration.MovesFiles also starts it by path).

In s3push.py   (name, default: what it does; set by, for which tests)
  TAKE_LEASES   True: still_written asks for a read lease (fcntl.F_SETLEASE) before it
      looks in /proc; False: /proc alone answers. Set False by the launcher
      test_writers.NO_LEASES for test_writers.OpenWriters (each writer test again with
      leases=False: the /proc fallback), and in-process by test_writers.OpenWritersUnit.
  MOVE_SEAM     None; else seam(step, name) calls it at each step of a file's move:
      "compress" (after each block read into the gzip), "compressed" (the gzip spooled and
      checked, before it is sent), "confirmed" (the server confirmed the upload; nothing
      recorded yet), "written" (the ledger's line written, not yet fsync'ed: the worker
      sends its next file before it goes on), "recorded" (the ledger record fsync'ed and
      the manifest line written), "rename"
      (before the rename to the aside name), "check" (renamed aside, before it is checked
      again), "unlink" (just before the unlink: after "check", or where no aside name can
      be had, before the last stat of the name), under --archive-dir "archive" (DIR's folders
      made, before the link into DIR) and "archived" (linked into DIR, the aside name not yet
      unlinked), "removed" (unlinked, the ledger record not yet resolved). Set by the SEAMED
      launchers of test_handover (at SEAM_STEP, SEAM_ACTION=kill: SIGKILL itself, or rename:
      rename SEAM_NEW over the name, as a writer would) for test_handover.Handover (every
      step from "confirmed" to "removed") and test_handover.Archived (those and the two of
      --archive-dir),
      and of test_compress (at SEAM_STEP compress or compressed, the file at SEAM_PATH
      rewritten in place with SEAM_NEW's bytes, its mtime put back) for
      test_compress.Compress.test_a_file_rewritten_while_compressed_is_kept_and_never_mixed.
  ORDER_WINDOW, MAX_RUNS   10000 files held at once for the oldest-first order (beyond,
      spilled to sorted runs); 64 runs merged at once. Set (3 and 2) by the launcher
      test_operations.SMALL_WINDOW for test_operations.Order.test_oldest_files_go_first;
      MAX_RUNS in-process by
      test_units.Selection.test_oldest_first_in_windows_each_file_once.
  Ledger.compact_at   LEDGER_COMPACT (1 MiB): past it the ledger is written anew. Set to
      2000 on its ledger by test_units.Ledger.test_a_long_run_keeps_the_ledger_small.
  new_md5       hashlib's MD5, or None where FIPS forbids it. Replaced in-process by a
      lambda giving None in
      test_units.Journals.test_without_md5_crc32_uploads_still_keep_journals.
  WriterIndex(proc="/proc")   where the /proc view is read. A missing folder (no /proc) in
      test_writers.OpenWritersUnit.
  check_links(info, allowed, protected_path=PROTECTED_HARDLINKS)   the sysctl file of
      fs.protected_hardlinks. A file of its own (1, 0, missing) in
      test_units.Selection.test_hard_links_only_where_the_kernel_protects_them_or_allowed,
      and one holding 0 in a launcher of
      test_handover.Archived.test_killed_after_the_link_where_hard_links_are_not_protected
      (never the kernel's setting: the interpreters run side by side share it).
  ANSWER_TIME   900 s: an answer must be whole within it (or three --timeout). Set to 3 by
      a launcher of
      test_faults.SilentEndpoint.test_an_answer_trickled_a_byte_at_a_time_ends_at_its_deadline.
  load_deferred_modules()   the imports a run defers until it has a file to send. Called
      first by every module that calls s3push in-process (s3server, test_units,
      test_security, test_sigv4, test_writers).

The foreign-platform run (run_all.py, as root: make test on the oldest and the newest
Python; run_all.FOREIGN_MODULES names its tests). The Linux-only facilities are absent,
not skipped by a flag:
  tests/foreign/sitecustomize.py   loaded by every Python of the run through PYTHONPATH
      (run_all.foreign_run for run.py; IntegrationCase.env for each script run when
      FOREIGN): deletes fcntl.F_SETLEASE and F_GETLEASE (no lease, whatever TAKE_LEASES
      says), and os.sched_getaffinity and sched_setaffinity (a run's threads go where
      the kernel puts them: CpuPlacement).
  /proc   an empty read-only tmpfs over it, in the run's own mount namespace
      (run_all.FOREIGN_WRAP: unshare --mount): no /proc fallback, no /proc/self/fd.
  S3PUSH_TEST_FOREIGN=1   set by run_all.foreign_run: FOREIGN and skip_if_foreign here.
      Read by test_writers.OpenWriters (skipped: WritersUnseen stands in),
      test_writers.WritersUnseen (runs there only),
      test_integration.MovesFiles' test of the script started by its path (it reads
      /proc/PID/cmdline: skipped) and
      test_security.HostileWriter.test_hard_links_follow_the_kernel_s_protection (expects
      no protected_hardlinks file).

Environment variables. s3push.py reads one S3PUSH_ variable, and it is no seam:
S3PUSH_EXPECTED_BUCKET_OWNER, a setting like --expected-bucket-owner
(test_operations.Fleets). The rest are the suite's:
  S3PUSH_TEST_MODULES   run.py: the unittest names to run (default: every test_*.py).
      Set by run_all.py for --server runs (SERVER_MODULES, MODULES_FOR) and the foreign run.
  S3PUSH_TEST_VERBOSE, S3PUSH_TEST_TIMES   run.py: a line per test; the 25 slowest at the end.
  S3PUSH_TEST_JOBS      run_all.py: interpreters run side by side (default: twice the cores).
  S3PUSH_TEST_PORTS=LOW-HIGH   set by run_all.py for each of those; s3server.free_port
      draws the servers' and proxies' ports from it.
  S3PUSH_TEST_SOAK=full|short   set by run_all.py (full on the oldest and the newest
      Python); soak() below sizes the soak tests (test_faults.Chaos and Crashes,
      test_resume, test_security, test_operations.BandwidthLimit).
  S3PUSH_TEST_ENDPOINT, S3PUSH_TEST_BUCKET, S3PUSH_TEST_ACCESS_KEY_ID,
  S3PUSH_TEST_SECRET_ACCESS_KEY, S3PUSH_TEST_REGION, S3PUSH_TEST_READER_ACCESS_KEY_ID,
  S3PUSH_TEST_READER_SECRET_ACCESS_KEY   s3server.start_server: a running server to use
      (run_all.py --server sets all but the region, default us-east-1).
  S3PUSH_TEST_SERVER_KIND   s3server.server_kind: whose gaps (LACKS) skip tests. Set by
      run_all.py --server.
  S3PUSH_TEST_SERVER=rgw|moto|localstack, MINIO_BIN   s3server.start_server starts that
      server in this process instead of rclone's.
  S3PUSH_RCLONE         s3server: the rclone binary (default .testenv/rclone/bin/rclone).
  S3PUSH_FAKETIME       test_faults.faketime_library: a libfaketime of your own (default:
      what make test unpacked into .testenv/faketime), preloaded with FAKETIME=-20m or
      +20m by test_faults.Corrections.test_clock_20_minutes_behind and _ahead.
  PYTHONS, PYENV_ROOT   run_all.py: the interpreters to run on, or where pyenv keeps them.
  SEAM_STEP, SEAM_ACTION, SEAM_NEW, SEAM_PATH   read by the SEAMED launchers (above), set
      by their tests.
  BENCH_*               bench.py's own (see its docstring), not the suite's.
"""

import atexit
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3server  # noqa: E402

# What a test server does not check, and so cannot be tested against it.
LACKS = {
    "rclone": {"if-none-match": "rclone's server ignores If-None-Match",
               "tagging": "rclone's server keeps x-amz-tagging as a header; it has no "
                          "?tagging API to read tags back",
               "if-none-match-complete": "rclone's server ignores If-None-Match",
               "versioning": "rclone's server keeps no object versions"},
    "rgw": {"if-none-match-complete": "Ceph RGW 16 ignores If-None-Match on "
                                      "CompleteMultipartUpload (it honours it on PUT)",
            "sse-kms": "this Ceph RGW has no KMS: it refuses --sse aws:kms",
            "lock-multipart": "Ceph RGW 16 drops the Object Lock headers of "
                              "CreateMultipartUpload (it honours them on PUT)",
            "tagging-multipart": "Ceph RGW 16 drops the x-amz-tagging of "
                                 "CreateMultipartUpload (it honours it on PUT)"},
    "moto": {"clock": "moto does not check the request time",
             "content-md5": "moto does not check Content-MD5",
             "lock-multipart": "moto drops the Object Lock headers of "
                               "CreateMultipartUpload",
             "no-such-upload": "moto answers a part of an aborted upload with a bare 500, "
                               "not NoSuchUpload",
             "session-token": "moto checks session tokens against its own STS and refuses "
                              "the test's made-up ones"},
}


# A foreign-platform run (run_all.py): the Linux-only facilities are really absent, as on
# macOS and the BSDs: fcntl has no lease calls (foreign/sitecustomize.py, loaded by every
# Python through PYTHONPATH) and /proc is an empty tmpfs in the run's own mount namespace.
FOREIGN = os.environ.get("S3PUSH_TEST_FOREIGN") == "1"
FOREIGN_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "foreign")


def skip_if_foreign(reason):
    return unittest.skipIf(FOREIGN, "foreign-platform run: " + reason)


def skip_unless_server_checks(feature):
    reason = LACKS.get(s3server.server_kind(), {}).get(feature)
    return unittest.skipIf(reason is not None, reason)


# s3push.py loaded from its bytecode (compiled once, kept in __pycache__): half the CPU of
# a start by path, which compiles the whole file each time; hundreds of runs a suite.
LAUNCH = ("import sys; sys.path[:0] = [%r]; import s3push; sys.argv[0] = s3push.__file__; "
          "sys.exit(s3push.main())" % s3server.REPO)
RUN_TIMEOUT = 120
# The soak tests (chaos, kill loops, --bwlimit, seeded swaps, a 100,000-file tree) run in
# full where S3PUSH_TEST_SOAK is unset or "full" (run_all.py: the oldest and the newest
# Python), and as one short round where it is "short" (the interpreters in between).
SOAK_FULL = os.environ.get("S3PUSH_TEST_SOAK", "full") != "short"


def soak(full, short):
    """The size of a soak test's round: full, or short on an interpreter in between."""
    return full if SOAK_FULL else short


OLD = time.time() - 3600   # mtime for files that are old enough for the default --min-age
_SERVERS = []


def server():
    """The test server of this process, started on first use."""
    if not _SERVERS:
        _SERVERS.append(s3server.start_server())
        atexit.register(_SERVERS[0].stop)
    return _SERVERS[0]


def write_file(root, relative, data, mtime=OLD):
    """Create root/relative (UTF-8 name, whatever the locale) with data and an old mtime."""
    path = os.path.join(os.fsencode(root), relative.encode("utf-8"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    os.utime(path, (mtime, mtime))
    return path


def files_under(root):
    """Relative paths (bytes) of every non-directory under root."""
    root = os.fsencode(root)
    found = []
    for directory, _, names in os.walk(root):
        found.extend(os.path.relpath(os.path.join(directory, n), root) for n in names)
    return sorted(found)


class WithArchive(object):
    """For the --archive-dir tests (before IntegrationCase among the bases): an empty
    archive folder, self.archive, and what it holds."""

    def setUp(self):
        super().setUp()
        self.archive = os.path.join(self.tmp, "archive")
        os.makedirs(self.archive)

    def empty_archive(self):
        shutil.rmtree(self.archive)
        os.makedirs(self.archive)

    def archived(self):
        """{relative path: bytes} of every file in the archive."""
        found = {}
        for relative in files_under(self.archive):
            with open(os.path.join(os.fsencode(self.archive), relative), "rb") as handle:
                found[os.fsdecode(relative)] = handle.read()
        return found


# A writer process: appends `bursts` bursts of `size` bytes (burst i is the byte 'A' + i
# repeated) to PATH, pausing `pause` seconds between them. "hold" keeps the file open the
# whole time; "reopen" opens, appends and closes for each burst; "wait" opens the file for
# appending, says "open" on stdout, and writes one burst when a line comes on stdin.
# (test_writers: writer detection; test_faults.IfExists: a writer that reopens.)
WRITER = r"""
import sys, time
path, mode = sys.argv[1:3]
bursts, size, pause = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
if mode == "wait":
    with open(path, "ab") as handle:
        print("open", flush=True)
        sys.stdin.readline()
        handle.write(b"A" * size)
    sys.exit(0)
handle = open(path, "ab") if mode == "hold" else None
for i in range(bursts):
    if i:
        time.sleep(pause)
    if mode == "reopen":
        handle = open(path, "ab")
    handle.write(bytes([65 + i]) * size)
    handle.flush()
    if mode == "reopen":
        handle.close()
handle.close()
"""


def written(bursts, size):
    """What WRITER leaves in its file after `bursts` bursts of `size` bytes."""
    return b"".join(bytes([65 + i]) * size for i in range(bursts))


class Result(object):
    def __init__(self, status, stdout, stderr):
        self.status = status
        self.stdout = stdout
        self.stderr = stderr


class IntegrationCase(unittest.TestCase):
    """A source directory, an empty HOME and a key prefix of its own for each test."""

    def setUp(self):
        self.server = server()
        # Every request of every test goes through a recording proxy (a FaultProxy that
        # breaks nothing), and proxies a test adds record too: tearDown checks them all.
        self.recorder = s3server.FaultProxy(self.server.endpoint)
        self.proxies = [self.recorder]
        self.tmp = tempfile.mkdtemp(prefix="s3push-test-")
        self.source = os.path.join(self.tmp, "src")
        self.home = os.path.join(self.tmp, "home")
        os.makedirs(self.source)
        os.makedirs(self.home)
        self.prefix = "%s-%d/" % (self.id().rsplit(".", 1)[-1], random.randrange(10 ** 9))

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)
        for proxy in self.proxies:
            proxy.close()
            for method, target in proxy.requests:
                self.assertTrue(method == "PUT" or method == "POST" and (
                    "?uploads=" in target or "?uploadId=" in target),
                    "the script sent %s %s: only PUT and multipart POSTs may be sent"
                    % (method, target))

    def fault_proxy(self, rule=None):
        """A FaultProxy of this test's own in front of the server: rule(request) says
        what to do to each request (see s3server.FaultProxy; None, or no rule: forward
        it). It records as the recorder does, and tearDown checks what it saw."""
        proxy = s3server.FaultProxy(self.server.endpoint, rule)
        self.addCleanup(proxy.close)
        self.proxies.append(proxy)
        return proxy

    def env(self, **extra):
        # AWS_EC2_METADATA_DISABLED: a run without credentials must not look for the EC2
        # metadata service (169.254.169.254 is no address tests may reach); the tests of
        # instance credentials point AWS_EC2_METADATA_SERVICE_ENDPOINT at a loopback fake.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.home,
               "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_ACCESS_KEY_ID": self.server.access_key,
               "AWS_SECRET_ACCESS_KEY": self.server.secret_key, "AWS_REGION": self.server.region}
        if FOREIGN:
            env["PYTHONPATH"] = FOREIGN_PATH
        env.update(extra)
        return {k: v for k, v in env.items() if v is not None}

    def command(self, *args, **kw):
        """The script's command line, started as the README's Install recipe starts it:
        from its compiled bytecode (LAUNCH; argv[1:3] is where a test puts its own
        launcher). The tests that write their own command lines run it by its path."""
        endpoint = kw.get("endpoint", self.recorder.endpoint)
        source = kw.get("source", self.source)
        bucket = kw.get("bucket", self.server.bucket)
        return [sys.executable, "-c", LAUNCH, "--endpoint-url", endpoint] + list(args) + \
            [source, "s3://%s/%s" % (bucket, self.prefix)]

    def run_s3push(self, *args, **kw):
        env = kw.pop("env", None) or self.env()
        cwd = kw.pop("cwd", None)
        done = subprocess.run(self.command(*args, **kw), env=env, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)
        result = Result(done.returncode, done.stdout.decode("utf-8", "replace"),
                        done.stderr.decode("utf-8", "replace"))
        # Across the suite: no run ever prints a secret it was given, whatever happened.
        for secret in (env.get("AWS_SECRET_ACCESS_KEY"), env.get("AWS_SESSION_TOKEN"),
                       self.server.secret_key):
            if secret:
                self.assertNotIn(secret, result.stdout + result.stderr, "a secret was printed")
        return result

    def gated_run(self, *args):
        """The script started through a GateProxy that holds its first request until the
        test sets gate.release: (gate, process), once the request has arrived."""
        gate = s3server.GateProxy(self.recorder.endpoint)
        self.addCleanup(gate.close)
        process = subprocess.Popen(self.command(*args, endpoint=gate.endpoint),
                                   env=self.env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.addCleanup(process.kill)
        self.assertTrue(gate.arrived.wait(RUN_TIMEOUT), "the upload never reached the proxy")
        return gate, process

    def assert_landed(self, expected):
        """expected: {relative path: bytes}; each is on the server under the prefix."""
        for relative, data in expected.items():
            got = self.server.object_bytes(self.prefix + relative)
            self.assertIsNotNone(got, "missing on the server: %r" % relative)
            self.assertEqual(got, data, "bytes differ on the server: %r" % relative)

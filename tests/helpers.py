"""What the integration test modules share: one server per test process, files, runs.

The server (see s3server.start_server) starts on first use and stops when the process
exits. The script runs as a subprocess with a cron-like environment: no LANG, an empty
HOME, credentials only from what the test sets.
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

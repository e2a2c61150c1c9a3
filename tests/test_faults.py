"""Never lose a file: faults injected between the script and the server, crashes, signals,
clocks off by 20 minutes, wrong regions, expired tokens, files changing mid-upload.

Most tests put a FaultProxy (s3server.py) between the real script and the real server;
the proxy records every request and does to each what the test's rule says. After every
run the same invariant is checked: a file that left SOURCE_DIR is on the server intact.
"""

import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3server  # noqa: E402
from helpers import (RUN_TIMEOUT, WRITER, IntegrationCase, files_under,  # noqa: E402
                     skip_unless_server_checks, soak, write_file, written)

MIB = 1024 * 1024
MULTIPART = ("--multipart-threshold", "5MiB", "--part-size", "5MiB")


def faketime_library(test):
    """libfaketime: S3PUSH_FAKETIME, else what `make test` unpacked into .testenv/faketime
    from Debian's package. Where there is no apt-get (macOS, other distributions) and
    neither, the test is skipped, named; with apt-get, a missing library is an error."""
    found = glob.glob(os.path.join(s3server.REPO, ".testenv", "faketime", "usr", "lib", "*",
                                   "faketime", "libfaketimeMT.so.1"))
    if os.environ.get("S3PUSH_FAKETIME"):
        return os.environ["S3PUSH_FAKETIME"]
    if found:
        return found[0]
    if shutil.which("apt-get") is None:
        test.skipTest("no libfaketime: no apt-get to fetch it (set S3PUSH_FAKETIME)")
    raise RuntimeError("libfaketime not found under .testenv/faketime: run `make test`, "
                       "which unpacks it from Debian's package")


class FaultCase(IntegrationCase):
    def corpus(self, count, big=0, seed=0):
        """count small files in nested folders and `big` multipart ones; {relative: bytes}."""
        rng = random.Random(seed)
        files = {}
        for i in range(count):
            relative = "d%d/e%d/f%03d.bin" % (i % 7, i % 3, i)
            size = rng.randrange(0, 3000)
            files[relative] = rng.getrandbits(8 * size).to_bytes(size, "little") if size else b""
        for i in range(big):
            files["big/b%d.bin" % i] = os.urandom(5 * MIB + rng.randrange(1, 3 * MIB))
        for relative, data in files.items():
            write_file(self.source, relative, data)
        return files

    def assert_nothing_lost(self, expected):
        """Every file that left the source is on the server with exactly its bytes."""
        left = {os.fsdecode(p) for p in files_under(self.source)}
        for relative, data in expected.items():
            if relative not in left:
                got = self.server.object_bytes(self.prefix + relative)
                self.assertEqual(got, data, "%s left the source but the server has %s"
                                 % (relative, "nothing" if got is None else "other bytes"))
        return left


class Retries(FaultCase):
    def test_transient_answers_are_retried(self):
        write_file(self.source, "f", b"data")
        proxy = self.fault_proxy(lambda r: ("answer", 503, "SlowDown") if r.attempt < 2 else None)
        result = self.run_s3push(endpoint=proxy.endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"f": b"data"})
        self.assertEqual([m for m, _ in proxy.requests], ["PUT"] * 3)

    def test_permission_errors_are_not_retried(self):
        write_file(self.source, "f", b"data")
        proxy = self.fault_proxy(lambda r: ("answer", 403, "AccessDenied"))
        result = self.run_s3push(endpoint=proxy.endpoint)
        self.assertEqual(result.status, 77, result.stderr)
        self.assertEqual(len(proxy.requests), 1)
        self.assertEqual(files_under(self.source), [b"f"])

    def test_broken_connections_are_retried(self):
        write_file(self.source, "f", b"data")
        faults = [("reset-before",), ("reset-after",), ("truncate",)]
        proxy = self.fault_proxy(lambda r: faults[r.attempt] if r.attempt < len(faults) else None)
        result = self.run_s3push(endpoint=proxy.endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"f": b"data"})
        # 4 attempts; 3 when the truncated half of the answer already held the real ETag
        # (Ceph RGW sends it early among its headers): the object was confirmed then.
        self.assertIn(len(proxy.requests), (3, 4))

    def test_a_stalled_server_times_out_and_is_retried(self):
        write_file(self.source, "f", b"data")
        proxy = self.fault_proxy(lambda r: ("stall", 3) if r.attempt == 0 else None)
        result = self.run_s3push("--timeout", "1", endpoint=proxy.endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"f": b"data"})

    def test_retry_after_is_honoured(self):
        write_file(self.source, "f", b"data")
        seen = []

        def rule(request):
            seen.append(time.monotonic())
            return ("answer", 503, "SlowDown", "", {"Retry-After": "2"}) \
                if request.attempt == 0 else None
        result = self.run_s3push(endpoint=self.fault_proxy(rule).endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertGreaterEqual(seen[1] - seen[0], 1.9, "Retry-After: 2 was not waited for")

    def test_the_deadline_ends_a_run_that_keeps_failing(self):
        write_file(self.source, "f", b"data")
        proxy = self.fault_proxy(lambda r: ("answer", 503, "SlowDown", "", {"Retry-After": "30"}))
        started = time.monotonic()
        result = self.run_s3push("--deadline", "2", "--retries", "10", endpoint=proxy.endpoint)
        self.assertEqual(result.status, 75, result.stderr)
        self.assertLess(time.monotonic() - started, 25, "the deadline did not end the run")
        self.assertEqual(files_under(self.source), [b"f"])

    def test_no_new_file_starts_after_the_deadline(self):
        for i in range(10):
            write_file(self.source, "f%d" % i, b"data")
        proxy = self.fault_proxy(lambda r: ("stall", 0.5))
        result = self.run_s3push("--deadline", "1", "--jobs", "1", endpoint=proxy.endpoint)
        self.assertEqual(result.status, 75, result.stderr)
        self.assertIn("--deadline was reached", result.stderr)
        self.assertGreaterEqual(len(files_under(self.source)), 5)
        self.assert_nothing_lost({"f%d" % i: b"data" for i in range(10)})


class SilentEndpoint(FaultCase):
    """An endpoint that takes connections and stops answering ends the run (SilenceWatch):
    exit 75 and one line naming it and --timeout, every file kept, within three --timeout
    (plus the start-up: a bound about hanging, not speed). A slow request is retried."""
    TIMEOUT = 2
    START_UP = 3   # seconds, generous: the interpreter, the scan, the deferred imports

    def run_silenced(self, endpoint, *args):
        started = time.monotonic()
        result = self.run_s3push("--timeout", str(self.TIMEOUT), *args, endpoint=endpoint)
        seconds = time.monotonic() - started
        self.assertEqual(result.status, 75, result.stderr)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn("no answer from %s for " % endpoint, lines[0])
        self.assertIn("(--timeout %ds)" % self.TIMEOUT, lines[0])
        self.assertLess(seconds, 3 * self.TIMEOUT + self.START_UP, "the run did not give up")

    def test_a_silent_endpoint_ends_the_run_and_every_file_stays(self):
        self.corpus(40)
        silent = s3server.SilentServer()
        self.addCleanup(silent.close)
        self.run_silenced(silent.endpoint)
        self.assertEqual(len(files_under(self.source)), 40)
        self.assertGreater(silent.connections, 0)

    def test_a_body_still_going_out_is_cut_when_the_silence_is_declared(self):
        """Small files time out unanswered while a 12 MiB body still goes out at --bwlimit
        1M (12 s): once the silence is declared, that request ends too."""
        self.corpus(6)
        write_file(self.source, "big.bin", os.urandom(12 * MIB))
        silent = s3server.SilentServer()
        self.addCleanup(silent.close)
        self.run_silenced(silent.endpoint, "--jobs", "2", "--bwlimit", "1M",
                          "--multipart-threshold", "1G")
        self.assertEqual(len(files_under(self.source)), 7)

    def test_an_answer_trickled_a_byte_at_a_time_ends_at_its_deadline(self):
        """Every read gets a byte within --timeout, so no read times out: the answer's
        deadline (ANSWER_TIME, 3 s here by a launcher of this test's) ends the request."""
        class Trickle(s3server.LoopbackServer):
            def serve(self, client):
                try:
                    reader = client.makefile("rb")
                    head = s3server.read_head(reader)
                    reader.read(s3server.content_length(head))
                    while True:
                        client.sendall(b"H")
                        time.sleep(0.5)
                except OSError:
                    client.close()
        trickle = Trickle()
        self.addCleanup(trickle.close)
        write_file(self.source, "f", b"data")
        argv = self.command("--timeout", "2", "--retries", "0", endpoint=trickle.endpoint)
        argv[1:3] = ["-c", "import sys; sys.path.insert(0, %r); import s3push; "
                     "s3push.ANSWER_TIME = 3; sys.argv[0] = s3push.__file__; "
                     "sys.exit(s3push.main())" % s3server.REPO]
        started = time.monotonic()
        done = subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        self.assertLess(time.monotonic() - started, 20)   # 6 s: three --timeout, the floor
        self.assertEqual(done.returncode, 75, done.stderr)
        self.assertIn(b"(timed out); the file is kept", done.stderr)
        self.assertEqual(files_under(self.source), [b"f"])

    def test_multipart_uploads_cut_off_by_the_silence_resume_next_run(self):
        files = self.corpus(4, big=2)
        release = threading.Event()
        self.addCleanup(release.set)

        def hold(request):   # the uploads start, but no part is answered
            if "partNumber=" not in request.target:
                return None
            release.wait(RUN_TIMEOUT)
            return ("reset-before",)
        # Two workers, four parts: parts in flight and parts queued when the run stops.
        self.run_silenced(self.fault_proxy(hold).endpoint, "--jobs", "2", *MULTIPART)
        left = self.assert_nothing_lost(files)
        self.assertTrue({"big/b0.bin", "big/b1.bin"} <= left, left)
        release.set()
        result = self.run_s3push(*MULTIPART)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(files)

    def test_a_gateway_that_hears_nothing_ends_the_run(self):
        """A proxy or load balancer in front answers 502 or 504 at once to every request:
        the endpoint behind it is silent. Files given up meanwhile are each a line."""
        for status in (502, 504):
            with self.subTest(status=status):
                self.corpus(40)
                proxy = self.fault_proxy(lambda r: ("answer", status, "GatewayFault"))
                started = time.monotonic()
                result = self.run_s3push("--timeout", str(self.TIMEOUT),
                                         endpoint=proxy.endpoint)
                self.assertLess(time.monotonic() - started,
                                3 * self.TIMEOUT + self.START_UP, "the run did not give up")
                self.assertEqual(result.status, 75, result.stderr)
                *files, last = result.stderr.splitlines()
                self.assertIn("no answer from %s for " % proxy.endpoint, last)
                self.assertIn("a gateway's 502 or 504 (--timeout %ds)" % self.TIMEOUT, last)
                for line in files:
                    self.assertIn("(HTTP %d)" % status, line)
                self.assertLess(len(files), 40)
                self.assertEqual(len(files_under(self.source)), 40)

    def test_files_a_gateway_always_refuses_are_their_own_failures(self):
        """A gateway answers 502 to every request for two files (the server behind breaks
        on them), slowly: the run gives each up and moves the others, whatever the wait,
        with nothing else in flight (--jobs 1)."""
        files = {"f%d" % i: b"data %d" % i for i in range(5)}
        for number, (name, data) in enumerate(sorted(files.items())):
            write_file(self.source, name, data, mtime=1000 + number)   # f0, f1 go first
        # Three answers 1.5 s apart for each: past twice --timeout, with no other answer.
        proxy = self.fault_proxy(lambda r: time.sleep(1.5) or ("answer", 502, "BadGateway")
                                 if re.search(r"/f[01]$", r.target.split("?")[0]) else None)
        result = self.run_s3push("--timeout", str(self.TIMEOUT), "--jobs", "1", "--retries",
                                 "2", endpoint=proxy.endpoint)
        self.assertEqual(result.status, 75, result.stderr)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 2, result.stderr)
        self.assertIn("/f0 -> ", lines[0])
        self.assertIn("/f1 -> ", lines[1])
        self.assertEqual(files_under(self.source), [b"f0", b"f1"])
        self.assert_landed({name: data for name, data in files.items()
                            if name not in ("f0", "f1")})

    def test_a_single_slow_request_is_retried(self):
        files = {"f%d" % i: b"data %d" % i for i in range(5)}
        for name, data in files.items():
            write_file(self.source, name, data)
        # One answer comes after 1.5 --timeout, with no other request in flight (--jobs 1).
        proxy = self.fault_proxy(lambda r: ("stall", 1.5 * self.TIMEOUT)
                                 if r.target.endswith("/f2") and r.attempt == 0 else None)
        result = self.run_s3push("--timeout", str(self.TIMEOUT), "--jobs", "1",
                                 endpoint=proxy.endpoint)
        self.assertEqual((result.status, result.stderr), (0, ""))
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(files)
        self.assertEqual(sum(target.endswith("/f2") for _, target in proxy.requests), 2)


class Corrections(FaultCase):
    def run_faked_clock(self, offset):
        write_file(self.source, "f1", b"one")
        write_file(self.source, "d/f2", b"two")
        library = faketime_library(self)
        env = self.env(LD_PRELOAD=library, DYLD_INSERT_LIBRARIES=library,   # Linux, macOS
                       DYLD_FORCE_FLAT_NAMESPACE="1", FAKETIME=offset,
                       FAKETIME_DONT_FAKE_MONOTONIC="1")
        result = self.run_s3push(env=env)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"f1": b"one", "d/f2": b"two"})
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertRegex(lines[0], r"clock is 1[12]\d\d s (behind|ahead of) the server's")
        return lines[0]

    @skip_unless_server_checks("clock")
    def test_clock_20_minutes_behind(self):
        self.assertIn("behind", self.run_faked_clock("-20m"))

    @skip_unless_server_checks("clock")
    def test_clock_20_minutes_ahead(self):
        self.assertIn("ahead of", self.run_faked_clock("+20m"))

    def test_wrong_region_from_the_error_body(self):
        for i in range(5):
            write_file(self.source, "f%d" % i, b"x%d" % i)

        def rule(request):
            if "/us-east-1/" in request.header("authorization"):
                return ("answer", 400, "AuthorizationHeaderMalformed",
                        "<Region>eu-west-1</Region>")
            return None
        result = self.run_s3push(endpoint=self.fault_proxy(rule).endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"f%d" % i: b"x%d" % i for i in range(5)})
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("is in region eu-west-1, not us-east-1: set --region eu-west-1",
                      result.stderr)

    def test_permanent_redirect_with_a_region_header(self):
        write_file(self.source, "f", b"data")

        def rule(request):
            if "/ap-southeast-2/" not in request.header("authorization"):
                return ("answer", 301, "PermanentRedirect", "",
                        {"x-amz-bucket-region": "ap-southeast-2"})
            return None
        result = self.run_s3push(endpoint=self.fault_proxy(rule).endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn("set --region ap-southeast-2", result.stderr)

    def credentials_file(self, token):
        aws = os.path.join(self.home, ".aws")
        os.makedirs(aws, exist_ok=True)
        path = os.path.join(aws, "credentials")
        with open(path, "w") as handle:
            handle.write("[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n"
                         "aws_session_token = %s\n" % (self.server.access_key,
                                                       self.server.secret_key, token))
        return path

    @skip_unless_server_checks("session-token")
    def test_expired_token_is_read_again_once(self):
        write_file(self.source, "f", b"data")
        self.credentials_file("OLD-TOKEN")

        def rule(request):
            if request.header("x-amz-security-token") == "OLD-TOKEN":
                self.credentials_file("NEW-TOKEN")   # rotated meanwhile, as by an agent
                return ("answer", 400, "ExpiredToken")
            return None
        env = self.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
        result = self.run_s3push(env=env, endpoint=self.fault_proxy(rule).endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn("credentials had expired; read them again", result.stderr)
        self.assert_landed({"f": b"data"})

    def test_expired_token_not_renewed_stops_the_run(self):
        write_file(self.source, "f", b"data")
        self.credentials_file("OLD-TOKEN")
        proxy = self.fault_proxy(lambda r: ("answer", 400, "ExpiredToken"))
        env = self.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
        result = self.run_s3push(env=env, endpoint=proxy.endpoint)
        self.assertEqual(result.status, 77, result.stderr)
        self.assertIn("ExpiredToken", result.stderr)
        self.assertEqual(files_under(self.source), [b"f"])


class Corruption(FaultCase):
    def test_flipped_body_bytes_never_land(self):
        files = self.corpus(20, big=1)
        proxy = self.fault_proxy(lambda r: ("flip",) if r.attempt == 0 and r.body else None)
        result = self.run_s3push("--retries", "0", *MULTIPART, endpoint=proxy.endpoint)
        self.assertNotEqual(result.status, 0, result.stderr)
        # rclone checks Content-MD5 (BadDigest); Ceph RGW checks the signed SHA-256 first;
        # moto checks neither and stores the damaged bytes: the ETag check catches it.
        self.assertRegex(result.stderr, "BadDigest|XAmzContentSHA256Mismatch|"
                                        "ETag .* is not the MD5 of what was sent")
        self.assert_nothing_lost(files)
        # With retries, each file's body flipped once more. rclone's server drops a whole
        # multipart upload when a part fails its Content-MD5 check: the script then starts
        # the upload afresh.
        flipped = set()

        def once_per_file(request):
            path = request.target.split("?")[0]
            if request.body and path not in flipped and "uploadId" not in request.target \
                    or "partNumber=1&" in request.target and path not in flipped:
                flipped.add(path)
                return ("flip",)
            return None
        proxy = self.fault_proxy(once_per_file)
        result = self.run_s3push(*MULTIPART, endpoint=proxy.endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(files)

    def flipped_on_every_path(self, *args):
        """Every body damaged on the way (small PUTs and parts): nothing may leave."""
        files = self.corpus(10, big=1)
        proxy = self.fault_proxy(lambda r: ("flip",) if r.attempt == 0 and r.body else None)
        result = self.run_s3push("--retries", "0", *(args + MULTIPART),
                                 endpoint=proxy.endpoint)
        self.assertNotEqual(result.status, 0, result.stderr)
        self.assertEqual(sorted(os.fsdecode(p) for p in files_under(self.source)),
                         sorted(files), result.stderr)
        self.assert_nothing_lost(files)
        return result

    def test_a_damaged_body_never_lands_unsigned_or_signed(self):
        # The default: UNSIGNED-PAYLOAD under a signed Content-MD5; --sign-payload adds
        # the SHA-256. Either way the server's check or the ETag check refuses the body.
        for args in ((), ("--sign-payload",)):
            self.flipped_on_every_path(*args)

    @skip_unless_server_checks("content-md5")
    @skip_unless_server_checks("sse-kms")
    def test_a_damaged_body_never_lands_under_sse_kms(self):
        # The ETag is no MD5 there: the Content-MD5 the server checks is the proof.
        result = self.flipped_on_every_path("--sse", "aws:kms")
        self.assertIn("BadDigest", result.stderr)

    def test_an_etag_that_is_not_the_md5_keeps_the_file(self):
        write_file(self.source, "f", b"data")
        proxy = self.fault_proxy(lambda r: ("etag", '"0123456789abcdef0123456789abcdef"'))
        result = self.run_s3push("--retries", "1", endpoint=proxy.endpoint)
        self.assertEqual(result.status, 75, result.stderr)
        self.assertIn("is not the MD5 of what was sent", result.stderr)
        self.assertEqual(files_under(self.source), [b"f"])
        self.assertEqual(len(proxy.requests), 2, "a damaged answer is retried")

    def test_a_multipart_etag_that_is_not_the_md5_of_md5s_keeps_the_file(self):
        self.corpus(0, big=1)
        proxy = self.fault_proxy(lambda r: ("etag", '"0123456789abcdef0123456789abcdef"')
                                 if "partNumber=2&" in r.target else None)
        result = self.run_s3push("--retries", "1", *MULTIPART, endpoint=proxy.endpoint)
        self.assertEqual(result.status, 75, result.stderr)
        self.assertIn("part 2: the server's ETag", result.stderr)
        self.assertEqual(len(files_under(self.source)), 1)


class Chaos(FaultCase):
    """A corpus through a proxy that breaks a quarter of all requests, run again and again."""
    FAULTS = [("reset-before",), ("reset-after",), ("answer", 500, "InternalError"),
              ("answer", 503, "SlowDown"), ("truncate",), ("stall", 2), ("flip",)]

    def test_every_file_arrives_intact_through_random_faults(self):
        files = self.corpus(*soak((300, 3), (60, 1)), seed=4)
        rng = random.Random(1234)
        injected = {}

        def rule(request):
            if rng.random() >= 0.25:
                return None
            fault = rng.choice(self.FAULTS)
            injected[fault[0] + (str(fault[1]) if len(fault) > 1 else "")] = \
                injected.get(fault[0] + (str(fault[1]) if len(fault) > 1 else ""), 0) + 1
            return fault
        proxy = self.fault_proxy(rule)
        for _ in range(30):
            result = self.run_s3push("--retries", "2", "--timeout", "1", "--jobs", "4",
                                     *MULTIPART, endpoint=proxy.endpoint)
            left = self.assert_nothing_lost(files)
            if not left:
                break
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(files)
        sys.stderr.write("[chaos: %d requests, %d faults injected: %s] "
                         % (len(proxy.requests), sum(injected.values()),
                            " ".join("%s=%d" % kv for kv in sorted(injected.items()))))
        if soak(True, False):   # the full round meets every kind of fault, each 3 times
            self.assertGreaterEqual(min(injected.values()), 3, injected)
            self.assertEqual(len(injected), len(self.FAULTS), injected)
        else:
            self.assertGreaterEqual(sum(injected.values()), 10, injected)


class Crashes(FaultCase):
    def test_kill_9_at_random_moments(self):
        files = self.corpus(*soak((500, 3), (100, 1)), seed=9)
        rng = random.Random(99)
        kills = runs = 0
        wanted = soak(20, 4)
        while kills < wanted and runs < 4 * wanted:
            runs += 1
            process = subprocess.Popen(self.command("--jobs", "2", *MULTIPART), env=self.env(),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.03, 0.4))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
            process.wait(RUN_TIMEOUT)
            left = self.assert_nothing_lost(files)
            if not left:
                self.corpus_refill(files, rng)
        result = self.run_s3push(*MULTIPART)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(files)
        sys.stderr.write("[crash: %d kills in %d runs] " % (kills, runs))
        self.assertGreaterEqual(kills, wanted)

    def corpus_refill(self, files, rng):
        """All moved before 20 kills: put a fresh set in (new names, same check)."""
        for i in range(100):
            relative = "refill%d/f%d" % (len(files), i)
            files[relative] = os.urandom(rng.randrange(0, 2000))
            write_file(self.source, relative, files[relative])


class ChangingFiles(FaultCase):
    """The gate holds the first request until the test has changed the file."""

    def finish(self, gate, process):
        gate.release.set()
        out, err = process.communicate(timeout=RUN_TIMEOUT)
        return process.returncode, out.decode(), err.decode()

    def change_and_run(self, change, data, *args):
        path = write_file(self.source, "f.bin", data)
        gate, process = self.gated_run(*args)
        change(path)
        return self.finish(gate, process)

    def truncate(self, path):
        with open(path, "r+b") as handle:
            handle.truncate(10)

    def replace(self, path):
        write_file(self.source, "f.bin.new", b"new contents")
        os.rename(path + b".new", path)

    def test_truncated_small_and_multipart(self):
        for data, args in ((b"x" * 1000, ()), (os.urandom(11 * MIB), MULTIPART)):
            status, _, err = self.change_and_run(self.truncate, data, *args)
            self.assertEqual(status, 65, err)
            self.assertEqual(files_under(self.source), [b"f.bin"], err)
            with open(os.path.join(self.source, "f.bin"), "rb") as handle:
                self.assertEqual(handle.read(), data[:10])

    def test_replaced_by_rename(self):
        # A single PUT: the old version, read whole through its descriptor, is at the key;
        # the new one is left for a later run, as a file still being written is (exit 0).
        # Multipart: the old inode's ctime moved (its last link went) between its parts, so
        # the upload is not completed and the file is kept (65).
        for data, args in ((b"y" * 1000, ()), (os.urandom(11 * MIB), MULTIPART)):
            status, _, err = self.change_and_run(self.replace, data, *args)
            if args:
                self.assertEqual(status, 65, err)
                self.assertIn("changed while it was uploading", err)
            else:
                self.assertEqual(status, 0, err)
                self.assert_landed({"f.bin": data})
            with open(os.path.join(self.source, "f.bin"), "rb") as handle:
                self.assertEqual(handle.read(), b"new contents")

    def test_deleted_during_upload(self):
        for data, args in ((b"z" * 1000, ()), (os.urandom(11 * MIB), MULTIPART)):
            status, out, err = self.change_and_run(os.unlink, data, *args)
            self.assertEqual(files_under(self.source), [])
            if status == 0:   # what was read was delivered whole
                self.assert_landed({"f.bin": data})
            else:
                self.assertEqual(status, 65, err)

    def test_appended_during_multipart(self):
        data = os.urandom(11 * MIB)

        def append(path):
            with open(path, "ab") as handle:
                handle.write(b"more")
        status, _, err = self.change_and_run(append, data, *MULTIPART)
        self.assertEqual(status, 65, err)
        self.assertEqual(os.path.getsize(os.path.join(self.source, "f.bin")), len(data) + 4)


class Signals(FaultCase):
    def stopped_by(self, signum):
        write_file(self.source, "f", b"data")
        gate = s3server.GateProxy(self.recorder.endpoint)
        self.addCleanup(gate.close)
        # A shell's background job inherits SIGINT ignored, and Python then keeps ignoring
        # it (as it should): give the script the default, as a terminal would.
        process = subprocess.Popen(self.command(endpoint=gate.endpoint), env=self.env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                    signal.SIG_DFL))
        self.addCleanup(process.kill)
        self.assertTrue(gate.arrived.wait(RUN_TIMEOUT))
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)
        gate.release.set()
        self.assertEqual(files_under(self.source), [b"f"])
        self.assertIn(b"files not yet confirmed were left in place", err)
        return process.returncode

    def test_sigterm(self):
        self.assertEqual(self.stopped_by(signal.SIGTERM), 143)

    def test_sigint(self):
        self.assertEqual(self.stopped_by(signal.SIGINT), 130)


class IfExists(FaultCase):
    def test_number_sends_if_none_match(self):
        write_file(self.source, "f", b"data")
        self.assertEqual(self.run_s3push("--if-exists", "number").status, 0)
        self.assertEqual(self.recorder.heads[0].header("if-none-match"), "*")

    def comes_back(self, bursts, *args):
        """Each burst a new file under the old name once the last was moved; the keys
        used, which must hold the bursts in order."""
        for data in bursts:
            write_file(self.source, "logs/app.log", data)
            result = self.run_s3push("-v", "--if-exists", "number", *args)
            self.assertEqual(result.status, 0, result.stderr)
            self.assertEqual(files_under(self.source), [])
        keys = ["logs/app.log"] + ["logs/app.%d.log" % n for n in range(1, len(bursts))]
        self.assertIn("-> s3://%s/%s%s" % (self.server.bucket, self.prefix, keys[-1]),
                      result.stdout)
        self.assertEqual(self.server.keys(self.prefix), {self.prefix + k for k in keys})
        self.assertEqual(b"".join(self.server.object_bytes(self.prefix + k) for k in keys),
                         b"".join(bursts))

    @skip_unless_server_checks("if-none-match")
    def test_a_file_that_comes_back_goes_to_numbered_keys(self):
        self.comes_back([b"first burst\n", b"second burst\n", b"third burst\n"])

    @skip_unless_server_checks("if-none-match-complete")
    def test_numbered_keys_for_multipart_uploads_too(self):
        # The second burst is multipart: If-None-Match on CompleteMultipartUpload.
        self.comes_back([b"first burst\n", os.urandom(6 * MIB), b"third burst\n"], *MULTIPART)

    @skip_unless_server_checks("if-none-match")
    def test_a_writer_that_reopens_between_runs_loses_nothing(self):
        path = os.path.join(self.source, "rec.bin")
        process = self.writer_process(path)
        while process.poll() is None:
            result = self.run_s3push("--min-age", "1", "--if-exists", "number")
            # 65 when a burst came during the upload (on a loaded machine): kept, never a
            # loss, which the end proves byte for byte.
            self.assertIn(result.status, (0, 65), result.stderr)
            time.sleep(0.3)
        time.sleep(1.1)
        self.assertEqual(self.run_s3push("--min-age", "1", "--if-exists", "number").status, 0)
        self.assertEqual(files_under(self.source), [])
        # A run that met a burst during its upload kept the file (65), and the bytes it sent
        # stay at their key: the next key holds that state again and more. So each key
        # holds a whole state of the file: bursts s to e, with s where the key before
        # started (it was kept) or where it ended (it was moved); nothing is missing.
        keys = ["rec.bin"] + ["rec.%d.bin" % n for n in range(1, 6)]
        pieces = [self.server.object_bytes(self.prefix + k) for k in keys]
        self.assertEqual(self.server.keys(self.prefix),
                         {self.prefix + k for k, p in zip(keys, pieces) if p})
        whole = written(3, 1000)
        start = end = 0
        for piece in filter(None, pieces):
            found = whole.find(piece)
            self.assertIn(found, (start, end), pieces)
            self.assertEqual(len(piece) % 1000, 0, pieces)
            self.assertGreater(found + len(piece), end, pieces)
            start, end = found, found + len(piece)
        self.assertEqual(end, len(whole), pieces)

    def writer_process(self, path):
        process = subprocess.Popen([sys.executable, "-c", WRITER, path, "reopen", "3", "1000",
                                    "1.6"])
        self.addCleanup(process.kill)
        return process


class ConcurrentRuns(FaultCase):
    def test_several_runs_at_once(self):
        files = self.corpus(300, seed=5)
        processes = [subprocess.Popen(self.command("--jobs", "1"), env=self.env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                     for _ in range(5)]
        outcomes = [(p.wait(RUN_TIMEOUT), p.stderr.read()) for p in processes]
        for process in processes:
            process.stdout.close()
            process.stderr.close()
        self.assertEqual([status for status, _ in outcomes], [0] * 5, outcomes)
        self.assertGreaterEqual(sum(b"another run" in err for _, err in outcomes), 1)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(files)


def raw_answer(body, length=None, content_type="application/xml"):
    """A 200 to the complete with this body, announced as length bytes (its own if None)."""
    return ("HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (content_type, len(body) if length is None else length)).encode() + body


def is_complete(request):
    return request.method == "POST" and "?uploadId=" in request.target


class CompleteProof(FaultCase):
    """A 200 to CompleteMultipartUpload proves the object only as its
    CompleteMultipartUploadResult with the parts' ETag; any other 200 keeps the file, and
    a plain next run finishes it."""

    def kept_then_moved(self, action, status=75, *args):
        """The complete answered by action in a first run (retried once): the file kept
        with this status; a second run without the proxy moves it. Its requests."""
        data = os.urandom(6 * MIB)
        write_file(self.source, "big.bin", data)
        proxy = self.fault_proxy(lambda r: action if is_complete(r) else None)
        result = self.run_s3push("--retries", "1", *(args + MULTIPART),
                                 endpoint=proxy.endpoint)
        self.assertEqual(result.status, status, result.stderr)
        self.assertEqual(files_under(self.source), [b"big.bin"], result.stdout)
        self.assertNotIn("moved 1 files", result.stderr)
        self.assert_nothing_lost({"big.bin": data})
        completes = sum(m == "POST" and "?uploadId=" in t for m, t in proxy.requests)
        self.assertEqual(completes, 2 if status == 75 else 1, "retried only if temporary")
        sent = len(self.recorder.requests)
        result = self.run_s3push(*(args + MULTIPART))
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed({"big.bin": data})
        return self.recorder.requests[sent:]

    def test_an_empty_200_proves_nothing(self):
        # Answered by the proxy: the upload stays open, and the next run resumes it.
        second = self.kept_then_moved(("answer-raw", raw_answer(b"")))
        self.assertEqual([m for m, _ in second], ["POST"], "resumed: only the complete")

    def test_a_padded_200_cut_short_proves_nothing(self):
        # S3 sends its 200 at once and pads it with spaces while it works; here the server
        # completed, and the answer was cut after the padding.
        self.kept_then_moved(("replace", raw_answer(
            b'<?xml version="1.0" encoding="UTF-8"?>\n' + b" " * 40, length=400)))

    def test_a_200_that_is_no_result_proves_nothing(self):
        self.kept_then_moved(("answer-raw", raw_answer(b"<html><body>OK</body></html>",
                                                       content_type="text/html")))

    def test_an_empty_etag_without_the_key_proves_nothing(self):
        # Ceph RGW 16.2's empty ETag comes after the key it completed; a proxy's does not.
        self.kept_then_moved(("answer-raw", raw_answer(
            b"<CompleteMultipartUploadResult><Bucket>b</Bucket><ETag></ETag>"
            b"</CompleteMultipartUploadResult>")), 65)

    @skip_unless_server_checks("sse-kms")
    def test_a_result_without_etag_proves_nothing_under_sse_kms(self):
        # There the ETag is no MD5 and is not compared, but it must be there.
        self.kept_then_moved(("answer-raw", raw_answer(
            b"<CompleteMultipartUploadResult><Key>big.bin</Key>"
            b"</CompleteMultipartUploadResult>")), 65, "--sse", "aws:kms")

    @unittest.skipIf(s3server.server_kind() != "rgw", "only Ceph RGW 16.2 answers its "
                     "CompleteMultipartUploadResult with an empty ETag")
    def test_rgw_answers_an_empty_etag_and_its_parts_prove_the_object(self):
        data = os.urandom(6 * MIB)
        write_file(self.source, "big.bin", data)
        answers = []
        proxy = self.fault_proxy(lambda r: ("inspect", answers.append) if is_complete(r) else None)
        result = self.run_s3push(*MULTIPART, endpoint=proxy.endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(len(answers), 1)
        self.assertIn(b"<CompleteMultipartUploadResult", answers[0])
        self.assertIn(b"<ETag></ETag>", answers[0], "RGW sends an ETag now: drop the "
                      "allowance in Md5Check.proof")
        self.assert_landed({"big.bin": data})


if __name__ == "__main__":
    unittest.main()

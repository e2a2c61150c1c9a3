"""The real script, run as a subprocess, against a real S3 server that checks signatures.

Each test moves its own directory under its own key prefix and then compares the
bytes that landed with what was written (helpers.py: the server and the environment).
"""

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3server  # noqa: E402
from helpers import FOREIGN, RUN_TIMEOUT, IntegrationCase, files_under, write_file  # noqa: E402

AWKWARD = ["space name", "plus+sign", "per%cent", "til~de", "hash#tag", "quest?ion",
           "amp&ersand", "equal=s", "ünïcödé-日本", "-leading-dash", "semi;colon",
           "comma,s", "at@sign", "dollar$", "paren(s)", "quote'", "bra[ck]et"]


class MovesFiles(IntegrationCase):
    def test_moves_1000_files_with_awkward_names(self):
        rng = random.Random(1000)
        expected = {}
        for i in range(1000):
            folder = "/".join(rng.choice(AWKWARD) for _ in range(rng.randrange(0, 3)))
            name = "%s %d.dat" % (rng.choice(AWKWARD), i)
            relative = (folder + "/" + name) if folder else name
            expected[relative] = os.urandom(rng.randrange(0, 3000))
            write_file(self.source, relative, expected[relative])
        result = self.run_s3push()
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(result.stdout + result.stderr, "", "not silent on success")
        self.assertEqual(files_under(self.source), [])
        self.assertEqual(self.server.keys(self.prefix), {self.prefix + k for k in expected})
        self.assert_landed(expected)

    def test_the_readmes_bytecode_launcher(self):
        # Install, "Starting faster": compiled once, started by an isolated interpreter.
        with open(os.path.join(s3server.REPO, "README.md"), encoding="utf-8") as handle:
            code = re.search(r"python3 -I -c '([^']*)' --help", handle.read()).group(1)
        lib = os.path.join(self.tmp, "lib")
        os.makedirs(lib)
        installed = shutil.copy(s3server.S3PUSH, lib)
        subprocess.check_call([sys.executable, "-m", "py_compile", installed])
        self.assertEqual(len(os.listdir(os.path.join(lib, "__pycache__"))), 1)
        write_file(self.source, "a/f", b"data")
        command = self.command()
        command[1:3] = ["-I", "-c", code.replace("/usr/local/lib/s3push", lib)]
        done = subprocess.run(command, env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed({"a/f": b"data"})

    @unittest.skipIf(FOREIGN, "the foreign-platform run hides /proc")
    def test_started_by_its_path_it_runs_as_started(self):
        # The process stays the interpreter it was started as, with its flags and its
        # command line (no re-exec an audit tool would flag). A credential process the
        # run starts reads the command line of the process it serves.
        seen = os.path.join(self.tmp, "cmdline")
        script = os.path.join(self.home, "creds.py")
        with open(script, "w") as handle:
            handle.write("import os, sys\nwith open(%r, 'wb') as out:\n"
                         "    out.write(open('/proc/%%d/cmdline' %% os.getppid(), 'rb').read())\n"
                         "sys.stdout.write(%r)\n" % (seen, json.dumps(
                             {"Version": 1, "AccessKeyId": self.server.access_key,
                              "SecretAccessKey": self.server.secret_key})))
        config = os.path.join(self.home, "config")
        with open(config, "w") as handle:
            handle.write("[default]\ncredential_process = %s %s\n" % (sys.executable, script))
        write_file(self.source, "a/f", b"data")
        command = self.command("-v")
        command[1:3] = ["-W", "ignore::ResourceWarning", s3server.S3PUSH]
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=self.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None,
                                           AWS_CONFIG_FILE=config), timeout=RUN_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(b"moved ", done.stdout)
        self.assert_landed({"a/f": b"data"})
        with open(seen, "rb") as handle:
            argv = handle.read().split(b"\0")[:-1]
        self.assertEqual(argv, [os.fsencode(a) for a in command])

    def test_closed_standard_streams(self):
        # cron or a wrapper may start it with stdin, stdout and stderr closed (<&- >&- 2>&-):
        # the run still moves its files, and its exit status still tells; a failure's line
        # goes nowhere, never into a file the run opened under a freed number.
        summary = os.path.join(self.tmp, "summary.json")
        closed = ["sh", "-c", 'exec "$@" <&- >&- 2>&-', "sh"]
        for by_path in (False, True):   # from bytecode, and by its path
            write_file(self.source, "a/f", b"data")
            command = self.command("-v", "--summary-json", summary)
            if by_path:
                command[1:3] = [s3server.S3PUSH]
            done = subprocess.run(closed + command, env=self.env(), timeout=RUN_TIMEOUT)
            self.assertEqual(done.returncode, 0, by_path)
            self.assert_landed({"a/f": b"data"})
            self.assertEqual(files_under(self.source), [])
            with open(summary) as handle:
                self.assertEqual(json.load(handle)["files_moved"], 1)
        write_file(self.source, "b", b"beta")
        done = subprocess.run(closed + self.command(endpoint="http://127.0.0.1:9"),
                              env=self.env(), timeout=RUN_TIMEOUT)
        self.assertEqual(done.returncode, 75)   # no server there: the file is kept
        self.assertEqual(files_under(self.source), [b"b"])

    def test_empty_files(self):
        write_file(self.source, "empty", b"")
        write_file(self.source, "sub/also-empty.txt", b"")
        result = self.run_s3push()
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"empty": b"", "sub/also-empty.txt": b""})
        self.assertEqual(files_under(self.source), [])

    def test_source_dir_however_written(self):
        parent = os.path.dirname(self.source)
        for spelling in ("src", "src/", "./src//", self.source, self.source + "/"):
            data = spelling.encode()
            write_file(self.source, "d/f.txt", data)
            result = self.run_s3push(source=spelling, cwd=parent)
            self.assertEqual(result.status, 0, result.stderr)
            self.assertEqual(self.server.object_bytes(self.prefix + "d/f.txt"), data, spelling)
            self.assertEqual(self.server.keys(self.prefix), {self.prefix + "d/f.txt"})

    def test_prefix_forms(self):
        unique = self.prefix.rstrip("/")
        bucket = "s3://" + self.server.bucket
        for destination, name, key in ((bucket, unique + "-root", unique + "-root"),
                                       (bucket + "/", unique + "-slash", unique + "-slash"),
                                       (bucket + "/" + unique + "/a", "x", unique + "/a/x"),
                                       (bucket + "/" + unique + "/b/", "y", unique + "/b/y")):
            write_file(self.source, name, destination.encode())
            argv = [sys.executable, s3server.S3PUSH, "--endpoint-url", self.recorder.endpoint,
                    self.source, destination]
            done = subprocess.run(argv, env=self.env(), timeout=RUN_TIMEOUT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(self.server.object_bytes(key), destination.encode(), destination)

    def test_verbose_lines_and_summary(self):
        write_file(self.source, "a.txt", b"12345")
        write_file(self.source, "b/c.txt", b"678")
        result = self.run_s3push("-v")
        self.assertEqual(result.status, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(len(lines), 3, result.stdout)
        self.assertIn("moved %s -> s3://%s/%sb/c.txt (3 bytes)"
                      % (os.path.join(self.source, "b", "c.txt"), self.server.bucket, self.prefix),
                      lines)
        self.assertRegex(lines[-1], r"^s3push: moved 2 files, 8 bytes in [0-9.]+ s "
                                    r"\([0-9.]+ MB/s\); 0 failed, 0 left for later")

    def test_delete_empty_dirs(self):
        write_file(self.source, "a/b/c/file", b"x")
        write_file(self.source, "a/keep/young", b"y", mtime=time.time())
        write_file(self.source, "d/e/file", b"z")
        result = self.run_s3push("--delete-empty-dirs")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(sorted(os.listdir(self.source)), ["a"])
        self.assertEqual(sorted(os.listdir(os.path.join(self.source, "a"))), ["keep"])
        self.run_s3push("--delete-empty-dirs", "--min-age", "0")
        self.assertEqual(os.listdir(self.source), [], "SOURCE_DIR itself must stay, empty")
        self.assertTrue(os.path.isdir(self.source))

    def test_without_delete_empty_dirs_directories_stay(self):
        write_file(self.source, "a/b/file", b"x")
        self.assertEqual(self.run_s3push().status, 0)
        self.assertTrue(os.path.isdir(os.path.join(self.source, "a", "b")))

    def test_credentials_from_profile_file(self):
        write_file(self.source, "f", b"profile")
        aws = os.path.join(self.home, ".aws")
        os.makedirs(aws)
        with open(os.path.join(aws, "credentials"), "w", newline="\r\n") as handle:
            handle.write("\ufeff[ops]\naws_access_key_id = %s\naws_secret_access_key = %s\n"
                         % (self.server.access_key, self.server.secret_key))
        env = self.env(AWS_ACCESS_KEY_ID="AKWRONG", AWS_SECRET_ACCESS_KEY="wrong")
        result = self.run_s3push("--profile", "ops", env=env)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"f": b"profile"})


class KeepsFiles(IntegrationCase):
    def test_wrong_secret_keeps_every_file(self):
        for i in range(5):
            write_file(self.source, "f%d" % i, b"data")
        canary = "CANARY-secret-%d" % random.randrange(10 ** 9)
        result = self.run_s3push(env=self.env(AWS_SECRET_ACCESS_KEY=canary))
        self.assertEqual(result.status, 77, result.stderr)
        self.assertEqual(len(files_under(self.source)), 5)
        self.assertIn("SignatureDoesNotMatch", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertNotIn(canary, result.stdout + result.stderr)
        self.assertEqual(self.server.keys(self.prefix), set())

    def test_young_file_is_left(self):
        write_file(self.source, "old", b"old")
        write_file(self.source, "young", b"young", mtime=time.time())
        result = self.run_s3push()
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [b"young"])
        self.assertEqual(self.server.keys(self.prefix), {self.prefix + "old"})

    def test_dry_run_changes_nothing(self):
        write_file(self.source, "x/a b.txt", b"a")
        write_file(self.source, "y", b"bb")
        result = self.run_s3push("--dry-run")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn("would move %s -> s3://%s/%sx/a b.txt (1 bytes)"
                      % (os.path.join(self.source, "x", "a b.txt"), self.server.bucket,
                         self.prefix), result.stdout)
        self.assertEqual(len(result.stdout.splitlines()), 2)
        self.assertEqual(files_under(self.source), [b"x/a b.txt", b"y"])
        self.assertEqual(self.server.keys(self.prefix), set())

    def test_in_progress_names_special_files_and_symlinks(self):
        for name in (".hidden", "x.tmp", "y.part", "z.partial", ".w.swp", "v~", "skip.log",
                     ".staging/inside"):
            write_file(self.source, name, b"in progress")
        write_file(self.source, "real", b"real")
        os.mkfifo(os.path.join(self.source, "fifo"))
        outside = write_file(self.tmp, "outside", b"outside")
        os.symlink(outside, os.path.join(self.source, "link"))
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.path.join(self.source, "sock"))
        try:
            result = self.run_s3push("--exclude", "*.log")
        finally:
            sock.close()
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(self.server.keys(self.prefix), {self.prefix + "real"})
        left = files_under(self.source)
        self.assertEqual(len(left), 11, left)   # all but 'real'
        self.assertTrue(os.path.exists(outside))

    def test_unreachable_endpoint_fails_fast(self):
        write_file(self.source, "f", b"data")
        started = time.monotonic()
        result = self.run_s3push(endpoint="http://127.0.0.1:%d" % s3server.free_port())
        self.assertEqual(result.status, 75, result.stderr)
        self.assertLess(time.monotonic() - started, 30)
        self.assertIn("cannot connect", result.stderr)
        self.assertEqual(files_under(self.source), [b"f"])

    def test_bad_source_and_destination(self):
        write_file(self.source, "f", b"x")
        missing = self.run_s3push(source=os.path.join(self.tmp, "missing"))
        self.assertEqual(missing.status, 66, missing.stderr)
        self.assertIn("missing does not exist", missing.stderr)
        not_dir = self.run_s3push(source=os.path.join(self.source, "f"))
        self.assertEqual(not_dir.status, 66, not_dir.stderr)
        argv = [sys.executable, s3server.S3PUSH, self.source, "my-bucket/x"]
        done = subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
        self.assertEqual(done.returncode, 2)
        self.assertIn(b"'my-bucket/x' is not an s3://BUCKET[/PREFIX] URL", done.stderr)
        self.assertEqual(files_under(self.source), [b"f"])


class Races(IntegrationCase):
    """A gate proxy holds the upload after the script read the file: deterministic races."""

    def test_file_appended_during_upload_is_kept(self):
        path = write_file(self.source, "growing.log", b"first part\n")
        gate, process = self.gated_run()
        with open(path, "ab") as handle:
            handle.write(b"appended while uploading\n")
        gate.release.set()
        _, stderr = process.communicate(timeout=RUN_TIMEOUT)
        self.assertEqual(process.returncode, 65, stderr)
        self.assertIn(b"changed while it was uploading", stderr)
        with open(path, "rb") as handle:
            self.assertEqual(handle.read(), b"first part\nappended while uploading\n")
        self.assert_landed({"growing.log": b"first part\n"})

    def test_second_run_exits_at_once(self):
        write_file(self.source, "a", b"a")
        write_file(self.source, "b", b"b")
        gate, process = self.gated_run()
        second = self.run_s3push()
        self.assertEqual(second.status, 0, second.stderr)
        self.assertIn("another run", second.stderr)
        self.assertEqual(self.server.keys(self.prefix), set(), "the second run touched files")
        self.assertEqual(len(files_under(self.source)), 2)
        gate.release.set()
        process.communicate(timeout=RUN_TIMEOUT)
        self.assertEqual(process.returncode, 0)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed({"a": b"a", "b": b"b"})


class ClosedOutput(IntegrationCase):
    def test_a_plan_piped_into_head_ends_quietly(self):
        # `s3push --dry-run ... | head -1`: the reader goes after one line; the plan of
        # 3,000 files (more than a pipe holds) meets a closed pipe, which is no bug.
        for i in range(3000):
            write_file(self.source, "d/f%04d.log" % i, b"x")
        process = subprocess.Popen(self.command("--dry-run"), env=self.env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL)
        self.assertTrue(process.stdout.readline().startswith(b"would move "))
        process.stdout.close()
        err = process.stderr.read().decode()
        self.assertEqual(process.wait(RUN_TIMEOUT), 0, err)
        self.assertEqual(err, "")
        self.assertEqual(len(files_under(self.source)), 3000)


class IdleTick(IntegrationCase):
    """A cron tick with nothing to send reads no settings and loads no network code."""
    HEAVY = ("http.client", "ssl", "socket", "hashlib", "configparser", "xml.etree",
             "urllib.parse", "mimetypes")

    def test_nothing_to_send_loads_nothing_heavy(self):
        write_file(self.source, "young", b"x", mtime=time.time())
        write_file(self.source, "in-progress.part", b"x")
        # Only what the script imports counts (a site .pth may load some of these first).
        probe = ("import runpy, sys\n"
                 "before = set(sys.modules)\n"
                 "sys.argv = ['s3push.py', %r, 's3://bucket/p']\n"
                 "try:\n    runpy.run_path(%r, run_name='__main__')\n"
                 "except SystemExit as exc:\n    status = exc.code\n"
                 "print(status, ' '.join(m for m in %r if m in set(sys.modules) - before))"
                 % (self.source, s3server.S3PUSH, self.HEAVY))
        done = subprocess.run([sys.executable, "-c", probe], env=self.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=RUN_TIMEOUT)
        self.assertEqual(done.stdout.decode().split(), ["0"], done.stderr)

    def test_nothing_to_send_reads_no_settings(self):
        config = os.path.join(self.home, "broken-config")
        with open(config, "w") as handle:
            handle.write("this is not an INI file\n")
        env = self.env(AWS_CONFIG_FILE=config)
        self.assertEqual(self.run_s3push(env=env).status, 0, "an empty tick read settings")
        write_file(self.source, "f", b"x")
        self.assertEqual(self.run_s3push(env=env).status, 78, "the file was not read at all")


MIB = 1024 * 1024


class Multipart(IntegrationCase):
    """Small part sizes keep these fast: 5 MiB, S3's minimum."""

    def methods(self, proxy):
        """(method, first query name) of each distinct request: a retry repeats its target."""
        return [(m, t.split("?", 1)[1].split("=")[0] if "?" in t else "")
                for m, t in sorted(set(proxy.requests))]

    def test_several_parts_and_a_short_last_part(self):
        data = os.urandom(2 * 5 * MIB + 12345)
        write_file(self.source, "big/file.bin", data)
        write_file(self.source, "small.txt", b"small")
        proxy = self.fault_proxy()
        result = self.run_s3push("--multipart-threshold", "5MiB", "--part-size", "5MiB",
                                 endpoint=proxy.endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"big/file.bin": data, "small.txt": b"small"})
        self.assertEqual(files_under(self.source), [])
        calls = self.methods(proxy)
        self.assertEqual(calls.count(("POST", "uploads")), 1)
        self.assertEqual(calls.count(("PUT", "partNumber")), 3)
        self.assertEqual(calls.count(("POST", "uploadId")), 1)
        self.assertEqual(calls.count(("PUT", "")), 1)
        self.assertEqual({m for m, _ in calls}, {"PUT", "POST"}, "only PUT and POST are sent")

    def test_zero_byte_and_threshold_sized_files_go_in_one_put(self):
        exact = os.urandom(5 * MIB)
        write_file(self.source, "empty", b"")
        write_file(self.source, "exact", exact)
        proxy = self.fault_proxy()
        result = self.run_s3push("--multipart-threshold", "5MiB", "--part-size", "5MiB",
                                 endpoint=proxy.endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"empty": b"", "exact": exact})
        self.assertEqual(sorted(self.methods(proxy)), [("PUT", ""), ("PUT", "")])

    def test_a_failing_part_keeps_the_file(self):
        data = os.urandom(3 * 5 * MIB)
        write_file(self.source, "big.bin", data)

        def rule(request):
            return ("answer", 503, "SlowDown") if "partNumber=2&" in request.target else None
        proxy = self.fault_proxy(rule)
        result = self.run_s3push("--multipart-threshold", "5MiB", "--part-size", "5MiB",
                                 "--retries", "1", endpoint=proxy.endpoint)
        self.assertEqual(result.status, 75, result.stderr)
        self.assertIn("part 2: SlowDown", result.stderr)
        self.assertEqual(files_under(self.source), [b"big.bin"])
        calls = self.methods(proxy)
        self.assertEqual(len([t for m, t in proxy.requests if "partNumber=2&" in t]), 2,
                         "one retry of the failing part")
        self.assertNotIn(("POST", "uploadId"), calls, "an upload with a failed part was "
                         "completed")
        self.assertIsNone(self.server.object_bytes(self.prefix + "big.bin"))

    def test_a_part_that_fails_once_is_retried(self):
        data = os.urandom(2 * 5 * MIB + 1)
        write_file(self.source, "big.bin", data)

        def rule(request):
            return ("answer", 500, "InternalError") \
                if "partNumber=1&" in request.target and not request.attempt else None
        result = self.run_s3push("--multipart-threshold", "5MiB", "--part-size", "5MiB",
                                 endpoint=self.fault_proxy(rule).endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"big.bin": data})

    def test_the_parts_of_a_file_alone_go_over_every_connection(self):
        data = os.urandom(2 * 5 * MIB + 1)
        write_file(self.source, "big.bin", data)
        met = threading.Barrier(3, timeout=20)   # the three parts, in flight at once
        late = []

        def rule(request):
            if "partNumber=" in request.target and not request.attempt:
                try:
                    met.wait()
                except threading.BrokenBarrierError:
                    late.append(request.target)
            return None
        result = self.run_s3push("--multipart-threshold", "5MiB", "--part-size", "5MiB",
                                 "--jobs", "3", endpoint=self.fault_proxy(rule).endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(late, [], "the parts went up one after another")
        self.assert_landed({"big.bin": data})

    def test_many_files_and_multipart_files_in_parallel(self):
        expected = {"m%d.bin" % i: os.urandom(5 * MIB + i * 7919) for i in range(3)}
        expected.update({"dir%d/s%d" % (i % 5, i): os.urandom(i * 13) for i in range(200)})
        for relative, data in expected.items():
            write_file(self.source, relative, data)
        result = self.run_s3push("--multipart-threshold", "5MiB", "--part-size", "5MiB",
                                 "--jobs", "3")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(expected)


if __name__ == "__main__":
    unittest.main()

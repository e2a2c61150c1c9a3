"""Least privilege, secrets, TLS, and every way of holding the script wrong.

Each test drives the real script. Bad input must end in one line naming the culprit, the
right exit status, and no file deleted; secrets must never be printed; a hostile server
must not crash, hang or fool the script.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3server  # noqa: E402
from helpers import (FOREIGN, RUN_TIMEOUT, IntegrationCase, Result,  # noqa: E402
                     files_under, skip_unless_server_checks, soak, write_file)

sys.path.insert(0, s3server.REPO)
import s3push  # noqa: E402
s3push.load_deferred_modules()   # what a run loads once it has a file to send

CANARY_TOKEN = "CANARYtoken0123456789SESSION"
NOBODY = 65534


class Secrets(IntegrationCase):
    """The canary: the server's real secret and a session token, in every situation."""

    def assert_no_canary(self, result):
        for canary in (self.server.secret_key, CANARY_TOKEN):
            self.assertNotIn(canary, result.stdout + result.stderr)

    @skip_unless_server_checks("session-token")
    def test_success_at_every_verbosity(self):
        write_file(self.source, "f", b"data")
        env = self.env(AWS_SESSION_TOKEN=CANARY_TOKEN)
        result = self.run_s3push("-v", "--debug", env=env)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_no_canary(result)
        self.assertIn("--- canonical request", result.stderr)
        self.assertIn("x-amz-security-token:<redacted>", result.stderr)
        self.assertNotRegex(result.stderr, "Signature=[0-9a-f]{64}")

    def test_errors(self):
        write_file(self.source, "f", b"data")
        cases = [
            self.env(AWS_SESSION_TOKEN=CANARY_TOKEN, AWS_ACCESS_KEY_ID="AKWRONG"),
            self.env(AWS_SESSION_TOKEN=CANARY_TOKEN, AWS_PROFILE="missing"),
        ]
        for env in cases:
            result = self.run_s3push("-v", "--debug", env=env)
            self.assertNotEqual(result.status, 0)
            self.assert_no_canary(result)
        result = self.run_s3push("--debug", env=self.env(AWS_SESSION_TOKEN=CANARY_TOKEN),
                                 endpoint="http://127.0.0.1:%d" % s3server.free_port())
        self.assertEqual(result.status, 75)
        self.assert_no_canary(result)

    def test_malformed_credentials_file(self):
        write_file(self.source, "f", b"data")
        path = os.path.join(self.home, "creds")
        with open(path, "w") as handle:
            handle.write("%s\n[default]\naws_access_key_id = AK\n" % self.server.secret_key)
        env = self.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None,
                       AWS_SHARED_CREDENTIALS_FILE=path)
        result = self.run_s3push(env=env)
        self.assertEqual(result.status, 78, result.stderr)
        self.assertIn("%s line 1" % path, result.stderr)
        self.assert_no_canary(result)

    def test_a_key_with_a_newline_is_refused_without_showing_it(self):
        write_file(self.source, "f", b"data")
        env = self.env(AWS_SESSION_TOKEN=CANARY_TOKEN + "\nX-Injected: 1")
        result = self.run_s3push(env=env)
        self.assertEqual(result.status, 78, result.stderr)
        self.assertIn("the session token from environment holds a space", result.stderr)
        self.assert_no_canary(result)

    def test_internal_errors_are_scrubbed(self):
        creds = s3push.Credentials("AK", self.server.secret_key, CANARY_TOKEN)
        error = s3push.internal_error(ValueError("header %s and %s" % (
            self.server.secret_key, CANARY_TOKEN)), creds)
        self.assertNotIn(self.server.secret_key, str(error))
        self.assertNotIn(CANARY_TOKEN, str(error))
        self.assertEqual(error.exit_code, 70)

    def test_the_command_line_holds_no_secret(self):
        write_file(self.source, "f", b"data")
        gate = s3server.GateProxy(self.recorder.endpoint)
        self.addCleanup(gate.close)
        process = subprocess.Popen(self.command(endpoint=gate.endpoint),
                                   env=self.env(AWS_SESSION_TOKEN=CANARY_TOKEN),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(process.kill)
        self.assertTrue(gate.arrived.wait(RUN_TIMEOUT))
        with open("/proc/%d/cmdline" % process.pid, "rb") as handle:
            cmdline = handle.read()
        gate.release.set()
        process.wait(RUN_TIMEOUT)
        self.assertNotIn(self.server.secret_key.encode(), cmdline)
        self.assertNotIn(CANARY_TOKEN.encode(), cmdline)

    def test_credentials_file_readable_by_others_is_warned_about(self):
        write_file(self.source, "f", b"data")
        path = os.path.join(self.home, "creds")
        with open(path, "w") as handle:
            handle.write("[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n"
                         % (self.server.access_key, self.server.secret_key))
        env = self.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None,
                       AWS_SHARED_CREDENTIALS_FILE=path)
        os.chmod(path, 0o644)
        result = self.run_s3push(env=env)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn("%s holds credentials and is readable by group or others (mode 0644)"
                      % path, result.stderr)
        self.assert_no_canary(result)
        os.chmod(path, 0o600)
        write_file(self.source, "g", b"data")
        result = self.run_s3push(env=env)
        self.assertEqual((result.status, result.stderr), (0, ""))


@unittest.skipIf(s3server.server_kind() != "moto", "only moto enforces IAM policies here")
class LeastPrivilege(IntegrationCase):
    def test_the_keys_may_only_put(self):
        """The script's keys are PutObject-only: reading or listing is refused."""
        probe = s3server.Server(self.server.endpoint, self.server.bucket,
                                self.server.access_key, self.server.secret_key)
        self.assertEqual(probe.signed_get("/" + self.server.bucket)[0], 403)
        write_file(self.source, "f", b"data")
        self.assertEqual(self.run_s3push().status, 0)
        self.assertEqual(probe.signed_get("/%s/%sf" % (self.server.bucket, self.prefix))[0],
                         403)
        self.assert_landed({"f": b"data"})


class Tls(IntegrationCase):
    """rclone's server over https with a certificate from a CA of the test's own."""

    @classmethod
    def setUpClass(cls):
        cls.pki = tempfile.mkdtemp(prefix="s3push-ca-")
        cls.ca, cert, key = s3server.make_ca(cls.pki)
        cls.https = s3server.RcloneServer(tls=(cert, key))

    @classmethod
    def tearDownClass(cls):
        cls.https.stop()
        shutil.rmtree(cls.pki, ignore_errors=True)

    def env(self, **extra):
        extra.setdefault("AWS_ACCESS_KEY_ID", self.https.access_key)
        extra.setdefault("AWS_SECRET_ACCESS_KEY", self.https.secret_key)
        return IntegrationCase.env(self, **extra)

    def landed(self, data):
        return self.https.object_bytes(self.prefix + "f") == data

    def test_refused_without_the_ca(self):
        write_file(self.source, "f", b"data")
        result = self.run_s3push(endpoint=self.https.endpoint)
        self.assertEqual(result.status, 78, result.stderr)
        self.assertIn("is not trusted", result.stderr)
        self.assertIn("--ca-bundle", result.stderr)
        self.assertEqual(files_under(self.source), [b"f"])

    def test_works_with_the_ca_from_each_source(self):
        config = os.path.join(self.home, "config")
        with open(config, "w") as handle:
            handle.write("[default]\nca_bundle = %s\n" % self.ca)
        for args, env in ((["--ca-bundle", self.ca], self.env()),
                          ([], self.env(AWS_CA_BUNDLE=self.ca)),
                          ([], self.env(AWS_CONFIG_FILE=config))):
            write_file(self.source, "f", b"via %r" % args)
            result = self.run_s3push(*args, endpoint=self.https.endpoint, env=env)
            self.assertEqual(result.status, 0, result.stderr)
            self.assertTrue(self.landed(b"via %r" % args))

    def test_over_tls_bodies_go_unsigned_unless_asked(self):
        # TLS keeps a body whole on the way: its signed Content-MD5 vouches for it, and
        # the SHA-256 (a second hash of every byte) is left out unless asked for.
        for args, unsigned in (((), True), (("--sign-payload",), False)):
            write_file(self.source, "f", b"tls %r" % (args,))
            result = self.run_s3push("--debug", "--ca-bundle", self.ca, *args,
                                     endpoint=self.https.endpoint)
            self.assertEqual(result.status, 0, result.stderr)
            self.assertTrue(self.landed(b"tls %r" % (args,)))
            put = result.stderr.split("debug: PUT ", 1)[1].split("--- string to sign")[0]
            self.assertEqual("\nUNSIGNED-PAYLOAD" in put, unsigned, put)

    def test_a_missing_ca_bundle_is_a_clear_error(self):
        write_file(self.source, "f", b"data")
        result = self.run_s3push("--ca-bundle", "/nonexistent.pem",
                                 endpoint=self.https.endpoint)
        self.assertEqual(result.status, 78, result.stderr)
        self.assertIn("cannot use the CA bundle /nonexistent.pem", result.stderr)


class BadInput(IntegrationCase):
    def assert_one_line(self, result, status, *fragments):
        self.assertEqual(result.status, status, result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        for fragment in fragments:
            self.assertIn(fragment, result.stderr)

    def as_nobody(self):
        """Run the script as nobody when root (whom no permission stops), else as is."""
        if os.geteuid() != 0:
            return None
        for path in (self.tmp, self.source, self.home):
            os.chown(path, NOBODY, NOBODY)
        return ["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups",
                "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable]

    def run_as(self, prefix, *args, **kw):
        argv = self.command(*args, **kw)
        if prefix:
            argv = prefix + argv[1:]
        done = subprocess.run(argv, env=kw.get("env") or self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
        return done.returncode, done.stderr.decode("utf-8", "replace")

    def test_unreadable_source_dir(self):
        prefix = self.as_nobody()
        write_file(self.source, "f", b"data")
        os.chmod(self.source, 0)
        try:
            status, err = self.run_as(prefix)
        finally:
            os.chmod(self.source, 0o755)
        self.assertEqual(status, 66, err)
        self.assertIn("is not readable by this user", err)

    def test_a_file_that_cannot_be_read(self):
        prefix = self.as_nobody()
        write_file(self.source, "ok", b"ok")
        secret = write_file(self.source, "locked", b"locked")
        os.chmod(secret, 0)
        if prefix:
            os.chown(os.path.join(self.source, "ok"), NOBODY, NOBODY)
        status, err = self.run_as(prefix)
        self.assertEqual(status, 65, err)
        self.assertIn("locked -> s3://", err)
        self.assertIn("cannot read (Permission denied)", err)
        self.assertEqual(files_under(self.source), [b"locked"])
        self.assert_landed({"ok": b"ok"})

    def test_unreadable_credentials_file(self):
        prefix = self.as_nobody()
        write_file(self.source, "f", b"data")
        path = os.path.join(self.tmp, "creds")
        with open(path, "w") as handle:
            handle.write("[default]\naws_access_key_id = A\naws_secret_access_key = B\n")
        os.chmod(path, 0)
        env = self.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None,
                       AWS_SHARED_CREDENTIALS_FILE=path)
        status, err = self.run_as(prefix, env=env)
        self.assertEqual(status, 78, err)
        self.assertIn("cannot read %s" % path, err)

    def test_settings_errors(self):
        write_file(self.source, "f", b"data")
        notini = os.path.join(self.home, "notini")
        with open(notini, "w") as handle:
            handle.write("just some text\n")
        cases = [
            (self.env(AWS_PROFILE="nope"), (), "profile 'nope' not found"),
            (self.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None,
                      AWS_SHARED_CREDENTIALS_FILE=notini), (), notini + " line 1"),
            (self.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None,
                      AWS_SHARED_CREDENTIALS_FILE=os.path.join(self.home, "missing")), (),
             "no credentials for profile 'default'"),
            (self.env(), ("--endpoint-url", "ftp://x"), "endpoint URL 'ftp://x'"),
            (self.env(), ("--endpoint-url", "https://admin:Sup3rS3cret@h"),
             "the endpoint URL holds a user name or a password"),
        ]
        for env, args, fragment in cases:
            argv = [sys.executable, s3server.S3PUSH] + list(args) + [
                self.source, "s3://%s/p" % self.server.bucket]
            if not args:
                argv[2:2] = ["--endpoint-url", self.recorder.endpoint]
            done = subprocess.run(argv, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
            err = done.stderr.decode()
            self.assertEqual(done.returncode, 78, err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn(fragment, err)
            self.assertNotIn("Sup3rS3cret", err)
        self.assertEqual(files_under(self.source), [b"f"])

    def test_bad_destinations(self):
        write_file(self.source, "f", b"data")
        for destination, fragment in (("s3://", "bucket name ''"),
                                      ("s3://No_Such", "bucket name 'No_Such'"),
                                      ("/tmp/x", "'/tmp/x' is not an s3://")):
            done = subprocess.run([sys.executable, s3server.S3PUSH, self.source, destination],
                                  env=self.env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
            self.assertEqual(done.returncode, 2, done.stderr)
            self.assertIn(fragment, done.stderr.decode())

    def write_named(self, raw, data, mtime=None):
        """A file at this relative name (bytes, as on disk), old enough to go."""
        path = os.path.join(os.fsencode(self.source), raw)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
        os.utime(path, (mtime or time.time() - 3600,) * 2)

    def served(self, key):
        """The bytes a GET of key answers (rclone's server keeps U+201B doubled in its
        files' names, so they are not read directly here), None when there is none."""
        status, body = self.server.signed_get("/%s/%s" % (self.server.bucket, key))
        return body if status == 200 else None

    def test_names_that_are_not_utf8_move_escaped_beside_their_utf8_twin(self):
        # Each byte that is not UTF-8 is U+201B and its hex digits in the key; the object
        # and the manifest line carry the original bytes percent-encoded. One file at a
        # time: rclone's server, sent names holding U+201B into a new folder at once, fails
        # some of the PUTs and, for minutes, answers 404 to GETs of keys it confirmed.
        files = {b"caf\xe9.csv": (b"latin-1 name", "caf\u201bE9.csv", "caf%E9.csv"),
                 "caf\u00e9.csv".encode(): (b"utf-8 name", "caf\u00e9.csv", ""),
                 b"cam\xff/IMG\xc3.jpg": (b"firmware", "cam\u201bFF/IMG\u201bC3.jpg",
                                          "cam%FF/IMG%C3.jpg"),
                 b"VID\xc3.bin": (os.urandom(6 * 1024 * 1024), "VID\u201bC3.bin", "VID%C3.bin")}
        for raw, (data, _, _) in files.items():
            self.write_named(raw, data)
        manifest = os.path.join(self.tmp, "moved.jsonl")
        result = self.run_s3push("--manifest", manifest, "--multipart-threshold", "5MiB",
                                 "--part-size", "5MiB", "--jobs", "1")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        with open(manifest, "rb") as handle:
            text = handle.read().decode("utf-8")   # UTF-8 for every reader: no lone surrogate
        self.assertNotIn("\\udc", text)
        lines = {line["key"]: line for line in map(json.loads, text.splitlines())}
        firsts = {urllib.parse.unquote(h.target.split("?")[0].split("/", 2)[2]): h
                  for h in self.recorder.heads if h.method in ("PUT", "POST") and
                  "partNumber" not in h.target and "uploadId" not in h.target}
        for raw, (data, escaped, original) in files.items():
            key = self.prefix + escaped
            self.assertEqual(self.served(key), data, key)
            self.assertEqual(firsts[key].header("x-amz-meta-s3push-name"), original)
            self.assertEqual(self.server.object_headers(key).get("x-amz-meta-s3push-name", ""),
                             original)
            line = lines[key]
            self.assertEqual(line["path"], os.path.join(self.source, escaped))
            if original:
                self.assertEqual(urllib.parse.unquote_to_bytes(line["path_bytes"]),
                                 os.path.join(os.fsencode(self.source), raw))
            else:
                self.assertNotIn("path_bytes", line)

    def test_an_escaped_name_and_a_file_of_that_very_name_never_share_a_key(self):
        # A U+201B of the name itself is doubled, so the Latin-1 caf\xe9 and a file really
        # named caf\u201bE9 get two keys, across two runs (the second used to overwrite the
        # first's object under the default --if-exists overwrite) and in one.
        latin, literal = b"caf\xe9.csv", "caf\u201bE9.csv".encode()
        sent = []   # (key, request) of each PUT, as the proxy saw it
        self.recorder.rule = lambda request: sent.append((urllib.parse.unquote(
            request.target.split("/", 2)[2]), request)) if request.method == "PUT" else None
        base = self.prefix
        for number, runs in enumerate((([latin], [literal]), ([literal], [latin]),
                                       ([latin, literal],))):
            with self.subTest(runs=runs):
                self.prefix = base + "%d/" % number
                del sent[:]
                for names in runs:
                    for raw in names:
                        self.write_named(raw, raw)
                    result = self.run_s3push()
                    self.assertEqual(result.status, 0, result.stderr)
                self.assertEqual(files_under(self.source), [])
                escaped = self.prefix + "caf\u201bE9.csv"
                doubled = self.prefix + "caf\u201b\u201bE9.csv"
                puts = dict(sent)
                self.assertEqual({key: put.body for key, put in puts.items()},
                                 {escaped: latin, doubled: literal})
                # A UTF-8 name's key alone gives its bytes back: no name in the metadata.
                self.assertEqual(puts[escaped].header("x-amz-meta-s3push-name"), "caf%E9.csv")
                self.assertEqual(puts[doubled].header("x-amz-meta-s3push-name"), "")
                if not isinstance(self.server, s3server.RcloneServer):
                    # (rclone serve s3 reads U+201B in a key as its own escape: both keys
                    # are one file there, so only what was sent is checked on it.)
                    self.assertEqual(self.served(escaped), latin)
                    self.assertEqual(self.served(doubled), literal)

    def test_a_name_whose_bytes_overflow_the_metadata_is_kept(self):
        raw = b"/".join(["\u00e9".encode() * 120] * 3) + b"/caf\xe9"   # 2,171 percent-encoded
        self.write_named(raw, b"x")
        result = self.run_s3push()
        self.assert_one_line(result, 65, "take the metadata to ", "over S3's limit of 2 KiB")
        self.assertEqual(files_under(self.source), [raw])
        self.assertEqual([h.target for h in self.recorder.heads if h.method == "PUT"], [])

    def test_keys_too_long(self):
        write_file(self.source, "fine", b"fine")
        long_name = "/".join(["d" * 250] * 4) + "/f"
        write_file(self.source, long_name, b"deep")
        result = self.run_s3push()
        self.assert_one_line(result, 65, "the key would be %d bytes, over S3's limit of 1024"
                             % len(self.prefix + long_name))
        self.assertEqual(files_under(self.source), [long_name.encode()])
        self.assert_landed({"fine": b"fine"})

    def test_symlink_loops_and_links_outside(self):
        write_file(self.source, "a/f", b"f")
        os.symlink("..", os.path.join(self.source, "a", "loop"))
        os.symlink(self.source, os.path.join(self.source, "self"))
        os.symlink("/etc", os.path.join(self.source, "etc"))
        result = self.run_s3push()
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(self.server.keys(self.prefix), {self.prefix + "a/f"})

    def test_a_file_that_vanishes_after_the_scan(self):
        write_file(self.source, "a", b"a")
        write_file(self.source, "b", b"b")
        gate = s3server.GateProxy(self.recorder.endpoint)
        self.addCleanup(gate.close)
        process = subprocess.Popen(self.command("--jobs", "1", endpoint=gate.endpoint),
                                   env=self.env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        self.addCleanup(process.kill)
        self.assertTrue(gate.arrived.wait(RUN_TIMEOUT))
        left = [n for n in os.listdir(self.source)]
        for name in left:   # the one not being sent is renamed away, the other stays
            os.rename(os.path.join(self.source, name), os.path.join(self.tmp, name))
        gate.release.set()
        _, err = process.communicate(timeout=RUN_TIMEOUT)
        self.assertEqual(process.returncode, 0, err)
        self.assertIn(b"vanished", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_a_directory_of_100000_files_keeps_memory_flat(self):
        if not os.access("/usr/bin/time", os.X_OK):
            self.skipTest("GNU time (/usr/bin/time) measures the peak RSS")
        peaks = []
        for count in (1000, soak(100000, 20000)):
            shutil.rmtree(self.source)
            os.makedirs(self.source)
            for i in range(count):
                os.close(os.open(os.path.join(self.source, "f%06d" % i),
                                 os.O_CREAT | os.O_WRONLY))
            report = os.path.join(self.tmp, "rss")
            argv = ["/usr/bin/time", "-f", "%M", "-o", report] + self.command(
                "--min-age", "999999999")   # every file too young: the scan is the work
            done = subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
            self.assertEqual(done.returncode, 0, done.stderr)
            with open(report) as handle:
                peaks.append(int(handle.read().split()[-1]))
        self.assertLess(peaks[1] - peaks[0], 4096, "peak RSS grew from %d KiB to %d KiB"
                        % tuple(peaks))


# A writer that swaps SOURCE_DIR's top-level entries for symlinks into the victim folder
# (directories for the folder, files for its secret.txt) and back, at seeded moments; at
# the end everything it moved away is put back.
WRITER = r"""
import os, random, sys, time
source, victim, away, seed, seconds = sys.argv[1:]
rng, moved = random.Random(int(seed)), {}
deadline = time.time() + float(seconds)
time.sleep(rng.uniform(0, float(seconds) / 3))
n = 0

def put_back(name):
    path = os.path.join(source, name)
    try:
        os.unlink(path)
    except FileNotFoundError:   # a run unlinked the link itself (never what it points to)
        pass
    os.rename(moved.pop(name), path)

while time.time() < deadline:
    names = sorted(set(os.listdir(source)) | set(moved))
    if names:
        name = rng.choice(names)
        path = os.path.join(source, name)
        n += 1
        if name in moved:
            put_back(name)
        elif not os.path.islink(path) and os.path.lexists(path):
            target = victim if os.path.isdir(path) else os.path.join(victim, "secret.txt")
            try:
                os.rename(path, os.path.join(away, "%s.%d" % (name, n)))
            except FileNotFoundError:   # moved, or its empty directory removed, by a run
                continue
            moved[name] = os.path.join(away, "%s.%d" % (name, n))
            os.symlink(target, path)
    time.sleep(rng.uniform(0, 0.05))
for name in list(moved):
    put_back(name)
"""


class HostileWriter(IntegrationCase):
    """A writer in SOURCE_DIR swaps directories and files for symlinks into a victim folder
    outside it, whose names match: no run may read, upload, unlink or rmdir anything there."""

    def setUp(self):
        IntegrationCase.setUp(self)
        self.victim = os.path.join(self.tmp, "victim")
        self.away = os.path.join(self.tmp, "away")
        os.makedirs(os.path.join(self.victim, "q"))   # empty: an rmdir through a link takes it
        os.makedirs(self.away)
        for name in ("secret.txt", "f0", "f1", "victim-only.txt", "sub/secret.txt"):
            write_file(self.victim, name, b"VICTIM " + name.encode())
        self.victim_before = self.tree(self.victim)

    @staticmethod
    def tree(root):
        """{relative path: bytes, or None for a directory} of everything under root."""
        found = {}
        for directory, dirs, names in os.walk(root):
            for name in dirs:
                found[os.path.relpath(os.path.join(directory, name), root)] = None
            for name in names:
                path = os.path.join(directory, name)
                with open(path, "rb") as handle:
                    found[os.path.relpath(path, root)] = handle.read()
        return found

    def assert_victim_untouched(self, result=None):
        detail = result.stderr if result is not None else ""
        self.assertEqual(self.tree(self.victim), self.victim_before, detail)
        for key in self.server.keys(self.prefix):
            self.assertNotIn(b"VICTIM", self.server.object_bytes(key), key + detail)

    def write_tree(self, names):
        """Files whose bytes say their own path; {relative: bytes}."""
        written = {}
        for name in names:
            written[name] = ("mine %s\n" % name).encode()
            write_file(self.source, name, written[name])
        return written

    def swap_for_link(self, name, target):
        os.rename(os.path.join(self.source, name), os.path.join(self.away, name))
        os.symlink(target, os.path.join(self.source, name))

    def held_run(self, *args, hold=1):
        """A run whose hold-th PUT waits until the test releases it; (PUT targets so far,
        the release event, the process)."""
        proxy = s3server.HoldProxy(self.recorder.endpoint, hold)
        self.proxies.append(proxy)
        self.addCleanup(proxy.release.set)
        process = subprocess.Popen(self.command("--jobs", "1", *args, endpoint=proxy.endpoint),
                                   env=self.env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.addCleanup(process.kill)
        self.assertTrue(proxy.arrived.wait(RUN_TIMEOUT), "the held PUT never came")
        return proxy.puts, proxy.release, process

    def finish(self, release, process):
        release.set()
        out, err = process.communicate(timeout=RUN_TIMEOUT)
        return Result(process.returncode, out.decode(), err.decode())

    def test_a_directory_swapped_for_a_symlink_during_the_run(self):
        # The first file of zzz is held on its way up (the scan has met zzz by then); zzz
        # is swapped for a link to the victim folder, whose files have the same names.
        mine = self.write_tree(["zzz/secret.txt", "zzz/f0", "zzz/f1"])
        puts, release, process = self.held_run()
        self.swap_for_link("zzz", self.victim)
        result = self.finish(release, process)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(result.stderr.count("swapped for a symlink during the run"), 3,
                         result.stderr)
        self.assert_victim_untouched(result)
        held = puts[0].split("/")[-1]
        self.assertEqual(self.server.keys(self.prefix), {self.prefix + "zzz/" + held})
        self.assert_landed({"zzz/" + held: mine["zzz/" + held]})
        self.assertEqual(self.tree(os.path.join(self.away, "zzz")),
                         {name.split("/")[1]: data for name, data in mine.items()})

    def test_a_file_swapped_for_a_symlink_during_the_run(self):
        self.write_tree(["f0", "f1"])
        _, release, process = self.held_run()
        for name in ("f0", "f1"):   # the one held was opened already; the other was not
            self.swap_for_link(name, os.path.join(self.victim, name))
        result = self.finish(release, process)
        self.assertEqual(result.status, 0, result.stderr)
        # The held one is refused at its unlink; the other at its open, or passed over by
        # the scan if it was not listed yet.
        self.assertIn(result.stderr.count("replaced by a symlink during the run"), (1, 2),
                      result.stderr)
        self.assert_victim_untouched(result)
        self.assertEqual(sorted(os.listdir(self.source)), ["f0", "f1"])   # the links, kept
        self.assertEqual(sorted(os.listdir(self.away)), ["f0", "f1"])

    def test_delete_empty_dirs_with_a_swapped_parent(self):
        # p/q/secret.txt, y/q/secret.txt and z/q/secret.txt: whichever goes first, once it
        # is removed (after the next file's upload: see s3push.worker), its top directory
        # is swapped for a symlink to a folder that has q/ too, before the rmdirs.
        mine = self.write_tree(["p/q/secret.txt", "y/q/secret.txt", "z/q/secret.txt"])
        puts, release, process = self.held_run("--delete-empty-dirs", hold=3)
        first = puts[0].split("/")[-3]
        self.swap_for_link(first, self.victim)
        result = self.finish(release, process)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_victim_untouched(result)
        self.assertEqual(os.listdir(self.source), [first])   # the link; the other is gone
        self.assertTrue(os.path.islink(os.path.join(self.source, first)))
        self.assertEqual(self.tree(os.path.join(self.away, first)), {"q": None})
        self.assert_landed(mine)

    def test_hard_links_follow_the_kernel_s_protection(self):
        mine = self.write_tree(["linked"])
        os.link(os.path.join(self.source, "linked"), os.path.join(self.tmp, "other-link"))
        try:
            with open("/proc/sys/fs/protected_hardlinks") as handle:
                protected = handle.read().strip() == "1"
        except FileNotFoundError:   # not Linux, or no /proc: as unsafe as off
            self.assertTrue(FOREIGN, "no /proc/sys/fs/protected_hardlinks on Linux")
            protected = False
        result = self.run_s3push()
        if not protected:   # refused, named, kept; then moved when allowed
            self.assertEqual(result.status, 65, result.stderr)
            self.assertIn("has 2 hard links", result.stderr)
            if FOREIGN:
                self.assertIn("the kernel does not say that users cannot link in others' "
                              "files", result.stderr)
            self.assertEqual(files_under(self.source), [b"linked"])
            result = self.run_s3push("--allow-hardlinks")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(mine)
        with open(os.path.join(self.tmp, "other-link"), "rb") as handle:
            self.assertEqual(handle.read(), mine["linked"])

    def test_swaps_at_seeded_moments(self):
        inner = ("secret.txt", "f0", "f1", "g", "sub/secret.txt")
        names = ["top0", "top1", "top2"] + ["d%d/%s" % (d, n) for d in range(5) for n in inner]
        slow = s3server.FaultProxy(self.recorder.endpoint, lambda request: ("stall", 0.03))
        self.proxies.append(slow)
        for seed in range(soak(6, 2)):
            shutil.rmtree(self.source)
            mine = self.write_tree(names)
            away = os.path.join(self.away, str(seed))
            os.makedirs(away)
            writer = subprocess.Popen([sys.executable, "-c", WRITER, self.source, self.victim,
                                       away, str(seed), "1.5"])
            self.addCleanup(writer.kill)
            result = self.run_s3push("--jobs", str(1 + seed % 3), "--delete-empty-dirs",
                                     endpoint=slow.endpoint)
            self.assertEqual(writer.wait(RUN_TIMEOUT), 0)
            self.assertIn(result.status, (0, 65), result.stderr)
            self.assert_victim_untouched(result)
            self.assertFalse([k for k in self.server.keys(self.prefix) if "victim-only" in k])
            # Nothing lost: what the writer put back goes up on a quiet second run.
            again = self.run_s3push("--delete-empty-dirs")
            self.assertEqual(again.status, 0, again.stderr)
            self.assertEqual(files_under(self.source), [], again.stderr)
            self.assert_landed(mine)
            self.assert_victim_untouched(again)
            self.prefix = self.prefix.rstrip("/") + "-%d/" % seed

    def test_a_scan_through_a_swapping_tree_lists_nothing_outside(self):
        names = ["d%03d/f0" % d for d in range(300)]
        self.write_tree(names)
        writer = subprocess.Popen([sys.executable, "-c", WRITER.replace(
            "rng.uniform(0, 0.05)", "0").replace("float(seconds) / 3", "0"), self.source,
            self.victim, self.away, "7", "2"])
        self.addCleanup(writer.kill)
        seen = set()
        while writer.poll() is None:
            result = self.run_s3push("--dry-run")
            self.assertEqual(result.status, 0, result.stderr)
            lines = result.stdout.splitlines()
            self.assertEqual([x for x in lines if "victim-only" in x or "/sub/" in x], [])
            seen.update(line.split()[2] for line in lines)
        self.assertEqual(writer.returncode, 0)
        self.assertTrue(seen, "the dry runs listed nothing")
        self.assert_victim_untouched()


class HostileServer(IntegrationCase):
    """A server of the test's own that answers badly on purpose (it checks nothing)."""

    def serve(self, answer):
        """Answer every request with answer(request_head) -> bytes, or None to stall."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self.addCleanup(listener.close)

        def handle(client):
            reader = client.makefile("rb")
            try:
                while True:
                    head = s3server.read_head(reader)
                    if head is None:
                        return
                    reader.read(s3server.content_length(head))
                    data = answer(head)
                    if data is None:
                        time.sleep(30)
                        return
                    for start in range(0, len(data), 65536):
                        client.sendall(data[start:start + 65536])
            except OSError:
                return
            finally:
                client.close()

        def accept():
            while True:
                try:
                    client, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=handle, args=(client,), daemon=True).start()
        threading.Thread(target=accept, daemon=True).start()
        return "http://127.0.0.1:%d" % listener.getsockname()[1]

    def run_against(self, answer, *args):
        write_file(self.source, "f", b"data")
        started = time.monotonic()
        result = self.run_s3push("--retries", "1", "--timeout", "2", *args,
                                 endpoint=self.serve(answer))
        self.assertLess(time.monotonic() - started, 60, "the run hung")
        self.assertNotEqual(result.status, 0)
        self.assertNotEqual(result.status, 70, "crashed: " + result.stderr)
        self.assertEqual(files_under(self.source), [b"f"])
        return result

    @staticmethod
    def http(status, body, headers=""):
        return ("HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n" % (status, len(body), headers)
                ).encode() + body

    def test_answers_that_are_not_xml(self):
        result = self.run_against(lambda h: self.http("500 Oops", b"<html>no</html>"))
        self.assertEqual(result.status, 75)
        self.assertIn("HTTP500: Oops", result.stderr)

    def test_xml_with_an_external_entity(self):
        body = (b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                b"<Error><Code>&x;</Code></Error>")
        result = self.run_against(lambda h: self.http("400 Bad Request", body))
        self.assertNotIn("root:", result.stderr)
        self.assertIn("HTTP400", result.stderr)

    def test_xml_entity_expansion_bomb(self):
        entities = "".join('<!ENTITY l%d "&l%d;&l%d;&l%d;&l%d;&l%d;&l%d;&l%d;&l%d;&l%d;&l%d;">'
                           % ((i,) + (i - 1,) * 10) for i in range(1, 10))
        body = ('<?xml version="1.0"?><!DOCTYPE b [<!ENTITY l0 "lol">%s]><Error><Code>&l9;'
                '</Code></Error>' % entities).encode()
        self.run_against(lambda h: self.http("400 Bad Request", body))

    def test_a_huge_error_body(self):
        huge = b"x" * (64 * 1024 * 1024)
        result = self.run_against(lambda h: self.http("500 Huge", huge))
        self.assertEqual(result.status, 75)

    def test_a_redirect_to_another_host(self):
        result = self.run_against(lambda h: self.http(
            "307 Temporary Redirect", b"", "Location: http://203.0.113.1/steal\r\n"))
        self.assertEqual(result.status, 78)
        self.assertIn("HTTP 307", result.stderr)

    def test_success_without_an_etag_and_garbage_and_silence(self):
        self.assertEqual(self.run_against(lambda h: self.http("200 OK", b"")).status, 75)
        self.assertEqual(self.run_against(lambda h: b"garbage\r\n\r\n").status, 75)
        self.assertEqual(self.run_against(lambda h: None).status, 75)


if __name__ == "__main__":
    unittest.main()

"""Operations: upload options, key templates, summaries, progress (issue: operators' habits).

The recording proxy in front of the server shows the headers each request carried.
"""

import base64
import calendar
import os
import random
import re
import resource
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import IntegrationCase, files_under, skip_unless_server_checks  # noqa: E402
from helpers import LACKS, RUN_TIMEOUT, WithArchive, soak, write_file  # noqa: E402
import s3server  # noqa: E402

MULTIPART = ("--multipart-threshold", "5MiB", "--part-size", "5MiB")
LACKS_TAGGING = [kind for kind, lacks in LACKS.items() if "tagging" in lacks]


class UploadOptions(IntegrationCase):
    def puts(self):
        return [h for h in self.recorder.heads if h.method == "PUT" or "?uploads" in h.target]

    def test_option_headers_reach_the_server(self):
        write_file(self.source, "small.log", b"small")
        write_file(self.source, "big.bin", os.urandom(6 * 1024 * 1024))
        result = self.run_s3push("--storage-class", "STANDARD_IA", "--sse", "AES256",
                                 "--acl", "bucket-owner-full-control", "--content-type",
                                 "text/x-test", *MULTIPART)
        self.assertEqual(result.status, 0, result.stderr)
        first = [h for h in self.puts() if "partNumber" not in h.target]
        self.assertEqual(len(first), 2)   # the small PUT and the multipart start
        for head in first:
            self.assertEqual(head.header("x-amz-storage-class"), "STANDARD_IA")
            self.assertEqual(head.header("x-amz-server-side-encryption"), "AES256")
            self.assertEqual(head.header("x-amz-acl"), "bucket-owner-full-control")
            self.assertEqual(head.header("content-type"), "text/x-test")
            self.assertRegex(head.header("x-amz-meta-mtime"), r"^\d+\.\d{9}$")
            self.assertIn("x-amz-storage-class", head.header("authorization"))
        self.assertEqual(files_under(self.source), [])

    def test_over_plain_http_every_body_s_sha256_is_signed(self):
        # Unsigned, a body under its Content-MD5 or CRC32 could be changed on the way by
        # anyone who keeps that checksum; over http the signed SHA-256 is always sent (and
        # over TLS bodies go UNSIGNED-PAYLOAD unless asked: test_security.Tls).
        write_file(self.source, "small", b"small")
        write_file(self.source, "big.bin", os.urandom(6 * 1024 * 1024))
        for args in ((), ("--sign-payload",)):
            start = len(self.recorder.heads)
            result = self.run_s3push(*(args + MULTIPART))
            self.assertEqual(result.status, 0, result.stderr)
            bodies = [h for h in self.recorder.heads[start:] if h.method == "PUT"]
            self.assertEqual(len(bodies), 3)   # the small PUT and two parts
            for head in bodies:
                self.assertRegex(head.header("x-amz-content-sha256"), r"^[0-9a-f]{64}$")
                self.assertIn("x-amz-content-sha256", head.header("authorization"))
                self.assertTrue(head.header("content-md5"))
                self.assertIn("content-md5;", head.header("authorization"))
            write_file(self.source, "small", b"small")
            write_file(self.source, "big.bin", os.urandom(6 * 1024 * 1024))

    def test_content_type_guessed_and_mtime_kept(self):
        path = write_file(self.source, "page.html", b"<html>")
        mtime_ns = os.stat(path).st_mtime_ns
        self.assertEqual(self.run_s3push().status, 0)
        head = self.puts()[0]
        self.assertEqual(head.header("content-type"), "text/html")
        self.assertEqual(head.header("x-amz-meta-mtime"),
                         "%d.%09d" % divmod(mtime_ns, 10 ** 9))

    def test_sse_kms_rests_on_content_md5(self):
        write_file(self.source, "f", b"data")
        result = self.run_s3push("--sse", "aws:kms", "--sse-kms-key-id", "alias/logs")
        self.assertEqual(result.status, 0, result.stderr)
        head = self.puts()[0]
        self.assertEqual(head.header("x-amz-server-side-encryption-aws-kms-key-id"),
                         "alias/logs")
        self.assertTrue(head.header("content-md5"))

    def test_option_errors(self):
        write_file(self.source, "f", b"data")
        for args in (("--sse-kms-key-id", "k"), ("--storage-class", "standard"),
                     ("--acl", "everyone"), ("--sse", "rot13")):
            result = self.run_s3push(*args)
            self.assertEqual(result.status, 2, (args, result.stderr))
        self.assertEqual(files_under(self.source), [b"f"])

    def test_no_overwrite_sends_if_none_match(self):
        write_file(self.source, "f", b"data")
        self.assertEqual(self.run_s3push("--no-overwrite").status, 0)
        self.assertEqual(self.puts()[0].header("if-none-match"), "*")

    @skip_unless_server_checks("if-none-match")
    def test_no_overwrite_keeps_the_file_on_a_conflict(self):
        write_file(self.source, "f", b"first")
        self.assertEqual(self.run_s3push("--no-overwrite").status, 0)
        write_file(self.source, "f", b"second")
        result = self.run_s3push("--no-overwrite")
        self.assertEqual(result.status, 65, result.stderr)
        self.assertIn("--if-exists is keep", result.stderr)
        self.assertEqual(files_under(self.source), [b"f"])
        self.assert_landed({"f": b"first"})


class ObjectOptions(IntegrationCase):
    """Metadata, tags, the Cache-Control family and Object Lock, sent to a bucket with
    Object Lock (where moto's uploader may also tag and lock) and read back as an
    administrator, never by the script."""
    OPTIONS = ("--metadata", "owner=ops-{hostname}",
               "--metadata", "Note=caf\u00e9 {mtime_date}".encode(),
               "--tag", "team=data", "--tag", "kept until=2027/01 x@y",
               "--cache-control", "max-age=60", "--content-encoding", "identity",
               "--content-disposition", "attachment", "--object-lock-mode", "GOVERNANCE",
               "--object-lock-retain-days", "2", "--legal-hold")

    def setUp(self):
        IntegrationCase.setUp(self)
        self.bucket = self.server.bucket + "-objects"
        self.server.create_lock_bucket(self.bucket)

    def landed_headers(self, relative):
        status, body, headers = self.server.signed_request(
            "GET", "/%s/%s%s" % (self.bucket, self.prefix, relative))
        self.assertEqual(status, 200, body[:300])
        return body, headers

    def test_what_is_sent_arrives_on_every_request(self):
        small, big = b"small", os.urandom(6 * 1024 * 1024)
        write_file(self.source, "small.log", small, mtime=1790000000)
        write_file(self.source, "big.bin", big, mtime=1790000000)
        result = self.run_s3push("--debug", *(self.OPTIONS + MULTIPART), bucket=self.bucket)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        # RFC 2047 for what is not ASCII; {mtime_date} of 1790000000 is 2026-09-21
        note = "=?UTF-8?B?%s?=" % base64.b64encode("caf\u00e9 2026-09-21".encode()).decode()
        sent = {"x-amz-meta-owner": "ops-" + socket.gethostname(), "x-amz-meta-note": note,
                "x-amz-tagging": "team=data&kept%20until=2027%2F01%20x%40y",
                "cache-control": "max-age=60", "content-encoding": "identity",
                "content-disposition": "attachment", "x-amz-object-lock-mode": "GOVERNANCE",
                "x-amz-object-lock-legal-hold": "ON"}
        starts = [h for h in self.recorder.heads if h.method == "PUT" and "partNumber" not in
                  h.target or "?uploads" in h.target]
        self.assertEqual(len(starts), 2)   # the small PUT and CreateMultipartUpload
        for head in starts:   # each sent, and signed
            for name, value in sent.items():
                self.assertEqual(head.header(name), value, name)
                self.assertIn(name, head.header("authorization"))
            until = head.header("x-amz-object-lock-retain-until-date")
            self.assertRegex(until, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
            self.assertIn("x-amz-object-lock-retain-until-date", head.header("authorization"))
        self.assertIn("x-amz-tagging:team=data", result.stderr)   # --debug shows them
        lacks = LACKS.get(s3server.server_kind(), {})
        lock_lost, tags_lost = lacks.get("lock-multipart"), lacks.get("tagging-multipart")
        for relative, data in (("small.log", small), ("big.bin", big)):
            body, headers = self.landed_headers(relative)
            self.assertEqual(body, data)
            for name in ("x-amz-meta-owner", "x-amz-meta-note", "cache-control",
                         "content-encoding", "content-disposition"):
                self.assertEqual(headers.get(name), sent[name], (relative, name))
            if relative == "big.bin" and tags_lost:
                sys.stderr.write("[not checked: %s] " % tags_lost)
            else:
                self.check_tags(relative, headers)
            if relative == "big.bin" and lock_lost:
                sys.stderr.write("[not checked: %s] " % lock_lost)
                continue
            for name in ("x-amz-object-lock-mode", "x-amz-object-lock-legal-hold"):
                self.assertEqual(headers.get(name), sent[name], (relative, name))
            self.assertEqual(headers.get("x-amz-object-lock-retain-until-date", "")[:10],
                             until[:10])

    @skip_unless_server_checks("versioning")
    def test_the_version_id_is_shown_and_recorded(self):
        # A bucket with Object Lock keeps versions: -v, --summary-json and --manifest show
        # the VersionId the server gave each object, the one a GET of it answers.
        import json
        write_file(self.source, "a.log", b"alpha")
        write_file(self.source, "b.log", b"beta")
        summary, manifest = (os.path.join(self.tmp, name) for name in ("s.json", "m.jsonl"))
        result = self.run_s3push("-v", "--summary-json", summary, "--manifest", manifest,
                                 bucket=self.bucket)
        self.assertEqual(result.status, 0, result.stderr)
        with open(summary) as handle:
            versions = {v["url"]: v["version_id"] for v in json.load(handle)["versions"]}
        with open(manifest) as handle:
            lines = [json.loads(line) for line in handle]
        self.assertEqual(len(lines), 2)
        for line in lines:
            _, headers = self.landed_headers(line["key"][len(self.prefix):])
            version = headers.get("x-amz-version-id")
            self.assertTrue(version, headers)
            url = "s3://%s/%s" % (self.bucket, line["key"])
            self.assertEqual((line["version_id"], versions[url]), (version, version))
            self.assertIn("-> %s (%d bytes, version %s)" % (url, line["size"], version),
                          result.stdout)

    def check_tags(self, relative, headers):
        tags = {"team": "data", "kept until": "2027/01 x@y"}
        if s3server.server_kind() in LACKS_TAGGING:
            self.assertEqual(headers.get("x-amz-tagging"),
                             "team=data&kept%20until=2027%2F01%20x%40y")
        else:
            self.assertEqual(self.server.object_tags(self.prefix + relative, self.bucket), tags)

    def test_bad_values_are_usage_errors_naming_the_option(self):
        write_file(self.source, "f", b"data")
        for args, named in ((("--metadata", "no-equals"), "--metadata"),
                            (("--metadata", "bad key=v"), "--metadata"),
                            (("--metadata", "k=line\nbreak"), "--metadata"),
                            (("--metadata", "a=1", "--metadata", "A=2"), "--metadata"),
                            (("--metadata", "mtime=1"), "--metadata"),
                            (("--metadata", "big=" + "x" * 2030), "--metadata"),
                            (("--metadata", "k={nope}"), "{nope}"),
                            (("--tag", "k=v!"), "--tag"), (("--tag", "aws:k=v"), "--tag"),
                            (("--tag", "x" * 129 + "=v"), "--tag"),
                            (sum((("--tag", "k%d=v" % i) for i in range(11)), ()), "--tag"),
                            (("--tag", "k=1", "--tag", "k=2"), "--tag"),
                            (("--cache-control", "caf\u00e9".encode()), "--cache-control"),
                            (("--content-disposition", ""), "--content-disposition"),
                            (("--object-lock-mode", "GOVERNANCE"), "--object-lock-mode"),
                            (("--object-lock-retain-days", "3"), "--object-lock-mode"),
                            (("--object-lock-mode", "FOREVER"), "--object-lock-mode"),
                            (("--object-lock-mode", "COMPLIANCE", "--object-lock-retain-until",
                              "2001-01-01"), "--object-lock-retain-until"),
                            (("--object-lock-retain-until", "tomorrow"),
                             "--object-lock-retain-until"),
                            (("--object-lock-retain-days", "0"), "--object-lock-retain-days")):
            result = self.run_s3push(*args)
            self.assertEqual(result.status, 2, (args, result.stderr))
            self.assertIn(named, result.stderr.strip().splitlines()[-1], args)
        self.assertEqual(files_under(self.source), [b"f"])
        self.assertEqual(self.recorder.requests, [])


# The script with a window of 3 files for the oldest-first order and 2 runs merged at once
# (an internal seam), so that a small tree is spilled and merged as a large one would be.
SMALL_WINDOW = ("import sys; sys.path.insert(0, %r); import s3push; s3push.ORDER_WINDOW = 3; "
                "s3push.MAX_RUNS = 2; sys.argv[0] = s3push.__file__; sys.exit(s3push.main())"
                % s3server.REPO)


class Filters(IntegrationCase):
    def test_include_exclude_from_and_sizes_choose_the_files(self):
        files = {"app/a.log": b"x" * 100, "app/b.log": b"x" * 5000, "app/c.txt": b"x" * 100,
                 "db/d.log": b"x" * 100, "db/e.csv": b"x" * 100, "tiny.log": b"x"}
        for relative, data in files.items():
            write_file(self.source, relative, data)
        rules = os.path.join(self.tmp, "rules")
        with open(rules, "w") as handle:
            handle.write("# never the database's\ndb/*\n")
        summary = os.path.join(self.tmp, "summary.json")
        result = self.run_s3push("--include", "*.log", "--exclude-from", rules,
                                 "--min-size", "10", "--max-size", "4K",
                                 "--summary-json", summary)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"app/a.log": b"x" * 100})
        self.assertEqual(self.server.keys(self.prefix), {self.prefix + "app/a.log"})
        self.assertEqual(files_under(self.source), sorted(
            k.encode() for k in files if k != "app/a.log"))
        import json
        with open(summary) as handle:
            self.assertEqual(json.load(handle)["files_left_size"], 2)   # b.log, tiny.log
        result = self.run_s3push("--include-from", rules + ".missing")
        self.assertEqual(result.status, 2, result.stderr)
        self.assertIn("cannot read --include-from", result.stderr)


class WholeKeyTemplates(IntegrationCase):
    """A destination that names a part of the file's path is each file's whole key."""

    def run_to(self, template, *args):
        argv = self.command(*args)
        argv[-1] = "s3://%s/%s%s" % (self.server.bucket, self.prefix, template)
        done = subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        return done.returncode, done.stderr.decode()

    def test_ten_rotations_of_one_name_get_ten_keys(self):
        for i in range(10):
            mtime = 1700000000 + 3600 * i
            write_file(self.source, "logs/app.log.1", b"rotation %d" % i, mtime=mtime)
            status, err = self.run_to("{dir}/{stem}.{mtime_epoch}{ext}")
            self.assertEqual(status, 0, err)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed({"logs/app.log.%d.1" % (1700000000 + 3600 * i): b"rotation %d" % i
                            for i in range(10)})
        self.assertEqual(len(self.server.keys(self.prefix)), 10)

    def test_two_files_for_one_key_the_second_is_kept(self):
        write_file(self.source, "a/x.log", b"first", mtime=1000)
        write_file(self.source, "b/x.log", b"second", mtime=2000)
        status, err = self.run_to("{name}", "--jobs", "1")
        self.assertEqual(status, 65, err)
        self.assertIn("b/x.log -> s3://%s/%sx.log: another file of this run went to that key"
                      % (self.server.bucket, self.prefix), err)
        self.assert_landed({"x.log": b"first"})
        self.assertEqual(files_under(self.source), [b"b/x.log"])


class Manifests(IntegrationCase):
    def test_a_line_per_moved_file_with_its_proof(self):
        import hashlib
        import json
        files = {"a.log": b"alpha", "d/b.log": b"beta" * 10,
                 "big.bin": os.urandom(11 * 1024 * 1024)}
        for relative, data in files.items():
            write_file(self.source, relative, data)
        manifest = os.path.join(self.tmp, "moved.jsonl")
        result = self.run_s3push("--manifest", manifest, "--multipart-threshold", "5MiB",
                                 "--part-size", "5MiB")
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed(files)
        with open(manifest) as handle:
            lines = [json.loads(line) for line in handle]
        self.assertEqual(sorted(line["key"] for line in lines),
                         sorted(self.prefix + relative for relative in files))
        for line in lines:
            relative = line["key"][len(self.prefix):]
            data = files[relative]
            self.assertEqual((line["bucket"], line["size"], line["path"]),
                             (self.server.bucket, len(data),
                              os.path.join(self.source, relative)))
            if relative == "big.bin":   # three parts of 5, 5 and 1 MiB
                md5s = b"".join(hashlib.md5(data[i:i + 5 * 1024 * 1024]).digest()
                                for i in range(0, len(data), 5 * 1024 * 1024))
                self.assertEqual(line["checksum"],
                                 {"md5_of_parts": hashlib.md5(md5s).hexdigest() + "-3"})
            else:
                self.assertEqual(line["checksum"], {"md5": hashlib.md5(data).hexdigest()})
        self.assertEqual(len({line["run"] for line in lines}), 1)

    def test_the_run_s_lines_go_up_as_one_object(self):
        manifest = os.path.join(self.tmp, "moved.jsonl")
        with open(manifest, "w") as handle:
            handle.write('{"run": "an earlier run", "key": "x"}\n')
        write_file(self.source, "a.log", b"alpha")
        write_file(self.source, "b.log", b"beta")
        result = self.run_s3push("--manifest", manifest, "--manifest-key",
                                 self.prefix + "manifests/{hostname}-{run_id}.jsonl")
        self.assertEqual(result.status, 0, result.stderr)
        with open(manifest, "rb") as handle:
            ours = handle.read().splitlines(True)[1:]
        self.assertEqual(len(ours), 2)
        keys = [k for k in self.server.keys(self.prefix) if "/manifests/" in k]
        self.assertEqual(len(keys), 1, keys)
        self.assertEqual(self.server.object_bytes(keys[0]), b"".join(ours))
        result = self.run_s3push("--manifest-key", "m.jsonl")
        self.assertEqual(result.status, 2, result.stderr)
        self.assertIn("--manifest-key uploads the lines of --manifest FILE", result.stderr)
        result = self.run_s3push("--manifest", manifest, "--manifest-key", "m/{date}.jsonl")
        self.assertEqual(result.status, 2, result.stderr)   # each run's object its own key
        self.assertIn("has no {run_id}", result.stderr)

    def test_a_manifest_that_cannot_be_written_keeps_every_file(self):
        write_file(self.source, "a.log", b"alpha")
        write_file(self.source, "b.log", b"beta")
        result = self.run_s3push("--manifest", os.path.join(self.tmp, "no", "such.jsonl"))
        self.assertEqual(result.status, 65, result.stderr)
        self.assertIn("cannot write the manifest", result.stderr)
        self.assertEqual(files_under(self.source), [b"a.log", b"b.log"])


class ManifestFaults(IntegrationCase):
    """Lines written whole or not at all, a manifest never followed through a symlink, run
    ids that never repeat, and no --manifest-key object lost to a failed upload."""

    def manifest_keys(self):
        return sorted(k for k in self.server.keys(self.prefix) if "/manifests/" in k)

    def key_of(self, run):
        """The object key TEMPLATE gives a run: its start's date and its id."""
        return "%smanifests/%s-%s-%s/%s.jsonl" % (self.prefix, run[:4], run[4:6], run[6:8],
                                                 run)

    TEMPLATE = "manifests/{date}/{run_id}.jsonl"

    def run_with_key(self, *args, **kw):
        manifest = os.path.join(self.tmp, "moved.jsonl")
        return self.run_s3push("--manifest", manifest, "--manifest-key",
                               self.prefix + self.TEMPLATE, *args, **kw)

    def read_manifest(self):
        with open(os.path.join(self.tmp, "moved.jsonl"), "rb") as handle:
            return handle.read()

    def runs_in(self, data):
        import json
        return sorted({json.loads(line)["run"] for line in data.splitlines()})

    def test_a_manifest_on_a_full_filesystem_moves_nothing_and_sends_nothing(self):
        # Every file would be uploaded, then kept for want of its line, run after run.
        tiny = self.tiny_filesystem()
        write_file(self.source, "a.log", b"alpha")
        manifest = os.path.join(tiny, "moved.jsonl")
        with open(manifest, "wb"):
            pass
        filler = os.open(os.path.join(tiny, "filler"), os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"\0" * 4096):
                pass
        except OSError:
            pass
        os.close(filler)
        result = self.run_s3push("--manifest", manifest)
        self.assertEqual(result.status, 65, result.stderr)
        self.assertIn("cannot write the manifest", result.stderr)
        self.assertEqual(self.recorder.requests, [])
        self.assertEqual(files_under(self.source), [b"a.log"])

    def test_a_lock_held_by_another_process_does_not_stall_the_run(self):
        # An account that may read the manifest can hold a shared flock on it forever.
        manifest = os.path.join(self.tmp, "moved.jsonl")
        with open(manifest, "wb"):
            pass
        holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; "
                                   "f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_SH); "
                                   "print(1, flush=True); time.sleep(600)", manifest],
                                  stdout=subprocess.PIPE)
        self.addCleanup(holder.kill)
        holder.stdout.readline()
        for name in ("a", "b", "c"):
            write_file(self.source, name, name.encode())
        result = self.run_s3push("--manifest", manifest)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(result.stderr.count("stayed locked"), 1, result.stderr)
        self.assertEqual(len(self.read_manifest().splitlines()), 3)
        self.assertEqual(files_under(self.source), [])

    def tiny_filesystem(self):
        """A tmpfs of 16 KiB (four pages) of the test's own; skipped, named, where none
        can be mounted."""
        if os.geteuid() != 0:
            self.skipTest("mounting a tiny tmpfs needs root")
        where = tempfile.mkdtemp(prefix="s3push-tiny-")
        self.addCleanup(os.rmdir, where)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", where],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if done.returncode != 0:
            self.skipTest("cannot mount a tmpfs here: %s"
                          % done.stderr.decode("utf-8", "replace").strip())
        self.addCleanup(subprocess.run, ["umount", where])
        return where

    def test_a_full_filesystem_never_leaves_a_removed_file_without_its_whole_line(self):
        import json
        tiny = self.tiny_filesystem()
        files = {"f%02d.log" % i: b"x" * i for i in range(30)}
        for relative, data in files.items():
            write_file(self.source, relative, data)
        filler = os.path.join(tiny, "filler")
        with open(filler, "wb") as handle:
            handle.write(b"\0" * 3 * 4096)   # one page is left: about ten lines
        manifest = os.path.join(tiny, "moved.jsonl")
        result = self.run_s3push("--manifest", manifest)
        self.assertEqual(result.status, 65, result.stderr)
        self.assertIn("cannot write the manifest", result.stderr)
        with open(manifest, "rb") as handle:
            data = handle.read()
        self.assertTrue(data.endswith(b"\n"), data[-100:])
        recorded = [os.path.basename(json.loads(line)["path"]) for line in data.splitlines()]
        left = [os.fsdecode(p) for p in files_under(self.source)]
        self.assertTrue(recorded and left, result.stderr)
        self.assertEqual(sorted(recorded), sorted(set(files) - set(left)))
        os.unlink(filler)   # space again: the next run moves the rest, its lines whole
        result = self.run_s3push("--manifest", manifest, "--manifest-key",
                                 self.prefix + self.TEMPLATE)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(files)
        with open(manifest, "rb") as handle:
            lines = handle.read().splitlines(True)
        self.assertEqual(sorted(os.path.basename(json.loads(line)["path"]) for line in lines),
                         sorted(files))
        second = lines[len(recorded):]
        [run] = self.runs_in(b"".join(second))
        self.assertEqual(self.manifest_keys(), [self.key_of(run)])
        self.assertEqual(self.server.object_bytes(self.key_of(run)), b"".join(second))

    def test_a_line_cut_short_by_a_crash_is_cut_off_with_one_warning(self):
        import json
        whole = b'{"key": "x", "run": "an earlier run"}\n'
        with open(os.path.join(self.tmp, "moved.jsonl"), "wb") as handle:
            handle.write(whole + b'{"key": "y", "run": "20260101T0000')   # no newline
        write_file(self.source, "a.log", b"alpha")
        result = self.run_with_key()
        self.assertEqual(result.status, 0, result.stderr)
        warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
        self.assertEqual(len(warnings), 1, result.stderr)
        self.assertIn("line cut short", warnings[0])
        data = self.read_manifest()
        self.assertTrue(data.startswith(whole), data)
        ours = data[len(whole):]
        self.assertEqual([json.loads(line)["path"] for line in ours.splitlines()],
                         [os.path.join(self.source, "a.log")])
        [run] = self.runs_in(ours)
        self.assertEqual(self.server.object_bytes(self.key_of(run)), ours)

    def test_a_symlinked_manifest_is_refused_and_nothing_written_through_it(self):
        write_file(self.source, "a.log", b"alpha")
        manifest = os.path.join(self.tmp, "moved.jsonl")
        for target in ("planted", "not-there"):   # a file, and a name O_CREAT would make
            target = os.path.join(self.tmp, target)
            if target.endswith("planted"):
                open(target, "wb").close()
            os.symlink(target, manifest)
            result = self.run_s3push("--manifest", manifest)
            self.assertEqual(result.status, 78, result.stderr)
            self.assertEqual(result.stderr.splitlines(), [
                "s3push: error: --manifest %s is a symlink: not followed; name the file "
                "itself" % manifest])
            self.assertEqual(os.path.getsize(target) if os.path.exists(target) else None,
                             0 if target.endswith("planted") else None)
            self.assertEqual(files_under(self.source), [b"a.log"])
            os.unlink(manifest)

    def test_run_ids_differ_and_begin_with_the_run_s_start(self):
        import calendar
        import json
        manifest = os.path.join(self.tmp, "moved.jsonl")
        windows = []
        for name in ("a.log", "b.log"):
            write_file(self.source, name, b"data")
            before = int(time.time())
            self.assertEqual(self.run_s3push("--manifest", manifest).status, 0)
            windows.append((before, time.time()))
        with open(manifest) as handle:
            runs = [json.loads(line)["run"] for line in handle]
        self.assertEqual(len(set(runs)), 2, runs)
        for run, (before, after) in zip(runs, windows):
            self.assertRegex(run, r"^\d{8}T\d{6}Z-[0-9a-f]{16}$")
            started = calendar.timegm(time.strptime(run[:16], "%Y%m%dT%H%M%SZ"))
            self.assertTrue(before <= started <= after, (run, before, after))

    def refused_run(self, *files):
        """A run whose --manifest-key PUT the server refuses (500, each try): its files
        move, it exits 75, no object lands; the run's manifest lines. One retry: a file's
        PUT may meet a kept-alive connection the server closed (--retries 0 lost one in
        a loaded run and exited 75 all the same)."""
        refuse = s3server.FaultProxy(self.recorder.endpoint, lambda request: (
            "answer", 500, "InternalError") if request.method == "PUT" and
            "/manifests/" in request.target else None)
        self.proxies.append(refuse)
        for name in files:
            write_file(self.source, name, name.encode())
        result = self.run_with_key("--retries", "1", endpoint=refuse.endpoint)
        self.assertEqual(result.status, 75, result.stderr)
        self.assert_landed({name: name.encode() for name in files})
        self.assertEqual(self.manifest_keys(), [])
        return self.read_manifest()

    def test_a_refused_manifest_object_is_sent_by_the_next_run(self):
        first = self.refused_run("a.log", "b.log")
        write_file(self.source, "c.log", b"gamma")
        result = self.run_with_key()
        self.assertEqual(result.status, 0, result.stderr)
        second = self.read_manifest()[len(first):]
        [run1], [run2] = self.runs_in(first), self.runs_in(second)
        self.assertEqual(self.manifest_keys(), sorted([self.key_of(run1), self.key_of(run2)]))
        self.assertEqual(self.server.object_bytes(self.key_of(run1)), first)
        self.assertEqual(self.server.object_bytes(self.key_of(run2)), second)
        start = len(self.recorder.requests)   # nothing is left to send
        write_file(self.source, "d.log", b"delta")
        self.assertEqual(self.run_with_key().status, 0)
        self.assertEqual(len(self.recorder.requests) - start, 2)   # d.log and its object

    def test_a_run_that_finds_no_file_sends_an_earlier_run_s_object(self):
        first = self.refused_run("a.log")
        result = self.run_with_key()
        self.assertEqual(result.status, 0, result.stderr)
        [run] = self.runs_in(first)
        self.assertEqual(self.manifest_keys(), [self.key_of(run)])
        self.assertEqual(self.server.object_bytes(self.key_of(run)), first)
        self.assertEqual(self.read_manifest(), first)

    def test_lines_rotated_away_drop_their_object_with_a_warning(self):
        first = self.refused_run("a.log")
        manifest = os.path.join(self.tmp, "moved.jsonl")
        os.rename(manifest, manifest + ".1")   # logrotate: the lines are elsewhere now
        write_file(self.source, "b.log", b"beta")
        result = self.run_with_key()
        self.assertEqual(result.status, 0, result.stderr)
        [run1], [run2] = self.runs_in(first), self.runs_in(self.read_manifest())
        self.assertIn("warning: the lines of run %s are gone from the manifest %s "
                      "(rotated or cut): its object s3://%s/%s was never sent" % (
                          run1, manifest, self.server.bucket, self.key_of(run1)),
                      result.stderr)
        self.assertEqual(self.manifest_keys(), [self.key_of(run2)])
        start = len(self.recorder.requests)   # the record went with the warning
        result = self.run_with_key()
        self.assertEqual((result.status, result.stderr), (0, ""))
        self.assertEqual(len(self.recorder.requests), start)


class Order(IntegrationCase):
    def test_oldest_files_go_first(self):
        rng = random.Random(7)
        mtimes = {"d%d/e%d/f%02d.log" % (i % 4, i % 3, i): 1700000000 + rng.randrange(10 ** 6)
                  for i in range(20)}
        for relative, mtime in mtimes.items():
            write_file(self.source, relative, relative.encode(), mtime=mtime)
        expected = sorted(mtimes, key=mtimes.get)
        no_state = os.path.join(write_file(self.tmp, "plain", b"").decode(), "state")
        for seam, args in ((None, ()), (SMALL_WINDOW, ()),   # sorted in memory, spilled,
                           (SMALL_WINDOW, ("--state-dir", no_state))):   # no state folder
            argv = self.command("--jobs", "1", *args)
            if seam:
                argv[1:3] = ["-c", seam]
            start = len(self.recorder.heads)
            done = subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=60)
            self.assertEqual(done.returncode, 0, done.stderr)
            sent = [urllib.parse.unquote(h.target).partition(self.prefix)[2]
                    for h in self.recorder.heads[start:] if h.method == "PUT"]
            if not args:
                self.assertEqual(sent, expected, seam)
                self.assertNotIn(b"cannot spill", done.stderr)
            else:   # no spill: the order gives way, said once; oldest first in each window
                self.assertEqual(sorted(sent), sorted(expected))
                self.assertEqual(done.stderr.count(b"cannot spill the order"), 1, done.stderr)
                for start in range(0, len(sent), 3):
                    window = sent[start:start + 3]
                    self.assertEqual(window, sorted(window, key=mtimes.get))
            self.assert_landed({r: r.encode() for r in mtimes})
            for relative, mtime in mtimes.items():
                write_file(self.source, relative, relative.encode(), mtime=mtime)


class BandwidthLimit(IntegrationCase):
    def test_the_run_stays_at_its_rate_across_jobs_and_parts(self):
        # 8 MiB in small files and parts at 1 MiB/s (a short round: 2 MiB/s), four jobs:
        # about 8 s (4 s). The rate is measured between the first and the last request the
        # proxy received whole. It may never be above the limit (+10 %); below, only a
        # starved machine would be, so the floor is loose (a timed test must not flake).
        rate = soak(1, 2) * 1024 * 1024
        files = {"small%d" % i: os.urandom(256 * 1024) for i in range(8)}
        files["big.bin"] = os.urandom(6 * 1024 * 1024 - 1)
        for relative, data in files.items():
            write_file(self.source, relative, data)
        arrivals = []
        proxy = s3server.FaultProxy(self.server.endpoint, lambda request: arrivals.append(
            (time.monotonic(), len(request.body))))
        self.proxies.append(proxy)
        result = self.run_s3push("--bwlimit", "%dM" % (rate // 1024 // 1024), "--jobs", "4",
                                 *MULTIPART, endpoint=proxy.endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed(files)
        arrivals.sort()
        seconds = arrivals[-1][0] - arrivals[0][0]
        sent = sum(size for _, size in arrivals[1:])
        self.assertGreater(seconds, 4.0 * 1024 * 1024 / rate)
        self.assertLessEqual(sent / seconds, rate * 1.1, "%.0f bytes/s" % (sent / seconds))
        self.assertGreater(sent / seconds, rate * 0.5, "%.0f bytes/s" % (sent / seconds))
        sys.stderr.write("[bwlimit %dM: %.0f KiB/s] " % (rate // 1024 // 1024,
                                                        sent / seconds / 1024))

    def test_a_rate_below_1k_is_a_usage_error(self):
        write_file(self.source, "f", b"x")
        for bad in ("10", "0", "fast"):
            result = self.run_s3push("--bwlimit", bad)
            self.assertEqual(result.status, 2, result.stderr)
            self.assertIn("--bwlimit", result.stderr)
        self.assertEqual(files_under(self.source), [b"f"])


class KeyTemplates(IntegrationCase):
    def test_hostname_and_dates(self):
        import datetime
        import socket
        path = write_file(self.source, "a/f.log", b"log")
        os.utime(path, (0, 86400 * 365))   # 1971-01-01
        template = "s3://%s/%s{hostname}/{mtime_date}/{year}/" % (self.server.bucket,
                                                                  self.prefix)
        argv = self.command()
        argv[-1] = template
        import subprocess
        done = subprocess.run(argv + ["-v"], env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        year = datetime.datetime.now(datetime.timezone.utc).strftime("%Y")
        key = "%s%s/1971-01-01/%s/a/f.log" % (self.prefix, socket.gethostname(), year)
        self.assertEqual(self.server.object_bytes(key), b"log")
        self.assertIn(key, done.stdout.decode())

    def test_a_file_dated_past_9999_fails_alone_under_an_mtime_template(self):
        """tmpfs keeps such a date (ext4 stops at 2446): the file whose {mtime_year} cannot
        be written is kept with one error line; the others move, and without an mtime
        placeholder it moves too."""
        import filesystems
        filesystems.need_root(self, "a tmpfs")
        with filesystems.scratch("tmpfs") as (_, mount):
            with filesystems.mounted(["mount", "-t", "tmpfs", "s3push-test", mount], mount):
                os.utime(write_file(mount, "far", b"f"), ns=(253402300800 * 10 ** 9,) * 2)
                write_file(mount, "near", b"n")
                argv = self.command("--min-age", "0", source=mount)
                argv[-1] = "s3://%s/%s{mtime_year}/" % (self.server.bucket, self.prefix)
                done = subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
                self.assertEqual(done.returncode, 65, done.stderr)
                self.assertEqual(done.stderr.count(b"error"), 1, done.stderr)
                self.assertIn(b"far: its mtime (253402300800 s since 1970) is out of the "
                              b"years 1 to 9999", done.stderr)
                self.assertEqual(os.listdir(mount), ["far"])
                self.assertEqual(self.run_s3push("--min-age", "0", source=mount).status, 0)
                self.assertEqual(os.listdir(mount), [])
        self.assert_landed({"far": b"f"})

    def test_a_file_touched_between_scan_and_upload_goes_under_the_key_reported(self):
        # Two files, one at a time; the first is held on its way up while the other gets
        # another (old) mtime: it is left for the next run, which files it by that date.
        import subprocess
        for name in ("a", "b"):
            os.utime(write_file(self.source, name, name.encode()), (0, 86400 * 365))
        proxy = s3server.HoldProxy(self.recorder.endpoint)
        self.proxies.append(proxy)
        argv = self.command("-v", "--jobs", "1", endpoint=proxy.endpoint)
        argv[-1] = "s3://%s/%s{mtime_date}/" % (self.server.bucket, self.prefix)
        process = subprocess.Popen(argv, env=self.env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        self.addCleanup(process.kill)
        self.assertTrue(proxy.arrived.wait(120))
        first = proxy.puts[0].rsplit("/", 1)[-1]
        other = "b" if first == "a" else "a"
        os.utime(os.path.join(self.source, other), (0, 86400 * 366))
        proxy.release.set()
        out, err = process.communicate(timeout=120)
        self.assertEqual(process.returncode, 0, err)
        self.assertIn("/%s: changed since the scan; left for a later run" % other,
                      out.decode())
        done = subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        key = "%s1971-01-02/%s" % (self.prefix, other)
        self.assertIn("-> s3://%s/%s " % (self.server.bucket, key), done.stdout.decode())
        self.assertEqual(self.server.keys(self.prefix),
                         {"%s1971-01-01/%s" % (self.prefix, first), key})
        self.assertEqual(files_under(self.source), [])

    def test_unknown_placeholder(self):
        write_file(self.source, "f", b"x")
        argv = self.command()
        argv[-1] = "s3://%s/{hostnme}/" % self.server.bucket
        import subprocess
        done = subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(done.returncode, 2)
        self.assertIn(b"unknown placeholder {hostnme}", done.stderr)
        self.assertEqual(files_under(self.source), [b"f"])

    def run_to(self, template, *args):
        argv = self.command(*args)
        argv[-1] = "s3://%s/%s%s" % (self.server.bucket, self.prefix, template)
        return subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)

    def test_a_deep_path_under_a_name_template_moves(self):
        # S3's 1,024 bytes are the key's: a path over them may still give a short key.
        deep = "/".join(["d" * 250] * 5) + "/f.log"
        write_file(self.source, deep, b"deep")
        done = self.run_to("{path}")
        self.assertEqual(done.returncode, 65, done.stderr)
        self.assertIn(b"the key would be %d bytes" % len(self.prefix + deep), done.stderr)
        self.assertEqual(files_under(self.source), [deep.encode()])
        done = self.run_to("{name}")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assert_landed({"f.log": b"deep"})
        self.assertEqual(files_under(self.source), [])

    def test_mtimes_before_1970_and_in_a_second_s_last_nanosecond_are_exact(self):
        import json
        times = {"old": -1500000000,                  # 1969-12-31T23:59:58.5
                 "edge": 1700006399999999999}         # a float rounds it to the next day
        for name, mtime_ns in times.items():
            os.utime(write_file(self.source, name, name.encode()), ns=(mtime_ns, mtime_ns))
        manifest = os.path.join(self.tmp, "moved.jsonl")
        done = self.run_to("{mtime_date}/{mtime_epoch}-{name}", "--manifest", manifest)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assert_landed({"1969-12-31/-2-old": b"old",
                            "2023-11-14/1700006399-edge": b"edge"})
        sent = {h.target.rsplit("-", 1)[-1]: h.header("x-amz-meta-mtime")
                for h in self.recorder.heads if h.method == "PUT"}
        self.assertEqual(sent, {"old": "-1.500000000", "edge": "1700006399.999999999"})
        with open(manifest) as handle:
            written = {json.loads(line)["key"].rsplit("-", 1)[-1]: json.loads(line)["mtime"]
                       for line in handle}
        self.assertEqual(written, {"old": "1969-12-31T23:59:58.500000000Z",
                                   "edge": "2023-11-14T23:59:59.999999999Z"})


class Summaries(IntegrationCase):
    def test_summary_json(self):
        import json
        write_file(self.source, "a", b"12345")
        write_file(self.source, "young", b"x", mtime=time.time())
        write_file(self.source, "b", b"x")
        path = os.path.join(self.tmp, "summary.json")
        result = self.run_s3push("--summary-json", path)
        with open(path) as handle:
            summary = json.load(handle)
        self.assertEqual(summary["exit_status"], result.status)
        self.assertEqual((summary["files_moved"], summary["bytes_moved"],
                          summary["files_left_young"]), (2, 6, 1))
        self.assertEqual(summary["files_failed"], 0)

    def summary(self, *args):
        import json
        path = os.path.join(self.tmp, "summary.json")
        result = self.run_s3push("--summary-json", path, *args)
        self.assertEqual(result.status, 0, result.stderr)
        with open(path) as handle:
            return result, json.load(handle)

    def test_a_file_dated_ahead_is_judged_by_its_ctime_named_and_keyed_by_its_mtime(self):
        hour, year = time.time() + 3600, time.time() + 366 * 86400
        write_file(self.source, "hour", b"h", mtime=hour)
        write_file(self.source, "year", b"y", mtime=year)
        for i in range(6):
            write_file(self.source, "many/f%d" % i, b"m", mtime=hour)
        # Just written (its ctime): too young at the default --min-age, and said once.
        result, summary = self.summary()
        self.assertEqual(len(files_under(self.source)), 8)
        warnings = [line for line in result.stderr.splitlines() if "ahead" in line]
        self.assertEqual(len(warnings), 1, result.stderr)
        self.assertIn("s3push: warning: 8 files dated more than 5s ahead of this host's "
                      "clock", warnings[0])
        self.assertEqual(warnings[0].count(self.source), 5)   # the first few named
        self.assertIn(" and 3 more; their age is judged by their ctime", warnings[0])
        self.assertEqual(summary["files_left_young"], 8)
        self.assertGreater(summary["files_left_oldest_seconds"]["young"], 0)   # not 0: ahead
        self.assertLess(summary["files_left_oldest_seconds"]["young"], 60)
        # Old enough by its ctime: moved, its key made from its mtime as it is.
        base, self.prefix = self.prefix, self.prefix + "{mtime_year}/"
        result = self.run_s3push("--min-age", "0")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn("8 files dated more than 5s ahead", result.stderr)
        self.assertEqual(files_under(self.source), [])
        years = [time.gmtime(hour).tm_year, time.gmtime(year).tm_year]
        self.assertEqual(self.server.keys(base), {"%s%d/%s" % (base, y, name) for y, name in (
            [(years[0], "hour"), (years[1], "year")] +
            [(years[0], "many/f%d" % i) for i in range(6)])})

    def test_summary_json_when_settings_fail(self):
        import json
        write_file(self.source, "a", b"1")
        path = os.path.join(self.tmp, "summary.json")
        result = self.run_s3push("--summary-json", path, env=self.env(AWS_PROFILE="nope"))
        self.assertEqual(result.status, 78)
        with open(path) as handle:
            self.assertEqual(json.load(handle)["exit_status"], 78)

    def test_progress_only_when_asked_off_a_terminal(self):
        for i in range(20):
            write_file(self.source, "f%d" % i, b"x" * 100)
        self.assertNotIn("\r", self.run_s3push().stderr)
        proxy_slow = s3server.FaultProxy(self.server.endpoint, lambda r: ("stall", 0.1))
        self.addCleanup(proxy_slow.close)
        self.proxies.append(proxy_slow)
        for i in range(20):
            write_file(self.source, "g%d" % i, b"x" * 100)
        result = self.run_s3push("--progress", "--jobs", "1", endpoint=proxy_slow.endpoint)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertRegex(result.stderr, r"\rs3push: \d+/20 files, [0-9.]+/0.0 MB")
        self.assertTrue(result.stderr.endswith("\x1b[K"), repr(result.stderr[-40:]))


class CommandLine(IntegrationCase):
    """What the command line takes and how it says what it does not."""

    def test_durations_take_units(self):
        write_file(self.source, "f", b"data", mtime=time.time() - 3600)
        result = self.run_s3push("--min-age", "1h30m")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [b"f"])   # an hour old: too young
        result = self.run_s3push("--min-age", "59m", "--deadline", "1h", "--splay", "1s",
                                 "--timeout", "2m")
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"f": b"data"})

    def test_a_bad_duration_is_a_usage_error_naming_the_option_and_the_forms(self):
        write_file(self.source, "f", b"data")
        for option, value in (("--min-age", "10x"), ("--deadline", "1.5h"),
                              ("--splay", "30m1h"), ("--timeout", "10M"),
                              ("--timeout", "0s")):
            result = self.run_s3push(option, value)
            self.assertEqual(result.status, 2, (option, result.stderr))
            last = result.stderr.strip().splitlines()[-1]
            self.assertIn(option, last)
            self.assertIn("90s, 10m, 1h30m, 2d" if value != "0s" else "at least 1 second",
                          last)
        self.assertEqual(files_under(self.source), [b"f"])
        self.assertEqual(self.recorder.requests, [])


    def test_only_whole_option_names(self):
        write_file(self.source, "d/f", b"data", mtime=time.time())
        for args, named in ((("--delete",), "--delete"), (("--min-ag", "0"), "--min-ag"),
                            (("--verb",), "--verb")):
            result = self.run_s3push(*args)
            self.assertEqual(result.status, 2, (args, result.stderr))
            self.assertIn("unrecognized arguments: " + named,
                          result.stderr.strip().splitlines()[-1])
        self.assertEqual(files_under(self.source), [b"d/f"])
        self.assertEqual(self.recorder.requests, [])

    def test_short_flags_given_together_still_work(self):
        # argparse of Python 3.6 and 3.7 refuses -vv once abbreviations are refused.
        write_file(self.source, "f", b"data")
        result = self.run_s3push("-vv")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn("moved 1 files", result.stderr + result.stdout)
        self.assert_landed({"f": b"data"})
        result = self.run_s3push("-vh")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertTrue(result.stdout.startswith("usage: s3push.py"), result.stdout[:200])


    def run_argv(self, argv):
        done = subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    def test_arguments_in_the_wrong_order_get_a_one_line_hint(self):
        write_file(self.source, "f", b"data")
        argv = self.command()
        argv[-2:] = argv[-1:-3:-1]
        status, out, err = self.run_argv(argv)
        self.assertEqual(status, 2, err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("wrong order", err)
        self.assertIn("s3push.py [options] SOURCE_DIR s3://BUCKET[/PREFIX]", err)
        self.assertEqual(files_under(self.source), [b"f"])

    def test_a_refused_command_line_leaves_its_summary_and_metrics(self):
        import json
        write_file(self.source, "f", b"data")
        summary, metrics = (os.path.join(self.tmp, name) for name in ("s.json", "m.prom"))
        reports = ("--summary-json", summary, "--metrics-file", metrics)
        bad_value, unknown = ("--min-age", "10x"), ("--no-such-option",)
        swapped = self.command(*reports)
        swapped[-2:] = swapped[-1:-3:-1]
        for argv, named in ((self.command(*(bad_value + reports)), "--min-age"),
                            (self.command(*(reports + bad_value)), "--min-age"),
                            (self.command(*(unknown + reports)), "--no-such-option"),
                            (self.command(*reports)[:-2], "required"),
                            (swapped, "wrong order")):
            for path in (summary, metrics):
                if os.path.exists(path):
                    os.unlink(path)
            status, out, err = self.run_argv(argv)
            self.assertEqual(status, 2, (argv, err))
            with open(summary) as handle:
                data = json.load(handle)
            self.assertEqual((data["exit_status"], data["files_moved"]), (2, 0), argv)
            self.assertIn(named, data["errors"][0])
            self.assertEqual(data["errors"], [err.strip().splitlines()[-1]])
            with open(metrics) as handle:
                self.assertIn("s3push_exit_status", handle.read())
        # Where its own FILE is missing, no summary can be written; the error is said.
        os.unlink(summary)
        status, out, err = self.run_argv(self.command(*reports[2:]) + ["--summary-json"])
        self.assertEqual(status, 2, err)
        self.assertIn("--summary-json", err)
        self.assertFalse(os.path.exists(summary))
        self.assertEqual(files_under(self.source), [b"f"])
        self.assertEqual(self.recorder.requests, [])


    def test_help_in_titled_groups_then_examples_and_credentials(self):
        status, out, err = self.run_argv(self.command("--help"))
        self.assertEqual(status, 0, err)
        titles = ("what is moved", "where it goes", "how objects are written", "transfer",
                  "safety", "output", "examples")
        starts = [out.find("\n%s:\n" % title) for title in titles]
        self.assertNotIn(-1, starts, out)
        self.assertEqual(starts, sorted(starts))
        self.assertNotIn("arguments:", out)   # nothing left in argparse's own groups
        sections = dict(zip(titles, (out[a:b] for a, b in zip(starts, starts[1:] + [None]))))
        for title, options in (("what is moved", ("SOURCE_DIR", "--min-age DURATION",
                                                  "--exclude GLOB", "--max-size SIZE")),
                               ("where it goes", ("s3://BUCKET[/PREFIX]", "--if-exists",
                                                  "--endpoint-url", "--profile")),
                               ("how objects are written", ("--storage-class", "--compress",
                                                            "--metadata", "--legal-hold")),
                               ("transfer", ("--jobs N", "--timeout DURATION",
                                             "--deadline DURATION", "--splay DURATION")),
                               ("safety", ("--dry-run", "--checksum", "--state-dir")),
                               ("output", ("-v, --verbose", "--summary-json", "--log-file FILE",
                                           "-h, --help"))):
            for option in options:
                self.assertIn("\n  " + option, sections[title], (title, option))
        examples = " ".join(sections["examples"].split())
        for said in ("--dry-run /var/spool/outbox", "*/5 * * * * /usr/local/bin/s3push.py",
                     "--min-age 10m", "systemd timer", "credentials", "AWS_ACCESS_KEY_ID",
                     "~/.aws/credentials and ~/.aws/config", "AWS_PROFILE",
                     "EC2 instance profile", "exit status"):
            self.assertIn(said, examples)
        self.assertIn("for a command line refused (exit 2)", " ".join(out.split()))


CANARY = "CANARYtoken0123456789SESSION"   # a session token no output may show
LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\+00:00 (.*)\Z")


class LogFile(IntegrationCase):
    """--log-file: what the run prints, each line after its time, appended safely."""

    def setUp(self):
        IntegrationCase.setUp(self)
        self.log = os.path.join(self.tmp, "s3push.log")

    def logged(self, start=None, end=None):
        """The log's lines without their times; each time (UTC) within start, end."""
        with open(self.log, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        texts = []
        for line in lines:
            match = LOG_LINE.match(line)
            self.assertIsNotNone(match, line)
            if start is not None:
                when = calendar.timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))
                self.assertTrue(int(start) <= when <= end, (start, line, end))
            texts.append(match.group(2))
        return texts

    def test_what_the_run_prints_each_line_after_its_time(self):
        credentials = os.path.join(self.home, "credentials")
        with open(credentials, "w") as handle:   # others may read it: a warning
            handle.write("[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n"
                         % (self.server.access_key, self.server.secret_key))
        os.chmod(credentials, 0o644)
        write_file(self.source, "a", b"alpha")
        write_file(self.source, "/".join(["d" * 250] * 5), b"x")   # no key: an error
        start = time.time()
        result = self.run_s3push("-v", "--log-file", self.log, env=self.env(
            AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None,
            AWS_SHARED_CREDENTIALS_FILE=credentials))
        texts = self.logged(start, time.time() + 1)
        self.assertEqual(result.status, 65, result.stderr)
        printed = result.stderr.splitlines() + result.stdout.splitlines()
        self.assertEqual(sorted(texts), sorted(printed))
        for said in ("s3push: warning: %s holds credentials" % credentials, "s3push: error: ",
                     "moved %s/a -> " % self.source, "s3push: moved 1 files"):
            self.assertEqual(len([t for t in texts if t.startswith(said)]), 1, (said, texts))
        self.assertEqual(stat.S_IMODE(os.stat(self.log).st_mode), 0o600)
        self.assert_landed({"a": b"alpha"})

    @skip_unless_server_checks("session-token")
    def test_debug_lines_without_secrets(self):
        write_file(self.source, "a", b"alpha")
        result = self.run_s3push("--debug", "--log-file", self.log,
                                 env=self.env(AWS_SESSION_TOKEN=CANARY))
        self.assertEqual(result.status, 0, result.stderr)
        texts = self.logged()
        self.assertEqual(texts, result.stderr.splitlines())
        self.assertIn("--- canonical request", texts)
        self.assertIn("x-amz-security-token:<redacted>", texts)
        with open(self.log) as handle:
            text = handle.read()
        for secret in (CANARY, self.server.secret_key):
            self.assertNotIn(secret, text)
        self.assertNotRegex(text, "Signature=[0-9a-f]{64}")

    def test_a_symlinked_log_is_refused_and_the_files_move(self):
        planted = os.path.join(self.tmp, "planted")
        for target in (planted, os.path.join(self.tmp, "not-there")):
            if target == planted:
                open(target, "wb").close()
            os.symlink(target, self.log)
            write_file(self.source, "a", b"alpha")
            result = self.run_s3push("-v", "--log-file", self.log)
            self.assertEqual(result.status, 0, result.stderr)
            self.assertEqual(result.stderr.splitlines(), [
                "s3push: warning: cannot write the --log-file %s (a symlink: not followed; "
                "name the file itself): its lines are only printed" % self.log])
            self.assertEqual(files_under(self.source), [])
            self.assertEqual(os.path.getsize(planted), 0)
            self.assertFalse(os.path.lexists(os.path.join(self.tmp, "not-there")))
            os.unlink(self.log)

    def test_another_account_s_file_or_a_hard_link_is_refused(self):
        """A writer of the log's folder links a file of this account at its name (root's
        /etc/shadow, where fs.protected_hardlinks is off), or hands over a file of its
        own: neither is appended to, and the files move."""
        if os.geteuid() != 0:
            self.skipTest("gives a file to another account, which needs root")
        victim = os.path.join(self.tmp, "victim")
        with open(victim, "wb") as handle:
            handle.write(b"secret\n")
        for plant, why in ((os.link, "2 hard links to it"),
                           (os.rename, "another account's file (uid 65534)")):
            if plant is os.rename:
                os.chown(victim, 65534, 65534)
            plant(victim, self.log)
            write_file(self.source, "a", b"alpha")
            result = self.run_s3push("--log-file", self.log)
            self.assertEqual(result.status, 0, result.stderr)
            self.assertEqual(result.stderr.splitlines(), [
                "s3push: warning: cannot write the --log-file %s (%s): its lines are only "
                "printed" % (self.log, why)])
            self.assertEqual(files_under(self.source), [])
            with open(self.log, "rb") as handle:
                self.assertEqual(handle.read(), b"secret\n")
            if plant is os.link:
                os.unlink(self.log)

    def test_a_fifo_never_stalls_the_run(self):
        os.mkfifo(self.log)
        reader = os.open(self.log, os.O_RDONLY | os.O_NONBLOCK)
        for read in (True, False):   # a process reads it, then none does
            write_file(self.source, "a", b"alpha")
            result = self.run_s3push("-v", "--log-file", self.log)
            self.assertEqual(result.status, 0, result.stderr)
            self.assertIn("--log-file %s (not a regular file)" % self.log, result.stderr)
            self.assertEqual(files_under(self.source), [])
            if read:
                self.assertEqual(os.read(reader, 100), b"")
                os.close(reader)

    def test_a_file_of_the_runs_own_that_the_scan_would_meet_is_refused(self):
        write_file(self.source, "a", b"alpha")
        for number, option in enumerate(("--log-file", "--manifest", "--summary-json",
                                         "--metrics-file")):
            path = os.path.join(self.source, "out%d" % number, "run.txt")
            result = self.run_s3push(option, path)
            self.assertEqual(result.status, 2, result.stderr)
            self.assertIn("s3push: error: the file %s (%s) is inside SOURCE_DIR" % (
                path, option), result.stderr)
            self.assertIsNone(self.server.object_bytes(self.prefix + "a"))
        for number in range(4):
            shutil.rmtree(os.path.join(self.source, "out%d" % number), ignore_errors=True)
        # Excluded, or hidden: the run writes it there and never meets it.
        log, manifest = (os.path.join(self.source, name) for name in ("s3push.log", ".m"))
        for data in (b"alpha", b"beta"):
            write_file(self.source, "a", data)
            result = self.run_s3push("-v", "--exclude", "*.log", "--log-file", log,
                                     "--manifest", manifest)
            self.assertEqual(result.status, 0, result.stderr)
            self.assertIn("0 left for later", result.stdout)
            self.assertEqual(files_under(self.source), [b".m", b"s3push.log"])
            self.assertEqual(self.server.object_bytes(self.prefix + "a"), data)

    def test_a_log_that_cannot_be_written_is_one_warning_and_the_files_move(self):
        os.mkdir(self.log)
        for log, reason in ((self.log, "Is a directory"), ("/dev/full", "not a regular file")):
            write_file(self.source, "a", b"alpha")
            result = self.run_s3push("-v", "--log-file", log)
            self.assertEqual(result.status, 0, result.stderr)
            self.assertEqual(result.stderr.splitlines(), [
                "s3push: warning: cannot write the --log-file %s (%s): its lines are only "
                "printed" % (log, reason)])
            self.assertEqual(files_under(self.source), [])
        # A log opened but not written (a full disk, here a file size limit it is at).
        os.rmdir(self.log)
        with open(self.log, "wb") as handle:
            handle.write(b"x" * 65536)

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        write_file(self.source, "a", b"alpha")
        write_file(self.source, "b", b"beta")
        done = subprocess.run(self.command("-v", "--log-file", self.log), env=self.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=limit, timeout=RUN_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr.decode().splitlines(), [
            "s3push: warning: cannot write the --log-file %s (File too large): its lines "
            "are only printed" % self.log])
        self.assertEqual(len([line for line in done.stdout.decode().splitlines()
                              if line.startswith("moved ")]), 2, done.stdout)
        self.assertEqual(os.path.getsize(self.log), 65536)
        self.assert_landed({"a": b"alpha", "b": b"beta"})

    def test_runs_append_and_one_that_finds_the_lock_held_says_so_there(self):
        with open(self.log, "w") as handle:
            handle.write("an earlier line\n")
        os.chmod(self.log, 0o640)   # the file's own mode is kept
        write_file(self.source, "a", b"alpha")
        gate, first = self.gated_run("-v", "--log-file", self.log)
        second = self.run_s3push("-v", "--log-file", self.log)
        self.assertEqual(second.status, 0, second.stderr)
        gate.release.set()
        first.communicate(timeout=RUN_TIMEOUT)
        self.assertEqual(first.returncode, 0)
        write_file(self.source, "b", b"beta")
        third = self.run_s3push("-v", "--log-file", self.log)
        self.assertEqual(third.status, 0, third.stderr)
        with open(self.log) as handle:
            self.assertEqual(handle.readline(), "an earlier line\n")
            texts = [LOG_LINE.match(line).group(2) for line in handle.read().splitlines()]
        self.assertTrue(texts[0].startswith("s3push: another run (pid %d) is moving "
                                            % first.pid), texts)
        self.assertEqual([t.split(" ", 2)[:2] for t in texts[1:]],
                         [["moved", self.source + "/a"], ["s3push:", "moved"],
                          ["moved", self.source + "/b"], ["s3push:", "moved"]])
        self.assertEqual(stat.S_IMODE(os.stat(self.log).st_mode), 0o640)

    def test_with_stdout_and_stderr_closed_the_log_still_gets_the_lines(self):
        write_file(self.source, "a", b"alpha")
        # Descriptors 1 and 2 free: the log must not take one of their numbers.
        closed = ["sh", "-c", 'exec "$@" >&- 2>&-', "sh"]
        done = subprocess.run(closed + self.command("-v", "--log-file", self.log),
                              env=self.env(), stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)
        self.assertEqual(done.returncode, 0)
        texts = self.logged()
        self.assertEqual([t.split(" ", 2)[:2] for t in texts],
                         [["moved", self.source + "/a"], ["s3push:", "moved"]])
        self.assert_landed({"a": b"alpha"})

    def test_a_refused_command_line_is_logged_where_the_path_was_read(self):
        write_file(self.source, "f", b"data")
        for argv in (self.command("--min-age", "10x", "--log-file", self.log),
                     self.command("--log-file", self.log, "--no-such-option")):
            if os.path.exists(self.log):
                os.unlink(self.log)
            result = subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
            self.assertEqual(result.returncode, 2)
            stderr = result.stderr.decode().splitlines()
            self.assertEqual(self.logged(), stderr)
            self.assertTrue(stderr[0].startswith("usage: s3push.py"), stderr)
        self.assertEqual(files_under(self.source), [b"f"])


def parse_prometheus(text):
    """{(name, ((label, value), ...)): float} of a Prometheus text-format file; raises on
    any line that is not a comment, a blank or `name{labels} value`."""
    import re
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        if not match:
            raise ValueError("not a sample line: %r" % line)
        pairs = re.findall(r'(\w+)="((?:[^"\\]|\\.)*)",?', match.group(2) or "")
        if ",".join('%s="%s"' % pair for pair in pairs) != (match.group(2) or ""):
            raise ValueError("bad labels: %r" % line)

        def unescape(value):
            return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)
        labels = tuple((name, unescape(value)) for name, value in pairs)
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


class Fleets(IntegrationCase):
    """Options for fleets: metrics for node_exporter, a start splay, the bucket's owner."""

    def metrics(self, path):
        with open(path) as handle:
            samples = parse_prometheus(handle.read())
        base = (("source", self.source),
                ("destination", "s3://%s/%s" % (self.server.bucket, self.prefix)))
        return {(name, labels[2:]): value for (name, labels), value in samples.items()
                if labels[:2] == base}

    def test_metrics_file(self):
        write_file(self.source, "a", b"12345")
        write_file(self.source, "young", b"x", mtime=time.time())
        path = os.path.join(self.tmp, "s3push.prom")
        self.assertEqual(self.run_s3push("--metrics-file", path).status, 0)
        first = self.metrics(path)
        self.assertEqual(first[("s3push_files_moved", ())], 1)
        self.assertEqual(first[("s3push_bytes_moved", ())], 5)
        self.assertEqual(first[("s3push_files_left", (("reason", "young"),))], 1)
        self.assertEqual(first[("s3push_exit_status", ())], 0)
        self.assertEqual(first[("s3push_last_success_timestamp_seconds", ())],
                         first[("s3push_last_run_timestamp_seconds", ())])
        # A failing run: its figures, and the last success carried over.
        write_file(self.source, "b", b"x")
        result = self.run_s3push("--metrics-file", path,
                                 env=self.env(AWS_SECRET_ACCESS_KEY="wrong-secret"))
        self.assertEqual(result.status, 77, result.stderr)
        second = self.metrics(path)
        self.assertEqual(second[("s3push_exit_status", ())], 77)
        self.assertEqual(second[("s3push_files_failed", (("kind", "permission"),))], 1)
        self.assertEqual(second[("s3push_last_success_timestamp_seconds", ())],
                         first[("s3push_last_success_timestamp_seconds", ())])
        self.assertGreater(second[("s3push_last_run_timestamp_seconds", ())],
                           first[("s3push_last_run_timestamp_seconds", ())])

    def test_the_oldest_file_left_for_each_reason(self):
        import json
        now = time.time()
        write_file(self.source, "young1", b"x", mtime=now - 10)
        write_file(self.source, "young2", b"x", mtime=now - 30)
        write_file(self.source, "big", b"x" * 100, mtime=now - 5000)
        write_file(self.source, "a", b"12345")
        path, summary = os.path.join(self.tmp, "s3push.prom"), os.path.join(self.tmp, "s.json")
        result = self.run_s3push("--metrics-file", path, "--summary-json", summary,
                                 "--max-size", "50")
        self.assertEqual(result.status, 0, result.stderr)
        metrics = self.metrics(path)
        with open(summary) as handle:
            oldest = json.load(handle)["files_left_oldest_seconds"]
        self.assertEqual(sorted(oldest), ["size", "writing", "young"])
        for reason, age in (("young", 30), ("size", 5000), ("writing", 0)):
            self.assertAlmostEqual(oldest[reason], age, delta=20)
            self.assertEqual(metrics[("s3push_files_left_oldest_seconds",
                                      (("reason", reason),))], oldest[reason])
        self.assertEqual(oldest["writing"], 0)   # none left

    def test_splay_never_delays_a_run_with_nothing_to_send(self):
        write_file(self.source, "young", b"x", mtime=time.time())
        started = time.monotonic()
        self.assertEqual(self.run_s3push("--splay", "3600").status, 0)
        self.assertLess(time.monotonic() - started, 60, "an idle run waited")
        write_file(self.source, "f", b"data")
        self.assertEqual(self.run_s3push("--splay", "1").status, 0)
        self.assert_landed({"f": b"data"})
        self.assertEqual(self.run_s3push("--splay", "soon").status, 2)

    def test_expected_bucket_owner_signed_on_every_request(self):
        write_file(self.source, "small", b"data")
        write_file(self.source, "big", os.urandom(11 * 1024 * 1024))
        for args, env in ((("--expected-bucket-owner", "111122223333"), None),
                          ((), self.env(S3PUSH_EXPECTED_BUCKET_OWNER="111122223333"))):
            before = len(self.recorder.heads)
            result = self.run_s3push(*(args + MULTIPART), env=env)
            self.assertEqual(result.status, 0, result.stderr)
            heads = self.recorder.heads[before:]
            self.assertGreaterEqual(len(heads), 5)   # a PUT, then create, 3 parts, complete
            for head in heads:
                self.assertEqual(head.header("x-amz-expected-bucket-owner"), "111122223333",
                                 head.target)
                self.assertIn("x-amz-expected-bucket-owner",
                              head.header("authorization").split("SignedHeaders=")[1])
            write_file(self.source, "small", b"data")
            write_file(self.source, "big", os.urandom(11 * 1024 * 1024))
        self.assertEqual(self.run_s3push("--expected-bucket-owner", "1234").status, 2)
        result = self.run_s3push(env=self.env(S3PUSH_EXPECTED_BUCKET_OWNER="x"))
        self.assertEqual(result.status, 78, result.stderr)

    def test_a_bucket_of_another_owner_is_named_and_exits_77(self):
        write_file(self.source, "f", b"data")
        refuse = s3server.FaultProxy(self.recorder.endpoint, lambda request: (
            "answer", 403, "AccessDenied"))
        self.proxies.append(refuse)
        result = self.run_s3push("--expected-bucket-owner", "111122223333",
                                 endpoint=refuse.endpoint)
        self.assertEqual(result.status, 77, result.stderr)
        self.assertIn("not owned by account 111122223333", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertEqual(files_under(self.source), [b"f"])


def readme_blocks():
    """The README's fenced blocks, as the reader copies them."""
    with open(os.path.join(s3server.REPO, "README.md"), encoding="utf-8") as handle:
        return re.findall(r"^```[a-z]*\n(.*?)^```$", handle.read(), re.S | re.M)


def readme_units():
    """{name: text} of the README's systemd units: the blocks that open with their path."""
    units = {}
    for block in readme_blocks():
        first = block.split("\n", 1)[0]
        if first.startswith("# /etc/systemd/system/"):
            units[first.rsplit("/", 1)[1]] = block
    return units


def unit_setting(unit, key, default=None):
    found = re.findall(r"^%s=(.*)$" % key, unit, re.M)
    return found[-1] if found else default


class Recipes(IntegrationCase):
    """The README's recipes, run as written: the systemd units and the log shipping line."""

    UNITS = {"s3push.service", "s3push.timer", "s3push.path"}

    def service_argv(self, state_base):
        """The service's ExecStart as systemd runs it, with this test's paths: %S is
        state_base, the interpreter this one, SOURCE_DIR this test's source."""
        service = readme_units()["s3push.service"]
        argv = shlex.split(unit_setting(service, "ExecStart").replace("%S", state_base))
        self.assertEqual(argv[:2], ["/usr/bin/python3", "/usr/local/bin/s3push.py"])
        return [sys.executable, s3server.S3PUSH, "--endpoint-url", self.recorder.endpoint] + \
            argv[2:-2] + [self.source, "s3://%s/%s" % (self.server.bucket, self.prefix)], argv

    @unittest.skipIf(shutil.which("systemd-analyze") is None, "no systemd-analyze here")
    def test_the_systemd_units_pass_systemd_analyze_verify(self):
        units = readme_units()
        self.assertEqual(set(units), self.UNITS)
        paths = []
        for name, text in sorted(units.items()):
            # verify needs ExecStart's program to exist: this interpreter, this script.
            text = text.replace("/usr/bin/python3 ", sys.executable + " ").replace(
                "/usr/local/bin/s3push.py", s3server.S3PUSH)
            paths.append(os.path.join(self.tmp, name))
            with open(paths[-1], "w") as handle:
                handle.write(text)
        done = subprocess.run(["systemd-analyze", "verify"] + paths, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT)
        # A warning (an unknown key, a bad value ignored) is a failure too.
        self.assertEqual((done.returncode, done.stdout.decode()), (0, ""))

    def test_the_service_keeps_its_lock_in_its_state_directory(self):
        # As systemd starts it: a user whose home does not exist, the state directory made
        # with StateDirectoryMode (default 0755) under %S, credentials in the environment.
        service = readme_units()["s3push.service"]
        base = os.path.join(self.tmp, "var-lib")
        state = os.path.join(base, unit_setting(service, "StateDirectory"))
        os.makedirs(state)
        os.chmod(state, int(unit_setting(service, "StateDirectoryMode", "0755"), 8))
        argv, written = self.service_argv(base)
        self.assertIn(written[-2], unit_setting(service, "ReadWritePaths", "").split())
        write_file(self.source, "a/f", b"data")
        done = subprocess.run(argv, env=self.env(HOME="/nonexistent"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
        self.assertEqual((done.returncode, done.stderr.decode()), (0, ""))
        self.assertEqual(files_under(self.source), [])
        self.assert_landed({"a/f": b"data"})
        self.assertEqual([n for n in os.listdir(state) if n.startswith("run-")], [
            "run-%x-%x.lock" % (os.stat(self.source).st_dev, os.stat(self.source).st_ino)])

    def test_the_path_unit_starts_the_service_on_events_and_the_timer_as_backstop(self):
        units = readme_units()
        source = shlex.split(unit_setting(units["s3push.service"], "ExecStart"))[-2]
        path, timer = units["s3push.path"], units["s3push.timer"]
        # DirectoryNotEmpty= or PathExists*= would start it again at once after each run
        # that leaves a file: back to back, until systemd's start limit fails the units.
        self.assertEqual(re.findall(r"^(Path\w+|DirectoryNotEmpty)=(.*)$", path, re.M),
                         [("PathChanged", source)])
        self.assertEqual(unit_setting(path, "Unit", "s3push.service"), "s3push.service")
        self.assertEqual(unit_setting(timer, "Unit", "s3push.service"), "s3push.service")
        self.assertIsNotNone(unit_setting(timer, "OnUnitActiveSec"))

    def test_the_log_shipping_globs_take_rotated_logs_never_the_live_one(self):
        line = [b for b in readme_blocks() if "--include" in b and "/var/log/app" in b]
        self.assertEqual(len(line), 1, "the Shipping logs line")
        words, filters = shlex.split(line[0]), []
        for i, word in enumerate(words):
            if word in ("--include", "--exclude"):
                filters += words[i:i + 2]
        rotated = ["app.log.1", "app.log.2.gz", "app.log-20261202", "app.log-20261201.gz"]
        for name in rotated + ["app.log"]:
            write_file(self.source, name, b"line\n")
        result = self.run_s3push("--dry-run", *filters)
        self.assertEqual(result.status, 0, result.stderr)
        chosen = re.findall(r"^would move (\S+) -> ", result.stdout, re.M)
        self.assertEqual(sorted(chosen), sorted(os.path.join(self.source, n) for n in rotated))
        self.assertEqual(len(files_under(self.source)), 5)


class Proxies(IntegrationCase):
    def proxy(self, require=None):
        proxy = s3server.ForwardProxy(require)
        self.addCleanup(proxy.close)
        return proxy

    def test_http_proxy_with_a_password(self):
        import base64
        write_file(self.source, "f", b"via proxy")
        proxy = self.proxy("Basic " + base64.b64encode(b"ops:pa@ss").decode())
        url = proxy.url.replace("http://", "http://ops:pa%40ss@")
        result = self.run_s3push(env=self.env(HTTP_PROXY=url))
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"f": b"via proxy"})
        self.assertTrue(proxy.seen and all(t.startswith("http://") for _, t in proxy.seen))
        write_file(self.source, "g", b"x")
        result = self.run_s3push(env=self.env(HTTP_PROXY=url.replace("pa%40ss", "wrong")))
        self.assertEqual(result.status, 78, result.stderr)
        self.assertIn("the proxy refused the request (HTTP 407)", result.stderr)
        self.assertNotIn("wrong", result.stderr)

    def test_no_proxy(self):
        write_file(self.source, "f", b"direct")
        proxy = self.proxy()
        for no_proxy in ("127.0.0.1", "*", "localhost,127.0.0.1:%s"
                         % self.recorder.endpoint.rsplit(":", 1)[1]):
            write_file(self.source, "f", b"direct")
            result = self.run_s3push(env=self.env(HTTP_PROXY=proxy.url, NO_PROXY=no_proxy))
            self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(proxy.seen, [])

    def test_https_through_a_connect_tunnel(self):
        import shutil
        import tempfile
        pki = tempfile.mkdtemp(prefix="s3push-ca-")
        self.addCleanup(shutil.rmtree, pki, True)
        ca, cert, key = s3server.make_ca(pki)
        https = s3server.RcloneServer(tls=(cert, key))
        self.addCleanup(https.stop)
        write_file(self.source, "f", b"tunnelled")
        proxy = self.proxy()
        env = self.env(HTTPS_PROXY=proxy.url, AWS_ACCESS_KEY_ID=https.access_key,
                       AWS_SECRET_ACCESS_KEY=https.secret_key)
        result = self.run_s3push("--ca-bundle", ca, endpoint=https.endpoint, env=env)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(https.object_bytes(self.prefix + "f"), b"tunnelled")
        self.assertEqual(proxy.seen, [("CONNECT", https.endpoint.split("//")[1])])

    def test_a_dead_proxy_is_named(self):
        write_file(self.source, "f", b"x")
        port = s3server.free_port()
        result = self.run_s3push(env=self.env(HTTP_PROXY="http://u:secretpw@127.0.0.1:%d"
                                              % port))
        self.assertEqual(result.status, 75, result.stderr)
        self.assertIn("through the proxy 127.0.0.1:%d" % port, result.stderr)
        self.assertNotIn("secretpw", result.stderr)


def credentials_json(server, expires_in=3600, token=None):
    """What a credential service answers; no session token unless given (moto checks
    tokens against its own STS, and would refuse a made-up one)."""
    import datetime
    import json
    expiration = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
        seconds=expires_in)).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = {"Version": 1, "AccessKeyId": server.access_key,
           "SecretAccessKey": server.secret_key, "Expiration": expiration}
    if token:
        doc.update(Token=token, SessionToken=token)
    return json.dumps(doc).encode()


class FakeServices(IntegrationCase):
    """Fake credential services on loopback that hand out the test server's own keys."""

    def fake(self, handler):
        server = s3server.TinyServer(handler)
        self.addCleanup(server.close)
        return server

    def no_keys(self, **extra):
        return self.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, **extra)

    def sts_answer(self, request):
        """A fake STS: AssumeRole signed with the base keys gives the test server's keys."""
        body = request.body.decode()
        if "Action=AssumeRole" not in body or "RoleArn=arn%3Aaws%3Aiam" not in body:
            return 400, b"<ErrorResponse><Error><Code>Bad</Code></Error></ErrorResponse>"
        if "Credential=AKBASE/" not in request.header("authorization") or \
                "/sts/aws4_request" not in request.header("authorization"):
            return 403, b"<ErrorResponse><Error><Code>AccessDenied</Code></Error>" \
                        b"</ErrorResponse>"
        return 200, ("<AssumeRoleResponse><AssumeRoleResult><Credentials>"
                     "<AccessKeyId>%s</AccessKeyId><SecretAccessKey>%s</SecretAccessKey>"
                     "<SessionToken>ROLETOKEN</SessionToken><Expiration>2099-01-01T00:00:"
                     "00Z</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>"
                     % (self.server.access_key, self.server.secret_key)).encode()

    def role_profile(self, source="source_profile = base"):
        """Profile ops: a role assumed with the keys of profile base; returns its env."""
        with open(os.path.join(self.home, "credentials"), "w") as handle:
            handle.write("[base]\naws_access_key_id = AKBASE\n"
                         "aws_secret_access_key = base-secret-0\n")
        with open(os.path.join(self.home, "config"), "w") as handle:
            handle.write("[profile ops]\nrole_arn = arn:aws:iam::123456789012:role/up\n"
                         "%s\n" % source)
        return self.no_keys(AWS_CONFIG_FILE=os.path.join(self.home, "config"),
                            AWS_SHARED_CREDENTIALS_FILE=os.path.join(self.home, "credentials"))


class CredentialSources(FakeServices):
    """Credentials from a process, a container service, EC2 metadata and STS."""

    def test_credential_process(self):
        script = os.path.join(self.home, "creds.py")
        with open(script, "w") as handle:
            handle.write("import sys\nsys.stdout.write(%r)\nsys.exit(int(sys.argv[1]))\n"
                         % credentials_json(self.server).decode())
        config = os.path.join(self.home, "config")
        for status, expected in (("0", 0), ("3", 78)):
            with open(config, "w") as handle:
                handle.write("[default]\ncredential_process = %s %s %s\n"
                             % (sys.executable, script, status))
            write_file(self.source, "f", b"data")
            result = self.run_s3push(env=self.no_keys(AWS_CONFIG_FILE=config))
            self.assertEqual(result.status, expected, result.stderr)
        self.assertIn("credential_process of profile 'default' failed with exit status 3",
                      result.stderr)

    def test_container_credentials_refreshed_before_they_expire(self):
        def handler(request):
            if request.header("authorization") != "container-token":
                return 401, b""
            return 200, credentials_json(self.server, expires_in=120)
        fake = self.fake(handler)
        for i in range(3):
            write_file(self.source, "f%d" % i, b"data")
        env = self.no_keys(AWS_CONTAINER_CREDENTIALS_FULL_URI=fake.url + "/creds",
                           AWS_CONTAINER_AUTHORIZATION_TOKEN="container-token")
        result = self.run_s3push("--jobs", "1", env=env)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assertGreaterEqual(len(fake.requests), 2, "credentials expiring within 5 "
                                "minutes were not refreshed")

    def test_ec2_instance_profile_through_imdsv2(self):
        def handler(request):
            if request.method == "PUT" and request.target == "/latest/api/token":
                return 200, b"IMDS-TOKEN"
            if request.header("x-aws-ec2-metadata-token") != "IMDS-TOKEN":
                return 401, b""
            base = "/latest/meta-data/iam/security-credentials/"
            if request.target == base:
                return 200, b"uploader-role\n"
            if request.target == base + "uploader-role":
                return 200, credentials_json(self.server)
            return 404, b""
        fake = self.fake(handler)
        write_file(self.source, "f", b"data")
        env = self.no_keys(AWS_EC2_METADATA_DISABLED=None,
                           AWS_EC2_METADATA_SERVICE_ENDPOINT=fake.url)
        result = self.run_s3push(env=env)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual([r.method for r in fake.requests][:3], ["PUT", "GET", "GET"])

    @skip_unless_server_checks("session-token")
    def test_a_metadata_service_that_does_not_answer_gives_the_hop_limit_hint(self):
        silent = self.fake(lambda request: time.sleep(5) or (200, b""))
        write_file(self.source, "f", b"data")
        env = self.no_keys(AWS_EC2_METADATA_DISABLED=None,
                           AWS_EC2_METADATA_SERVICE_ENDPOINT=silent.url)
        started = time.monotonic()
        result = self.run_s3push(env=env)
        self.assertEqual(result.status, 78, result.stderr)
        self.assertIn("metadata hop limit to 2", result.stderr)
        self.assertLess(time.monotonic() - started, 4.5, "the metadata timeout is 1 s")
        self.assertEqual(files_under(self.source), [b"f"])

    @skip_unless_server_checks("session-token")
    def test_assume_role_signed_by_our_signer(self):
        """role_arn with source_profile, then with credential_source = Environment."""
        handler = self.sts_answer
        fake = self.fake(handler)
        base_env = {"AWS_ACCESS_KEY_ID": "AKBASE", "AWS_SECRET_ACCESS_KEY": "base-secret-0"}
        for n, (source, extra_env) in enumerate((("source_profile = base", {}),
                                                 ("credential_source = Environment",
                                                  base_env))):
            write_file(self.source, "f%d" % n, b"data")
            env = self.role_profile(source)
            env.update(extra_env, AWS_ENDPOINT_URL_STS=fake.url)
            result = self.run_s3push("--profile", "ops", env=env)
            self.assertEqual(result.status, 0, source + ": " + result.stderr)
            self.assertEqual(len(fake.requests), n + 1, source)
        self.assert_landed({"f0": b"data", "f1": b"data"})


class CredentialsThroughProxies(FakeServices):
    """STS and the metadata services are reached the way S3 is: HTTP(S)_PROXY, NO_PROXY
    and --ca-bundle apply to every request of a run."""
    STS = "sts.s3push.invalid"   # a name only the proxy resolves

    def proxy(self):
        proxy = s3server.ForwardProxy(hosts=[self.STS])
        self.addCleanup(proxy.close)
        return proxy

    @skip_unless_server_checks("session-token")
    def test_assume_role_through_the_proxy_and_s3_direct(self):
        fake, proxy = self.fake(self.sts_answer), self.proxy()
        write_file(self.source, "f", b"role via proxy")
        env = self.role_profile()
        sts = "http://%s:%d" % (self.STS, fake.port)
        env.update(AWS_ENDPOINT_URL_STS=sts, HTTP_PROXY=proxy.url, NO_PROXY="127.0.0.1")
        result = self.run_s3push("--profile", "ops", env=env)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(proxy.seen, [("POST", sts + "/")])
        self.assertEqual(len(fake.requests), 1)
        self.assert_landed({"f": b"role via proxy"})

    @skip_unless_server_checks("session-token")
    def test_sts_over_https_through_the_proxy_trusts_the_ca_bundle(self):
        import shutil
        import tempfile
        pki = tempfile.mkdtemp(prefix="s3push-ca-")
        self.addCleanup(shutil.rmtree, pki, True)
        ca, cert, key = s3server.make_ca(pki, names=[self.STS])
        fake = s3server.TinyServer(self.sts_answer, tls=(cert, key))
        self.addCleanup(fake.close)
        proxy = self.proxy()
        write_file(self.source, "f", b"role via tunnel")
        env = self.role_profile()
        env.update(AWS_ENDPOINT_URL_STS="https://%s:%d" % (self.STS, fake.port),
                   HTTPS_PROXY=proxy.url)
        result = self.run_s3push("--profile", "ops", env=env)
        self.assertEqual(result.status, 78, result.stderr)
        self.assertIn("is not trusted", result.stderr)
        self.assertIn("--ca-bundle", result.stderr)
        self.assertEqual(files_under(self.source), [b"f"])
        result = self.run_s3push("--profile", "ops", "--ca-bundle", ca, env=env)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(proxy.seen, [("CONNECT", "%s:%d" % (self.STS, fake.port))] * 2)
        self.assertEqual(len(fake.requests), 1)
        self.assert_landed({"f": b"role via tunnel"})

    def test_the_metadata_service_follows_no_proxy(self):
        def handler(request):
            if request.method == "PUT":
                return 200, b"IMDS-TOKEN"
            base = "/latest/meta-data/iam/security-credentials/"
            if request.target == base:
                return 200, b"uploader-role\n"
            return 200, credentials_json(self.server)
        fake, proxy = self.fake(handler), self.proxy()
        env = self.no_keys(AWS_EC2_METADATA_DISABLED=None,
                           AWS_EC2_METADATA_SERVICE_ENDPOINT=fake.url, HTTP_PROXY=proxy.url)
        write_file(self.source, "f", b"direct")
        result = self.run_s3push(env=dict(env, NO_PROXY="127.0.0.1"))
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(proxy.seen, [])
        self.assertEqual(len(fake.requests), 3)
        write_file(self.source, "g", b"proxied")
        result = self.run_s3push(env=env)   # as the AWS CLI: the proxy, unless NO_PROXY
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(proxy.seen[0], ("PUT", fake.url + "/latest/api/token"))
        self.assertEqual(len(fake.requests), 6)
        self.assert_landed({"f": b"direct", "g": b"proxied"})


class Archive(WithArchive, IntegrationCase):
    """--archive-dir: each file, once confirmed, linked into DIR at its relative path
    instead of removed; never over a name there, never out of DIR through a symlink."""

    def assert_next_run_sends_nothing(self):
        """Run again: it ends well, the ledger vouching for what was confirmed."""
        sent = len(self.recorder.requests)
        result = self.run_s3push("--archive-dir", self.archive)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(len(self.recorder.requests), sent)

    def test_files_are_archived_at_their_relative_paths_with_bytes_and_mtime(self):
        write_file(self.source, "top.csv", b"top", mtime=1000000000)
        write_file(self.source, "a/b/deep.log", b"deep", mtime=1200000000)
        inode = os.stat(os.path.join(self.source, "a/b/deep.log")).st_ino
        result = self.run_s3push("--archive-dir", self.archive, "-v")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed({"top.csv": b"top", "a/b/deep.log": b"deep"})
        self.assertEqual(self.archived(), {"top.csv": b"top", "a/b/deep.log": b"deep"})
        deep = os.stat(os.path.join(self.archive, "a/b/deep.log"))
        self.assertEqual((deep.st_mtime, deep.st_ino, deep.st_nlink), (1200000000, inode, 1))
        # The README's expiry line counts from the ctime: the day it was archived.
        self.assertGreater(deep.st_ctime, time.time() - 60)
        self.assertEqual(os.stat(os.path.join(self.archive, "top.csv")).st_mtime, 1000000000)
        self.assertIn("archived as %s" % os.path.join(self.archive, "a/b/deep.log"),
                      result.stdout)

    def test_a_name_taken_in_the_archive_is_never_overwritten(self):
        write_file(self.archive, "sub/app.log", b"monday")
        write_file(self.archive, "sub/app.1.log", b"tuesday")
        write_file(self.source, "sub/app.log", b"wednesday")
        result = self.run_s3push("--archive-dir", self.archive, "-v")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(self.archived(), {"sub/app.log": b"monday", "sub/app.1.log":
                                           b"tuesday", "sub/app.2.log": b"wednesday"})
        self.assertIn("archived as %s" % os.path.join(self.archive, "sub/app.2.log"),
                      result.stdout)
        self.assertEqual(files_under(self.source), [])

    def test_a_file_whose_every_numbered_name_is_taken_is_kept(self):
        taken = {"app.log": b"0"}
        taken.update(("app.%d.log" % n, b"%d" % n) for n in range(1, 101))
        for name, data in taken.items():
            write_file(self.archive, name, data)
        write_file(self.source, "app.log", b"today")
        result = self.run_s3push("--archive-dir", self.archive)
        self.assertEqual(result.status, 65, result.stderr)
        self.assertIn("the next 100 numbered names are all taken", result.stderr)
        self.assertEqual(files_under(self.source), [b"app.log"])
        self.assertEqual(self.archived(), taken)

    def test_a_symlink_in_the_archive_never_leads_a_file_out_of_it(self):
        # A writer of DIR puts a symlink where a folder would be made: the file stays.
        elsewhere = os.path.join(self.tmp, "elsewhere")
        os.makedirs(elsewhere)
        os.symlink(elsewhere, os.path.join(self.archive, "sub"))
        write_file(self.source, "sub/app.log", b"data")
        result = self.run_s3push("--archive-dir", self.archive)
        self.assertEqual(result.status, 65, result.stderr)
        self.assertIn("cannot archive it once uploaded", result.stderr)
        self.assertEqual(os.listdir(elsewhere), [])
        self.assertEqual(files_under(self.source), [b"sub/app.log"])
        os.unlink(os.path.join(self.archive, "sub"))   # put right: the next run sends nothing
        self.assert_next_run_sends_nothing()
        self.assertEqual(self.archived(), {"sub/app.log": b"data"})

    def test_a_folder_that_cannot_hold_the_archive_is_a_usage_error(self):
        write_file(self.source, "f.log", b"data")
        inside = os.path.join(self.source, "sub", "archive")
        hidden = os.path.join(self.source, ".archive")
        afile = write_file(self.tmp, "afile", b"")
        tmpfs = os.path.join(self.tmp, "tmpfs")
        os.makedirs(tmpfs)
        for folder in (inside, hidden):
            os.makedirs(folder)
        cases = [(inside, "is inside SOURCE_DIR"), (hidden, "is inside SOURCE_DIR"),
                 (self.source, "is inside SOURCE_DIR"), (self.tmp, "holds SOURCE_DIR"),
                 (os.path.join(self.tmp, "missing"), "No such file"),
                 (os.fsdecode(afile), "Not a directory")]
        shared = os.path.join(self.tmp, "shared")   # a writer of DIR could read or steal
        os.makedirs(shared)
        os.chmod(shared, 0o1777)
        cases.append((shared, "other accounts may write in it"))
        if os.geteuid() == 0:
            subprocess.check_call(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", tmpfs])
            self.addCleanup(subprocess.call, ["umount", tmpfs])
            cases.append((tmpfs, "is on another filesystem than SOURCE_DIR"))
            # The same filesystem mounted elsewhere: st_dev agrees, but link() would fail.
            bound = os.path.join(self.tmp, "bound")
            os.makedirs(bound)
            subprocess.check_call(["mount", "--bind", self.archive, bound])
            self.addCleanup(subprocess.call, ["umount", bound])
            cases.append((bound, "is on another mount than SOURCE_DIR"))
            theirs = os.path.join(self.tmp, "theirs")
            os.makedirs(theirs)
            os.chown(theirs, 65534, 65534)
            cases.append((theirs, "other accounts may write in it"))
        for folder, why in cases:
            with self.subTest(folder=folder):
                for dry in ((), ("--dry-run",)):
                    result = self.run_s3push("--archive-dir", folder, *dry)
                    self.assertEqual(result.status, 2, result.stderr)
                    self.assertIn("--archive-dir %s" % folder, result.stderr)
                    self.assertIn(why, result.stderr)
        self.assertEqual(files_under(self.source), [b"f.log"])
        self.assertEqual(self.recorder.requests, [])

    @unittest.skipIf(os.geteuid() != 0, "needs root, to own files as other accounts")
    def test_no_other_account_reads_or_takes_an_archived_file(self):
        # alice/ (0700) kept others from her 0644 file: so does the folder made for it in
        # DIR. A folder in DIR that another account owns is never archived into.
        os.chmod(self.tmp, 0o755)
        for name in ("alice", "bob"):
            os.makedirs(os.path.join(self.source, name))
            path = write_file(self.source, name + "/secret.txt", name.encode())
            os.chmod(path, 0o644)
            for inside in (path, os.path.dirname(path)):
                os.chown(inside, 65534, 65534)
            os.chmod(os.path.dirname(path), 0o700)
        os.makedirs(os.path.join(self.archive, "bob"))
        os.chown(os.path.join(self.archive, "bob"), 65534, 65534)
        result = self.run_s3push("--archive-dir", self.archive)
        self.assertEqual(result.status, 65, result.stderr)
        self.assertEqual(self.archived(), {"alice/secret.txt": b"alice"})
        made = os.stat(os.path.join(self.archive, "alice"))
        self.assertEqual((made.st_uid, stat.S_IMODE(made.st_mode)), (os.geteuid(), 0o700))
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("the archive's folder %s is owned by uid 65534"
                      % os.path.join(self.archive, "bob"), result.stderr)
        self.assertEqual(files_under(self.source), [b"bob/secret.txt"])
        os.rmdir(os.path.join(self.archive, "bob"))   # put right: the next run sends nothing
        self.assert_next_run_sends_nothing()
        self.assertEqual(files_under(self.source), [])

    def test_a_dry_run_says_where_each_file_would_be_archived(self):
        write_file(self.source, "sub/app.log", b"data")
        result = self.run_s3push("--archive-dir", self.archive, "--dry-run")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn("then archive it in %s" % os.path.join(self.archive, "sub/"),
                      result.stdout)
        self.assertEqual(files_under(self.source), [b"sub/app.log"])
        self.assertEqual(self.archived(), {})
        self.assertIn("--archive-dir DIR", self.run_s3push("--help").stdout)


if __name__ == "__main__":
    unittest.main()

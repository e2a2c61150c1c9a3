"""--compress gzip (issue 25): each file goes up as its gzip at its key plus .gz, proven like
any body (the server confirmed the bytes sent), those bytes checked to gunzip to the file
as it was read; files compressed already go as they are; a file that changes while it is
compressed is kept, and the key never holds a mix.

Every object is read back as an administrator and gunzipped here.
"""

import gzip
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3server  # noqa: E402
from helpers import RUN_TIMEOUT, IntegrationCase, files_under, write_file  # noqa: E402

MIB = 1024 * 1024
MULTIPART = ("--multipart-threshold", "5MiB", "--part-size", "5MiB")
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"   # no name, mtime 0


def log_lines(count, seed=0):
    """Text that compresses as logs do."""
    return b"".join(b"2026-12-02T11:%02d:%02d host app[%d]: GET /item/%d status=200 "
                    b"bytes=%d\n" % (i // 60 % 60, i % 60, seed, i * 7919 % 100003, i * 31)
                    for i in range(count))


def hex_text(size):
    """Text that gzip only halves: big enough stays multipart once compressed."""
    return os.urandom(size // 2).hex().encode()


# The script with s3push.MOVE_SEAM set: at the step SEAM_STEP ("compress": while the
# file is read for its gzip; "compressed": once the gzip is spooled, before it is sent) the
# file is rewritten in place with SEAM_NEW's bytes and its old mtime put back.
SEAMED = """
import os, sys
sys.path.insert(0, %r)
import s3push
done = []

def seam(step, name):
    if step != os.environ["SEAM_STEP"] or done:
        return
    done.append(step)
    path = os.environ["SEAM_PATH"]
    info = os.stat(path)
    with open(path, "r+b") as handle, open(os.environ["SEAM_NEW"], "rb") as new:
        handle.write(new.read())
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))

s3push.MOVE_SEAM = seam
sys.argv[0] = s3push.__file__
sys.exit(s3push.main())
""" % s3server.REPO


class Compress(IntegrationCase):
    def gunzipped(self, relative):
        data = self.server.object_bytes(self.prefix + relative)
        self.assertIsNotNone(data, "missing on the server: %r" % relative)
        self.assertEqual(data[:10], GZIP_HEADER)   # deterministic: no name, no mtime
        return gzip.decompress(data)

    def starts(self):
        return [h for h in self.recorder.heads if h.method == "PUT" and "partNumber" not in
                h.target or "?uploads" in h.target]

    def test_small_and_multipart_files_land_as_their_gzip(self):
        files = {"app.log": log_lines(2000), "d/big.txt": hex_text(12 * MIB)}
        for relative, data in files.items():
            write_file(self.source, relative, data)
        manifest = os.path.join(self.tmp, "moved.jsonl")
        result = self.run_s3push("--compress", "gzip", "--manifest", manifest, *MULTIPART)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        for relative, data in files.items():
            self.assertEqual(self.gunzipped(relative + ".gz"), data, relative)
        self.assertIsNone(self.server.object_bytes(self.prefix + "app.log"))
        heads = self.starts()
        self.assertEqual(len(heads), 2)   # the small PUT and CreateMultipartUpload
        self.assertEqual(sorted(h.header("x-amz-meta-s3push-size") for h in heads),
                         sorted(str(len(data)) for data in files.values()))
        for head in heads:
            self.assertEqual(head.header("content-type"), "application/gzip")
        parts = [h for h in self.recorder.heads if "partNumber" in h.target]
        self.assertEqual(len(parts), 2, "12 MiB of hex gzips to 2 parts of 5 MiB")
        with open(manifest) as handle:
            lines = {json.loads(line)["key"]: json.loads(line) for line in handle}
        for relative, data in files.items():
            line = lines[self.prefix + relative + ".gz"]
            stored = self.server.object_bytes(self.prefix + relative + ".gz")
            self.assertEqual((line["compression"], line["size"], line["compressed_size"]),
                             ("gzip", len(data), len(stored)))

    def test_a_gzip_level_and_a_content_type_of_one_s_own(self):
        data = log_lines(5000)
        write_file(self.source, "a.log", data)
        result = self.run_s3push("--compress", "gzip:1", "--content-type", "text/plain")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(self.gunzipped("a.log.gz"), data)
        self.assertEqual(self.starts()[0].header("content-type"), "text/plain")
        write_file(self.source, "a.log", data)
        result = self.run_s3push("--compress", "gzip:9", "-v")
        self.assertEqual(result.status, 0, result.stderr)
        best = self.server.object_bytes(self.prefix + "a.log.gz")
        self.assertEqual(gzip.decompress(best), data)
        self.assertIn("a.log.gz", result.stdout)

    def test_compressed_files_go_as_they_are(self):
        files = {"old.log.gz": gzip.compress(log_lines(100)), "photo.JPG": b"\xff\xd8\xffjpeg",
                 "rotated": gzip.compress(b"rotated, no extension"),
                 "bundle.bin": b"PK\x03\x04zip", "clip": b"\0\0\0\x18ftypmp42",
                 "empty.txt": b""}
        for relative, data in files.items():
            write_file(self.source, relative, data)
        result = self.run_s3push("--compress", "gzip")
        self.assertEqual(result.status, 0, result.stderr)
        del files["empty.txt"]
        self.assert_landed(files)
        self.assertEqual(self.gunzipped("empty.txt.gz"), b"")
        self.assertEqual(sorted(self.server.keys(self.prefix)),
                         sorted(self.prefix + k for k in list(files) + ["empty.txt.gz"]))

    def test_a_file_and_its_gz_namesake_never_share_a_key(self):
        write_file(self.source, "a.log.gz", gzip.compress(b"the older"), mtime=1000)
        write_file(self.source, "a.log", b"the newer", mtime=2000)
        result = self.run_s3push("--compress", "gzip", "--jobs", "1")
        self.assertEqual(result.status, 65, result.stderr)
        self.assertIn("a.log -> s3://%s/%sa.log: another file of this run went to that "
                      "key plus .gz" % (self.server.bucket, self.prefix), result.stderr)
        self.assertEqual(gzip.decompress(self.server.object_bytes(self.prefix + "a.log.gz")),
                         b"the older")
        self.assertEqual(files_under(self.source), [b"a.log"])

    def test_the_dry_run_names_the_gz_keys(self):
        write_file(self.source, "a.log", b"text")
        write_file(self.source, "b.zst", b"(zstd)")
        result = self.run_s3push("--compress", "gzip", "--dry-run")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn("%sa.log.gz (4 bytes)" % self.prefix, result.stdout)
        self.assertIn("%sb.zst (6 bytes)" % self.prefix, result.stdout)
        self.assertEqual(files_under(self.source), [b"a.log", b"b.zst"])

    def test_bad_levels_and_no_state_folder_keep_every_file(self):
        write_file(self.source, "a.log", b"text")
        for value in ("zip", "gzip:0", "gzip:10", "gzip:"):
            result = self.run_s3push("--compress", value)
            self.assertEqual(result.status, 2, (value, result.stderr))
            self.assertIn("--compress", result.stderr)
        blocker = os.path.join(self.tmp, "a-file")
        write_file(self.tmp, "a-file", b"")
        result = self.run_s3push("--compress", "gzip", "--state-dir",
                                 os.path.join(blocker, "state"))
        self.assertEqual(result.status, 78, result.stderr)
        self.assertIn("--compress spools each gzip in the private state folder",
                      result.stderr)
        self.assertEqual(files_under(self.source), [b"a.log"])
        self.assertEqual(self.server.keys(self.prefix), set())

    def seamed_run(self, step, path, new):
        replacement = os.path.join(self.tmp, "new-version")
        with open(replacement, "wb") as handle:
            handle.write(new)
        command = self.command("--compress", "gzip", "--jobs", "1", *MULTIPART)
        command[1:3] = ["-c", SEAMED]
        env = self.env(SEAM_STEP=step, SEAM_PATH=path, SEAM_NEW=replacement)
        return subprocess.run(command, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              timeout=RUN_TIMEOUT)

    def test_a_file_rewritten_while_compressed_is_kept_and_never_mixed(self):
        for step, size in (("compress", 2 * MIB), ("compressed", 2 * MIB),
                           ("compress", 12 * MIB), ("compressed", 12 * MIB)):
            old, new = hex_text(size), hex_text(size)
            name = "%s-%d.txt" % (step, size)
            path = write_file(self.source, name, old)
            done = self.seamed_run(step, path, new)
            err = done.stderr.decode()
            self.assertEqual(done.returncode, 65, err)
            self.assertIn("changed", err)
            self.assertEqual(files_under(self.source), [name.encode()])
            got = self.server.object_bytes(self.prefix + name + ".gz")
            if step == "compress":   # read across the change: nothing sent
                self.assertTrue(got is None, "%s: the key holds a gzip" % name)
            else:   # the gzip of the old state went; the file, changed since, is kept
                self.assertEqual(gzip.decompress(got), old, name)
            result = self.run_s3push("--compress", "gzip", *MULTIPART)
            self.assertEqual(result.status, 0, result.stderr)
            self.assertEqual(self.gunzipped(name + ".gz"), new, name)
            self.assertEqual(files_under(self.source), [])

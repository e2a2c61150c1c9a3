"""What proves an upload: MD5 (Content-MD5 and the ETag) by default off AWS, CRC32 or
SHA-256 where the server verifies it (x-amz-checksum-crc32, -sha256, echoed), and never an
echo alone.

Against every server: the default proof, a server that claims a checksum it never checked,
a CRC32 answered wrong. Against a server that ignores CRC32 and SHA-256 (rclone's, Ceph RGW
16): --checksum crc32 or sha256 stops the run and keeps every file. Against one that
verifies them (LocalStack in make test-localstack, MinIO given by MINIO_BIN for CRC32): each
path end to end, damaged bodies, multipart (a whole-file CRC32, a COMPOSITE SHA-256), and a
resumed upload; a SHA-256 of parts proven again by a later run from the ledger.
"""

import base64
import hashlib
import json
import os
import signal
import sys
import unittest
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3server  # noqa: E402
from helpers import files_under, write_file  # noqa: E402
from test_faults import MIB, MULTIPART, FaultCase  # noqa: E402
import test_handover  # noqa: E402

CRC32 = ("--checksum", "crc32")
VERIFIES_CRC32 = ("localstack", "minio")      # refuse a body whose CRC32 differs, echo it
IGNORES_CRC32 = ("rclone", "rgw")             # neither check nor echo x-amz-checksum-crc32
SHA256 = ("--checksum", "sha256")
VERIFIES_SHA256 = ("localstack",)             # refuses a body whose SHA-256 differs, echoes it
IGNORES_SHA256 = ("rclone", "rgw")            # neither check nor echo x-amz-checksum-sha256


def crc32_text(data):
    """The x-amz-checksum-crc32 of data, as the script writes it."""
    return s3server.s3push.base64_text(zlib.crc32(data).to_bytes(4, "big"))


def sha256_text(data):
    """The x-amz-checksum-sha256 of data, as the script writes it."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def composite_sha256(data, part_size=5 * MIB):
    """S3's COMPOSITE SHA-256 of data sent in parts: (base64-N, hex-N)."""
    digests = [hashlib.sha256(data[o:o + part_size]).digest()
               for o in range(0, len(data), part_size)]
    whole = hashlib.sha256(b"".join(digests)).digest()
    return ("%s-%d" % (base64.b64encode(whole).decode("ascii"), len(digests)),
            "%s-%d" % (whole.hex(), len(digests)))


def only_on(kinds, what):
    kind = s3server.server_kind()
    return unittest.skipIf(kind not in kinds, "%s server: %s" % (kind, what))


def body_requests(proxy):
    """The heads of the PUTs that carried a body (objects and parts)."""
    return [head for head in proxy.heads if head.method == "PUT"]


def assert_a_flipped_byte_keeps_every_file(case, args):
    """A byte of each first body flipped on the way: the server refuses it (BadDigest),
    and every file is kept or landed whole."""
    files = case.corpus(5, big=1)
    proxy = case.fault_proxy(lambda r: ("flip",) if r.attempt == 0 and r.body else None)
    result = case.run_s3push("--retries", "0", *args, endpoint=proxy.endpoint)
    case.assertNotEqual(result.status, 0, result.stderr)
    case.assertIn("BadDigest", result.stderr)
    case.assertEqual(len(files_under(case.source)), len(files), result.stderr)
    case.assert_nothing_lost(files)


def the_one_journal(case):
    """The lines of the one resume journal in the test's home."""
    journals = [os.path.join(d, n) for d, _, names in os.walk(case.home) for n in names
                if n.endswith(".journal")]
    case.assertEqual(len(journals), 1)
    with open(journals[0]) as handle:
        return [json.loads(line) for line in handle]


class DefaultProof(FaultCase):
    """Off AWS, by default: MD5. Never a checksum header the server may not check."""

    def test_off_aws_every_body_goes_under_its_md5(self):
        files = self.corpus(5, big=1)
        result = self.run_s3push(*MULTIPART)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed(files)
        heads = body_requests(self.recorder)
        # Each object and part once at least: a loaded server may have a request retried,
        # or (rclone's, when it fails a part) the upload started afresh under a new id.
        self.assertEqual(len({head.target.partition("&uploadId=")[0] for head in heads}),
                         5 + 2)
        for head in heads:
            self.assertTrue(head.header("content-md5"), head.target)
            self.assertEqual(head.header("x-amz-checksum-crc32"), "", head.target)

    def test_a_server_that_claims_a_checksum_it_never_checked_is_not_trusted(self):
        # The body is damaged on the way, and the answer carries the CRC32 of the bytes
        # as sent, as a server that echoes without checking (moto) would: by default it
        # proves nothing, and the MD5 (Content-MD5, the ETag) keeps every file.
        files = self.corpus(5, big=1)

        def rule(request):
            if request.attempt == 0 and request.body:
                return ("flip", {"x-amz-checksum-crc32": crc32_text(request.body)})
            return None
        proxy = self.fault_proxy(rule)
        result = self.run_s3push("--retries", "0", *MULTIPART, endpoint=proxy.endpoint)
        self.assertNotEqual(result.status, 0, result.stderr)
        self.assertEqual(len(files_under(self.source)), len(files), result.stderr)
        self.assert_nothing_lost(files)

    def test_a_crc32_answered_wrong_keeps_the_file(self):
        # The answer's CRC32 is not the one sent: the bytes are not proven, whatever the
        # server did (set by the proxy, so this runs on every server).
        write_file(self.source, "f", b"data")
        proxy = self.fault_proxy(lambda r: ("header", {"x-amz-checksum-crc32": "AAAAAA=="})
                                 if r.method == "PUT" else None)
        result = self.run_s3push("--retries", "1", *CRC32, endpoint=proxy.endpoint)
        self.assertEqual(result.status, 75, result.stderr)
        self.assertIn("CRC32 AAAAAA== is not that of what was sent", result.stderr)
        self.assertEqual(files_under(self.source), [b"f"])
        self.assertEqual(len(proxy.requests), 2, "a damaged answer is retried")


class IgnoredCrc32(FaultCase):
    @only_on(IGNORES_CRC32, "it verifies or echoes x-amz-checksum-crc32")
    def test_crc32_where_the_server_ignores_it_stops_and_keeps_every_file(self):
        files = self.corpus(3, big=1)
        result = self.run_s3push(*(CRC32 + MULTIPART))
        self.assertEqual(result.status, 78, result.stderr)
        self.assertIn("did not confirm the CRC32", result.stderr)
        self.assertIn("--checksum md5", result.stderr)
        self.assertEqual(len(files_under(self.source)), len(files))

    @only_on(IGNORES_CRC32, "it verifies or echoes x-amz-checksum-crc32")
    def test_a_multipart_file_alone_says_so_too(self):
        # The part that met the missing echo names the cause, not a part it stopped.
        files = self.corpus(0, big=1)
        result = self.run_s3push(*(CRC32 + MULTIPART))
        self.assertEqual(result.status, 78, result.stderr)
        self.assertIn("did not confirm the CRC32", result.stderr)
        self.assertEqual(len(files_under(self.source)), len(files))


@only_on(VERIFIES_CRC32, "it does not verify x-amz-checksum-crc32")
class VerifiedCrc32(FaultCase):
    def test_crc32_proves_puts_and_a_whole_file_multipart(self):
        files = self.corpus(5, big=1)
        result = self.run_s3push(*(CRC32 + MULTIPART))
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(files)
        for head in body_requests(self.recorder):   # over http: the MD5, the SHA-256 too
            self.assertTrue(head.header("content-md5"), head.target)
            self.assertTrue(head.header("x-amz-checksum-crc32"), head.target)
            self.assertRegex(head.header("x-amz-content-sha256"), r"^[0-9a-f]{64}$")
        starts = [head for head in self.recorder.heads if "?uploads" in head.target]
        self.assertEqual(len(starts), 1)
        self.assertEqual(starts[0].header("x-amz-checksum-type"), "FULL_OBJECT")
        # The object's checksum is the whole file's CRC32, as a single PUT's would be.
        big = "big/b0.bin"
        headers = self.server.object_headers(self.prefix + big,
                                             {"x-amz-checksum-mode": "ENABLED"})
        self.assertEqual(headers.get("x-amz-checksum-crc32"), crc32_text(files[big]))

    def test_a_damaged_body_never_lands_under_crc32(self):
        for args in ((), ("--sign-payload",)):
            assert_a_flipped_byte_keeps_every_file(self, CRC32 + MULTIPART + args)

    def test_a_crc32_upload_resumes_from_its_journal(self):
        files = self.corpus(0, big=1)
        big = files["big/b0.bin"]
        proxy = self.fault_proxy(lambda r: ("answer", 500, "InternalError")
                                 if "partNumber=2&" in r.target else None)
        result = self.run_s3push("--retries", "0", "--jobs", "1", *(CRC32 + MULTIPART),
                                 endpoint=proxy.endpoint)
        self.assertEqual(result.status, 75, result.stderr)
        lines = the_one_journal(self)
        self.assertEqual(lines[0]["checksum"], "crc32")
        self.assertEqual([(p["part"], p["crc32"]) for p in lines[1:]],
                         [(1, "%08x" % zlib.crc32(big[:5 * 1024 * 1024]))])
        result = self.run_s3push("-v", *(CRC32 + MULTIPART))
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn("1 of 2 parts already there", result.stdout + result.stderr)
        self.assertEqual([t for _, t in self.recorder.requests if "partNumber=1&" in t], [],
                         "part 1 was in the journal: it is not sent again")
        self.assert_landed(files)
        headers = self.server.object_headers(self.prefix + "big/b0.bin",
                                             {"x-amz-checksum-mode": "ENABLED"})
        self.assertEqual(headers.get("x-amz-checksum-crc32"), crc32_text(big))


@only_on(VERIFIES_CRC32, "it does not verify x-amz-checksum-crc32")
class ForgedCrc32(FaultCase):
    def test_a_body_changed_under_its_crc32_over_http_never_lands(self):
        # Over plain http anyone on the path may change a body and choose four bytes that
        # keep its CRC32; over http every body also goes under its signed SHA-256 (which
        # AWS checks; LocalStack does not) and its signed Content-MD5 (which every server
        # checks). No file is deleted unless its object equals it.
        files = self.corpus(4, big=1)
        for relative in list(files)[:4]:   # at least 5 bytes: the forgery needs them
            files[relative] = os.urandom(100)
            write_file(self.source, relative, files[relative])
        proxy = self.fault_proxy(lambda r: ("forge",) if r.method == "PUT" else None)
        result = self.run_s3push("--retries", "1", *(CRC32 + MULTIPART),
                                 endpoint=proxy.endpoint)
        self.assertNotEqual(result.status, 0, result.stderr)
        self.assert_nothing_lost(files)
        self.assertEqual(len(files_under(self.source)), len(files), result.stderr)
        self.assertRegex(result.stderr, "BadDigest|XAmzContentSHA256Mismatch")


class IgnoredSha256(FaultCase):
    @only_on(IGNORES_SHA256, "it verifies or echoes x-amz-checksum-sha256")
    def test_sha256_where_the_server_ignores_it_stops_and_keeps_every_file(self):
        # No echo, no proof: the ETag is no SHA-256, and no MD5 went beside it.
        files = self.corpus(3, big=1)
        result = self.run_s3push(*(SHA256 + MULTIPART))
        self.assertEqual(result.status, 78, result.stderr)
        self.assertIn("did not confirm the SHA-256", result.stderr)
        self.assertIn("--checksum md5", result.stderr)
        self.assertEqual(len(files_under(self.source)), len(files))
        heads = body_requests(self.recorder)
        self.assertTrue(heads)
        for head in heads:   # over http: the signed payload's SHA-256 is the checksum's
            checksum = head.header("x-amz-checksum-sha256")
            self.assertEqual(base64.b64decode(checksum).hex(),
                             head.header("x-amz-content-sha256"), head.target)
            self.assertEqual(head.header("content-md5"), "", head.target)


@only_on(VERIFIES_SHA256, "it does not verify x-amz-checksum-sha256")
class VerifiedSha256(FaultCase):
    seamed_run = test_handover.Handover.seamed_run   # a run killed at a step

    def test_sha256_proves_puts_and_a_composite_multipart(self):
        files = self.corpus(5, big=1)
        manifest = os.path.join(self.tmp, "manifest.jsonl")
        result = self.run_s3push("--manifest", manifest, *(SHA256 + MULTIPART))
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(files)
        for head in body_requests(self.recorder):   # one hash: signed payload and checksum
            checksum = head.header("x-amz-checksum-sha256")
            self.assertEqual(base64.b64decode(checksum).hex(),
                             head.header("x-amz-content-sha256"), head.target)
            self.assertEqual(head.header("content-md5"), "", head.target)
        starts = [head for head in self.recorder.heads if "?uploads" in head.target]
        self.assertEqual(len(starts), 1)
        self.assertEqual((starts[0].header("x-amz-checksum-algorithm"),
                          starts[0].header("x-amz-checksum-type")), ("SHA256", "COMPOSITE"))
        # What an auditor reads off each object, and what the manifest says of it.
        with open(manifest) as handle:
            lines = {line["key"][len(self.prefix):]: line
                     for line in map(json.loads, handle)}
        self.assertEqual(sorted(lines), sorted(files))
        for relative, data in files.items():
            headers = self.server.object_headers(self.prefix + relative,
                                                 {"x-amz-checksum-mode": "ENABLED"})
            if len(data) > 5 * MIB:
                echoed, recorded = composite_sha256(data)
                self.assertEqual(lines[relative]["checksum"], {"sha256_of_parts": recorded})
            else:
                echoed = sha256_text(data)
                self.assertEqual(lines[relative]["checksum"],
                                 {"sha256": hashlib.sha256(data).hexdigest()})
            self.assertEqual(headers.get("x-amz-checksum-sha256"), echoed, relative)

    def test_a_damaged_body_never_lands_under_sha256(self):
        assert_a_flipped_byte_keeps_every_file(self, SHA256 + MULTIPART)

    def test_a_sha256_upload_resumes_from_its_journal(self):
        files = self.corpus(0, big=1)
        big = files["big/b0.bin"]
        proxy = self.fault_proxy(lambda r: ("answer", 500, "InternalError")
                                 if "partNumber=2&" in r.target else None)
        result = self.run_s3push("--retries", "0", "--jobs", "1", *(SHA256 + MULTIPART),
                                 endpoint=proxy.endpoint)
        self.assertEqual(result.status, 75, result.stderr)
        lines = the_one_journal(self)
        self.assertEqual(lines[0]["checksum"], "sha256")
        self.assertEqual([(p["part"], p["sha256"]) for p in lines[1:]],
                         [(1, hashlib.sha256(big[:5 * MIB]).hexdigest())])
        result = self.run_s3push("-v", *(SHA256 + MULTIPART))
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn("1 of 2 parts already there", result.stdout + result.stderr)
        self.assertEqual([t for _, t in self.recorder.requests if "partNumber=1&" in t], [],
                         "part 1 was in the journal: it is not sent again")
        self.assert_landed(files)
        headers = self.server.object_headers(self.prefix + "big/b0.bin",
                                             {"x-amz-checksum-mode": "ENABLED"})
        self.assertEqual(headers.get("x-amz-checksum-sha256"), composite_sha256(big)[0])

    def test_a_sha256_of_parts_is_proven_again_by_the_next_run(self):
        # Killed once the ledger holds the confirmation: the next run reads the file's
        # parts again at the recorded part size, finds the composite, and removes the file
        # without sending it again.
        files = self.corpus(0, big=1)
        done = self.seamed_run("recorded", "kill", None, *(SHA256 + MULTIPART))
        self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
        sent = len(body_requests(self.recorder))
        result = self.run_s3push(*(SHA256 + MULTIPART))
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assertEqual(len(body_requests(self.recorder)), sent, "sent again")
        self.assert_landed(files)


class ControlCharacters(FaultCase):
    """Names with control characters, legal on Linux and in keys: AWS S3 (LocalStack too)
    writes them into its XML answers as references that XML 1.0 forbids."""

    def test_names_with_control_characters_move(self):
        files = {"ctl\x08name.bin": os.urandom(2000), "tab\tand\x1fus/f\x01.txt": b"small",
                 "big\x08/b\x0b.bin": os.urandom(6 * 1024 * 1024)}
        for relative, data in files.items():
            write_file(self.source, relative, data)
        result = self.run_s3push("--jobs", "1", *MULTIPART)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(files)
        starts = [t for m, t in self.recorder.requests if m == "POST" and "?uploads" in t]
        self.assertEqual(len(starts), 1, "one multipart upload, started once")


if __name__ == "__main__":
    unittest.main()

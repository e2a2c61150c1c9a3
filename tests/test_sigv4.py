"""The SigV4 signer against AWS's published vectors, one spec step at a time.

Data: tests/data/sigv4-test-suite (copied from shared/, licences and sources inside).
Each case becomes one test method; cases that do not apply to S3 are skipped with
the reason recorded in s3-applicability.json.
"""

import datetime
import hashlib
import json
import os
import sys
import unittest
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import s3push  # noqa: E402
s3push.load_deferred_modules()   # what a run loads once it has a file to send

SUITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sigv4-test-suite")
V4 = os.path.join(SUITE, "v4")
LEGACY = os.path.join(SUITE, "legacy-aws-sig-v4-test-suite")
LEGACY_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
LEGACY_TOKEN = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267"

with open(os.path.join(SUITE, "s3-applicability.json"), encoding="utf-8") as _f:
    APPLICABILITY = json.load(_f)
with open(os.path.join(SUITE, "s3-doc-examples.json"), encoding="utf-8") as _f:
    DOC_EXAMPLES = json.load(_f)


def read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def parse_request(text):
    """(method, unencoded path, query pairs, header pairs, body bytes) of a vector request.

    The request line is split at its first and last space (targets may hold spaces);
    folded header lines continue the previous header; percent-encoded targets are
    decoded so that the signer sees what a caller would hand it.
    """
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    method, rest = lines[0].split(" ", 1)
    target = rest.rsplit(" ", 1)[0]
    headers = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
        elif line:
            name, _, value = line.partition(":")
            headers.append((name, value))
    path, _, query = target.partition("?")
    params = []
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        params.append((urllib.parse.unquote(name), urllib.parse.unquote(value)))
    return method, urllib.parse.unquote(path), params, headers, body.encode("utf-8")


def authorization_of(signed_request_text):
    for line in signed_request_text.split("\n"):
        if line.lower().startswith("authorization:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Authorization line")


class StepChecks(object):
    """Assertions shared by the vector tests: each spec step, then the Authorization value."""

    def check_steps(self, creq, expected_creq, amz_date, region, service, secret,
                    expected_sts, expected_signature):
        self.assertEqual(creq, expected_creq, "canonical request")
        scope = s3push.credential_scope(amz_date[:8], region, service)
        sts = s3push.string_to_sign(amz_date, scope, creq)
        self.assertEqual(sts, expected_sts, "string to sign")
        key = s3push.signing_key(secret, amz_date[:8], region, service)
        sig = s3push.signature(key, sts)
        self.assertEqual(sig, expected_signature, "signature")
        return scope, sig


class V4Vectors(unittest.TestCase, StepChecks):
    """v4/: the aws-c-auth suite, header signing and query (presign) signing."""

    def header_case(self, name):
        case = os.path.join(V4, name)
        context = json.loads(read(os.path.join(case, "context.json")))
        method, path, params, headers, body = parse_request(read(os.path.join(case,
                                                                             "request.txt")))
        now = datetime.datetime.strptime(context["timestamp"], "%Y-%m-%dT%H:%M:%SZ")
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        body_hash = s3push.payload_hash(body)
        headers = headers + [("X-Amz-Date", amz_date)]
        token = context["credentials"].get("token")
        if token and not context.get("omit_session_token"):
            headers.append(("X-Amz-Security-Token", token))
        if context.get("sign_body"):
            headers.append(("X-Amz-Content-Sha256", body_hash))
        text, signed = s3push.canonical_headers(headers)
        creq = s3push.canonical_request(method, s3push.canonical_uri(path),
                                        s3push.canonical_query_string(params), text, signed,
                                        body_hash)
        scope, sig = self.check_steps(
            creq, read(os.path.join(case, "header-canonical-request.txt")), amz_date,
            context["region"], context["service"], context["credentials"]["secret_access_key"],
            read(os.path.join(case, "header-string-to-sign.txt")),
            read(os.path.join(case, "header-signature.txt")))
        authorization = s3push.authorization_header(
            context["credentials"]["access_key_id"], scope, signed, sig)
        self.assertEqual(authorization,
                         authorization_of(read(os.path.join(case, "header-signed-request.txt"))))

    def query_case(self, name):
        """Presign: X-Amz-* in the query, the payload hash on the last line (as the files)."""
        case = os.path.join(V4, name)
        context = json.loads(read(os.path.join(case, "context.json")))
        method, path, params, headers, body = parse_request(read(os.path.join(case,
                                                                             "request.txt")))
        now = datetime.datetime.strptime(context["timestamp"], "%Y-%m-%dT%H:%M:%SZ")
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        creds = context["credentials"]
        text, signed = s3push.canonical_headers(headers)
        scope = s3push.credential_scope(amz_date[:8], context["region"], context["service"])
        params = params + [("X-Amz-Algorithm", s3push.ALGORITHM),
                           ("X-Amz-Credential", creds["access_key_id"] + "/" + scope),
                           ("X-Amz-Date", amz_date),
                           ("X-Amz-Expires", str(context["expiration_in_seconds"])),
                           ("X-Amz-SignedHeaders", signed)]
        if creds.get("token") and not context.get("omit_session_token"):
            params.append(("X-Amz-Security-Token", creds["token"]))
        creq = s3push.canonical_request(method, s3push.canonical_uri(path),
                                        s3push.canonical_query_string(params), text, signed,
                                        s3push.payload_hash(body))
        self.check_steps(creq, read(os.path.join(case, "query-canonical-request.txt")),
                         amz_date, context["region"], context["service"],
                         creds["secret_access_key"],
                         read(os.path.join(case, "query-string-to-sign.txt")),
                         read(os.path.join(case, "query-signature.txt")))


class LegacyVectors(unittest.TestCase, StepChecks):
    """legacy-aws-sig-v4-test-suite/: the original AWS zip layout (.req .creq .sts .authz)."""

    def legacy_case(self, relative):
        base = os.path.join(LEGACY, relative, os.path.basename(relative))
        method, path, params, headers, body = parse_request(read(base + ".req"))
        if relative.endswith("get-vanilla-with-session-token"):
            headers.append(("X-Amz-Security-Token", LEGACY_TOKEN))   # see the suite README
        amz_date = [v for n, v in headers if n.lower() == "x-amz-date"][0]
        text, signed = s3push.canonical_headers(headers)
        creq = s3push.canonical_request(method, s3push.canonical_uri(path),
                                        s3push.canonical_query_string(params), text, signed,
                                        s3push.payload_hash(body))
        scope, sig = self.check_steps(creq, read(base + ".creq"), amz_date, "us-east-1",
                                      "service", LEGACY_SECRET, read(base + ".sts"),
                                      read(base + ".authz").rsplit("Signature=", 1)[1])
        self.assertEqual(s3push.authorization_header("AKIDEXAMPLE", scope, signed, sig),
                         read(base + ".authz"))


class S3DocExamples(unittest.TestCase, StepChecks):
    """The worked examples of the S3 API Reference, through the steps and the composer."""

    def example(self, name):
        return [e for e in DOC_EXAMPLES["examples"] if e["name"] == name][0]

    def steps(self, example, body_hash):
        common = DOC_EXAMPLES["common"]
        chosen = example.get("signed_headers_used_by_the_example")   # sent but not signed
        headers = [(n, v) for n, v in example["headers"]
                   if chosen is None or n.lower() in chosen.split(";")]
        text, signed = s3push.canonical_headers(headers)
        uri = s3push.canonical_uri(example["path"])
        self.assertEqual(uri, example["canonical_uri"])
        creq = s3push.canonical_request(example["method"], uri,
                                        s3push.canonical_query_string(example["query"]),
                                        text, signed, body_hash)
        self.check_steps(creq, example["expected"]["canonical_request"], common["x_amz_date"],
                         common["region"], common["service"], common["secret_access_key"],
                         example["expected"]["string_to_sign"],
                         example["expected"]["signature"])
        key = s3push.signing_key(common["secret_access_key"], common["x_amz_date"][:8],
                                 common["region"], common["service"])
        self.assertEqual(key.hex(), common["signing_key_hex"])

    def composed(self, example):
        """sign_request adds host, x-amz-date and x-amz-content-sha256 by itself."""
        common = DOC_EXAMPLES["common"]
        own = {"host", "x-amz-date", "x-amz-content-sha256"}
        headers = {n.lower(): v for n, v in example["headers"] if n.lower() not in own}
        creds = s3push.Credentials(common["access_key_id"], common["secret_access_key"])
        now = datetime.datetime(2013, 5, 24, tzinfo=datetime.timezone.utc)
        keys = {}   # as a client keeps them: derived once, the same signature every time
        for kept in (None, keys, keys):
            signed = s3push.sign_request(example["method"], example["host"], example["path"],
                                         example["query"], headers,
                                         example["payload"]["sha256"], creds, common["region"],
                                         now, keys=kept)
            self.assertEqual(signed["authorization"].rsplit("Signature=", 1)[1],
                             example["expected"]["signature"])
            self.assertIn("x-amz-content-sha256", signed["authorization"])

    def steps_and_composed(self, name):
        example = self.example(name)
        self.steps(example, example["payload"]["sha256"])
        self.composed(example)

    def test_get_object(self):
        self.steps_and_composed("get-object")

    def test_put_object(self):
        self.steps_and_composed("put-object")

    def test_get_bucket_lifecycle(self):
        self.steps_and_composed("get-bucket-lifecycle")

    def test_get_bucket_list_objects(self):
        self.steps_and_composed("get-bucket-list-objects")

    def test_presigned_get_object(self):
        self.steps(self.example("presigned-get-object"), "UNSIGNED-PAYLOAD")

    def test_put_object_chunked_seed(self):
        """The seed signature only: s3push sends whole signed payloads, never aws-chunked."""
        self.steps(self.example("put-object-chunked"), "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")

    def test_put_object_chunked_with_trailer_seed(self):
        self.steps(self.example("put-object-chunked-with-trailer"),
                   "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER")


class SignerRules(unittest.TestCase):
    """S3 rules the vectors do not pin down."""

    def test_tilde_and_reserved_characters(self):
        self.assertEqual(s3push.uri_encode("a~b c+d%e/f"), "a~b%20c%2Bd%25e%2Ff")
        self.assertEqual(s3push.canonical_uri("/b/a~b/c d"), "/b/a~b/c%20d")

    def test_no_normalisation(self):
        self.assertEqual(s3push.canonical_uri("/b//./x/../y"), "/b//./x/../y")

    def test_composer_signs_token_and_payload_hash(self):
        creds = s3push.Credentials("AKID", "secret", "TOKEN")
        now = datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        signed = s3push.sign_request("PUT", "h", "/b/k", [], {"content-md5": "x"}, "abc",
                                     creds, "eu-west-1", now)
        self.assertEqual(signed["x-amz-security-token"], "TOKEN")
        self.assertEqual(signed["x-amz-date"], "20200102T030405Z")
        self.assertIn("SignedHeaders=content-md5;host;x-amz-content-sha256;x-amz-date;"
                      "x-amz-security-token,", signed["authorization"])
        self.assertIn("/20200102/eu-west-1/s3/aws4_request", signed["authorization"])

    def test_a_kept_signing_key_follows_the_day_the_region_and_the_secret(self):
        keys, day = {}, datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc)
        for creds, region, now in [(s3push.Credentials("AKID", "one"), "eu-west-1", day),
                                   (s3push.Credentials("AKID", "one"), "eu-west-1", day),
                                   (s3push.Credentials("AKID", "one"), "us-east-1", day),
                                   (s3push.Credentials("AKID", "two"), "us-east-1", day),
                                   (s3push.Credentials("AKID", "two"), "us-east-1",
                                    day + datetime.timedelta(days=1))]:
            args = ("PUT", "h", "/b/k", [], {}, "abc", creds, region, now)
            self.assertEqual(s3push.sign_request(*args, keys=keys),
                             s3push.sign_request(*args))
            self.assertEqual(len(keys), 1)

    def test_secret_with_symbols(self):
        key = s3push.signing_key("a%b+c/d=e", "20200101", "us-east-1", "s3")
        self.assertEqual(len(key), 32)
        self.assertNotEqual(key, s3push.signing_key("a%b+c/d=f", "20200101", "us-east-1",
                                                    "s3"))

    def test_empty_payload_hash(self):
        self.assertEqual(s3push.payload_hash(b""), s3push.EMPTY_SHA256)
        self.assertEqual(s3push.EMPTY_SHA256, hashlib.sha256().hexdigest())


def add_case(cls, name, verdict, method):
    """One test method per vector case; a case that does not apply to S3 is skipped."""
    def test(self):
        getattr(self, method)(name)
    if verdict.get("s3") != "applies":
        test = unittest.skip("not S3: " + verdict.get("reason", "see s3-applicability.json"))(
            test)
    label = name.replace("/", "_").replace("-", "_")
    setattr(cls, "test_%s_%s" % (method.split("_")[0], label), test)


for _name in sorted(os.listdir(V4)):
    add_case(V4Vectors, _name, APPLICABILITY["v4"][_name], "header_case")
    add_case(V4Vectors, _name, APPLICABILITY["v4"][_name], "query_case")
for _name, _verdict in sorted(APPLICABILITY["legacy-aws-sig-v4-test-suite"].items()):
    add_case(LegacyVectors, _name, _verdict, "legacy_case")

if __name__ == "__main__":
    unittest.main()

#!/usr/bin/env python3
"""s3push: move the files that land in a directory into an S3 bucket, verified.

Synopsis:
    python3 s3push.py [options] SOURCE_DIR s3://BUCKET[/PREFIX]

Every regular file under SOURCE_DIR that is older than --min-age goes up to
BUCKET at key PREFIX/relative/path in one signed PUT. The local copy is removed
only after the server confirmed those exact bytes (its ETag equals the MD5 the
script computed) and the file is still the one that was read (same device,
inode, size and mtime). Anything ambiguous keeps the file for the next run.
Only PUT is ever sent: credentials allowing nothing but s3:PutObject suffice.

Exit status (the cron contract; these numbers never change):
    0    every eligible file moved, nothing to do, or another run is active
    2    usage error: a bad option or argument
    65   some files were left in place because they failed; the others moved
    66   SOURCE_DIR is missing, not a directory, or unreadable
    70   internal error (a bug); files not confirmed were left in place
    75   temporary failure (server unreachable, timeout, 5xx, throttling)
    77   S3 refused the credentials or the permission
    78   configuration or credentials problem (missing, malformed, unknown profile)
    130  interrupted by SIGINT, 143 by SIGTERM; files not confirmed were left

Files and environment read (the AWS tools' precedence):
    credentials  AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN),
                 unless --profile is given; then the shared credentials file
                 (AWS_SHARED_CREDENTIALS_FILE, ~/.aws/credentials), then the config
                 file (AWS_CONFIG_FILE, ~/.aws/config, sections [profile NAME])
    profile      --profile, AWS_PROFILE, else "default"
    region       --region, AWS_REGION, AWS_DEFAULT_REGION, the profile's region,
                 else us-east-1
    endpoint     --endpoint-url, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the
                 profile's endpoint_url, else AWS's regional endpoint

Security:
    No option takes a secret. The secret key and the session token are never
    printed, logged or put into exception text; Credentials shows only its key id.
    TLS certificates are verified. Requests sent: PUT only.

Sections (grep '^# ==='): constants, errors, credentials and settings, SigV4
signer, transport, S3 operations, local side, command line.
"""

import argparse
import base64
import configparser
import datetime
import errno
import fcntl
import fnmatch
import hashlib
import hmac
import http.client
import itertools
import mimetypes
import os
import re
import signal
import socket
import ssl
import stat
import sys
import time
import urllib.parse
import xml.etree.ElementTree as ElementTree

if sys.version_info < (3, 6):
    sys.exit("s3push needs Python 3.6 or newer; this is %s" % sys.version.split()[0])

# === Constants ===

VERSION = "0.1.0"
USER_AGENT = "s3push/%s python/%d.%d" % ((VERSION,) + tuple(sys.version_info[:2]))
ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
DEFAULT_REGION = "us-east-1"
DEFAULT_MIN_AGE = 60
DEFAULT_EXCLUDES = (".*", "*.tmp", "*.part", "*.partial", "*.swp", "*~")
MAX_KEY_BYTES = 1024
MAX_PUT_BYTES = 5 * 1024 ** 3          # S3's limit for one PUT
IN_MEMORY_BYTES = 1024 ** 2            # smaller files are read once and sent from memory
BLOCK_BYTES = 256 * 1024
MAX_ERROR_BODY = 64 * 1024             # an error answer longer than this is cut
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FILES_LEFT = 65
EXIT_NO_INPUT = 66
EXIT_SOFTWARE = 70
EXIT_TEMPFAIL = 75
EXIT_NO_PERMISSION = 77
EXIT_CONFIG = 78
EXIT_SIGNAL_BASE = 128

# S3 error codes that mean "these credentials may not do this": stop the run.
ACCESS_CODES = frozenset([
    "AccessDenied", "AccountProblem", "AllAccessDisabled", "ExpiredToken",
    "InvalidAccessKeyId", "InvalidToken", "SignatureDoesNotMatch", "TokenRefreshRequired",
    "InvalidObjectState", "NotSignedUp",
])
# Codes that mean the settings are wrong, not the file: stop the run.
CONFIG_CODES = frozenset([
    "NoSuchBucket", "PermanentRedirect", "AuthorizationHeaderMalformed",
    "RequestTimeTooSkewed", "InvalidBucketName", "IllegalLocationConstraintException",
])
TEMPORARY_CODES = frozenset([
    "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
])

# === Errors ===


class S3PushError(Exception):
    """An expected failure; its text is one line for the operator, without secrets."""
    exit_code = EXIT_SOFTWARE
    fatal = True   # stop the whole run, not just this file


class UsageError(S3PushError):
    exit_code = EXIT_USAGE


class NoInputError(S3PushError):
    exit_code = EXIT_NO_INPUT


class ConfigError(S3PushError):
    exit_code = EXIT_CONFIG


class AccessError(S3PushError):
    exit_code = EXIT_NO_PERMISSION


class TemporaryError(S3PushError):
    exit_code = EXIT_TEMPFAIL
    fatal = False


class UnreachableError(TemporaryError):
    fatal = True


class FileError(S3PushError):
    exit_code = EXIT_FILES_LEFT
    fatal = False


class Interrupted(BaseException):
    """Raised by the SIGTERM handler; a BaseException so no per-file handler swallows it."""

    def __init__(self, signum):
        BaseException.__init__(self, signum)
        self.signum = signum


# === Credentials and settings ===


class Credentials(object):
    """An access key pair; its repr shows the key id and where it came from, never the secret."""
    __slots__ = ("access_key", "secret_key", "token", "source")

    def __init__(self, access_key, secret_key, token=None, source=""):
        self.access_key = access_key
        self.secret_key = secret_key
        self.token = token
        self.source = source

    def __repr__(self):
        return "Credentials(access_key=%r, source=%r)" % (self.access_key, self.source)


class Settings(object):
    """Everything resolved from options, environment and files, before any request."""

    def __init__(self, profile, region, endpoint_url, credentials):
        self.profile = profile
        self.region = region
        self.endpoint_url = endpoint_url
        self.credentials = credentials


def parse_ini(text, path):
    """Parse AWS-style INI text into {section: {key: value}}; errors name file and line only."""
    parser = configparser.RawConfigParser(strict=False, default_section="\x00none")
    try:
        parser.read_string(text.lstrip("\ufeff"), source=path)
    except configparser.Error as exc:
        # The exception text quotes the offending line, which may hold a secret.
        lineno = getattr(exc, "lineno", None) or (getattr(exc, "errors", None) or [(0,)])[0][0]
        raise ConfigError("%s line %s is not 'name = value' under a [section]: fix the file"
                          % (path, lineno))
    return {name: dict(parser.items(name)) for name in parser.sections()}


def profile_section(ini, profile, in_config_file):
    """The section of `profile`: [NAME] in the credentials file, [profile NAME] in config."""
    if in_config_file and profile != "default":
        return ini.get("profile " + profile)
    if in_config_file:
        return ini.get("default", ini.get("profile default"))
    return ini.get(profile)


def credentials_from_section(section, path, profile):
    """Credentials from one profile section, or a ConfigError naming the missing key."""
    for key in ("aws_access_key_id", "aws_secret_access_key"):
        if not section.get(key):
            raise ConfigError("%s profile '%s' has no %s: add it or use another profile"
                              % (path, profile, key))
    return Credentials(section["aws_access_key_id"], section["aws_secret_access_key"],
                       section.get("aws_session_token") or None, "%s [%s]" % (path, profile))


def environment_credentials(environ):
    """AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, None when neither is set."""
    key = environ.get("AWS_ACCESS_KEY_ID")
    secret = environ.get("AWS_SECRET_ACCESS_KEY")
    if not key and not secret:
        return None
    if not (key and secret):
        missing = "AWS_SECRET_ACCESS_KEY" if key else "AWS_ACCESS_KEY_ID"
        raise ConfigError("%s is not set but its partner is: set both or neither" % missing)
    return Credentials(key, secret, environ.get("AWS_SESSION_TOKEN") or None, "environment")


def resolve_credentials(environ, explicit_profile, profile, sources):
    """The AWS tools' order; an explicit --profile passes over the environment's keys.

    sources: [(section or None, path)] for the credentials file, then the config file.
    """
    found = None if explicit_profile else environment_credentials(environ)
    for section, path in sources:
        if found is None and section and set(section) & {"aws_access_key_id",
                                                         "aws_secret_access_key"}:
            found = credentials_from_section(section, path, profile)
    if found is None:
        raise ConfigError("no credentials for profile '%s': set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, or add them to %s"
                          % (profile, sources[0][1]))
    return found


def resolve_settings(options, environ, credentials_ini, config_ini, paths):
    """Pure: options (argparse namespace), environ and parsed files give the Settings.

    paths: (credentials file path, config file path), for messages.
    """
    explicit = bool(getattr(options, "profile", None))
    profile = options.profile or environ.get("AWS_PROFILE") or "default"
    cred_section = profile_section(credentials_ini, profile, False)
    conf_section = profile_section(config_ini, profile, True)
    if profile != "default" and cred_section is None and conf_section is None:
        raise ConfigError("profile '%s' not found in %s or %s: check --profile or AWS_PROFILE"
                          % (profile, paths[0], paths[1]))
    conf_section = conf_section or {}
    credentials = resolve_credentials(environ, explicit, profile,
                                      [(cred_section, paths[0]), (conf_section, paths[1])])
    region = (options.region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
              or conf_section.get("region") or DEFAULT_REGION)
    endpoint = (options.endpoint_url or environ.get("AWS_ENDPOINT_URL_S3")
                or environ.get("AWS_ENDPOINT_URL") or conf_section.get("endpoint_url") or None)
    return Settings(profile, region, endpoint, credentials)


def read_ini_file(path):
    """Parsed INI file, {} when the file does not exist; CRLF and a UTF-8 BOM are fine."""
    try:
        with open(path, encoding="utf-8-sig", newline=None) as handle:
            text = handle.read()
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise ConfigError("%s is not UTF-8 text: fix the file" % path)
    except OSError as exc:
        raise ConfigError("cannot read %s (%s): fix its permissions"
                          % (path, exc.strerror or exc))
    return parse_ini(text, path)


def load_settings(options, environ):
    """Read the credentials and config files named by the environment, then resolve."""
    home = os.path.expanduser("~")
    cred_path = environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(
        home, ".aws", "credentials")
    conf_path = environ.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config")
    cred_path, conf_path = os.path.expanduser(cred_path), os.path.expanduser(conf_path)
    return resolve_settings(options, environ, read_ini_file(cred_path),
                            read_ini_file(conf_path), (cred_path, conf_path))


# === SigV4 signer ===
# Pure functions, one per step of the AWS Signature Version 4 spec, with S3's rules:
# the path is URI-encoded once and never normalised; x-amz-content-sha256 is signed.


def uri_encode(text, safe=""):
    """Percent-encode all but A-Z a-z 0-9 - _ . ~ (and `safe`); '~' kept on every Python."""
    return urllib.parse.quote(text.encode("utf-8"), safe="-_.~" + safe)


def canonical_uri(path):
    """The path, URI-encoded once with '/' kept: S3 does not normalise '.', '..' or '//'."""
    return uri_encode(path, safe="/")


def canonical_query_string(params):
    """params: unencoded (name, value) pairs; encoded, then sorted by name and value."""
    pairs = sorted((uri_encode(name), uri_encode(value)) for name, value in params)
    return "&".join("%s=%s" % pair for pair in pairs)


def canonical_headers(headers):
    """headers: (name, value) pairs. Returns (canonical headers, signed headers).

    Names lower-cased and sorted; values trimmed, inner white space folded to one
    space; a repeated name's values joined by ',' in the order given.
    """
    merged = {}
    for name, value in headers:
        merged.setdefault(name.strip().lower(), []).append(" ".join(value.split()))
    names = sorted(merged)
    text = "".join("%s:%s\n" % (name, ",".join(merged[name])) for name in names)
    return text, ";".join(names)


def payload_hash(body):
    """Hex SHA-256 of a request body."""
    return hashlib.sha256(body).hexdigest()


def canonical_request(method, uri, query, headers_text, signed_headers, body_hash):
    """The six lines of the canonical request (headers_text already ends with a newline)."""
    return "\n".join([method, uri, query, headers_text, signed_headers, body_hash])


def credential_scope(date, region, service):
    """date is YYYYMMDD."""
    return "%s/%s/%s/aws4_request" % (date, region, service)


def string_to_sign(amz_date, scope, request_text):
    """Algorithm, request time, scope and the hash of the canonical request."""
    digest = hashlib.sha256(request_text.encode("utf-8")).hexdigest()
    return "\n".join([ALGORITHM, amz_date, scope, digest])


def signing_key(secret_key, date, region, service):
    """The HMAC chain kDate -> kRegion -> kService -> kSigning."""
    key = ("AWS4" + secret_key).encode("utf-8")
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def signature(key, text):
    """Hex HMAC-SHA256 of the string to sign."""
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def authorization_header(access_key, scope, signed_headers, signature_hex):
    return "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        ALGORITHM, access_key, scope, signed_headers, signature_hex)


def sign_request(method, host, path, query, headers, body_hash, credentials, region, now,
                 service="s3"):
    """Compose the steps: return the headers to send, Authorization included.

    path is unencoded; the caller sends canonical_uri(path) as the request target.
    now is an aware datetime: the signer never reads the clock itself.
    """
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    signed = dict(headers)
    signed.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": body_hash})
    if credentials.token:
        signed["x-amz-security-token"] = credentials.token
    headers_text, signed_names = canonical_headers(signed.items())
    request_text = canonical_request(method, canonical_uri(path), canonical_query_string(query),
                                     headers_text, signed_names, body_hash)
    scope = credential_scope(amz_date[:8], region, service)
    key = signing_key(credentials.secret_key, amz_date[:8], region, service)
    signed["authorization"] = authorization_header(
        credentials.access_key, scope, signed_names,
        signature(key, string_to_sign(amz_date, scope, request_text)))
    return signed


# === Transport ===


class Endpoint(object):
    """Where requests go: scheme, host, port, an optional base path, addressing style."""

    def __init__(self, scheme, host, port, base_path="", path_style=True):
        self.scheme = scheme
        self.host = host
        self.port = port
        self.base_path = base_path
        self.path_style = path_style

    def netloc(self, host):
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else "%s:%d" % (host, self.port)


def parse_endpoint_url(url):
    """An http(s) endpoint URL from the settings; path-style addressing is used with it."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 \
            or parts.query or parts.fragment or parts.username:
        raise ConfigError("endpoint URL %r is not http(s)://HOST[:PORT][/PATH]: fix "
                          "--endpoint-url, AWS_ENDPOINT_URL(_S3) or endpoint_url" % url)
    default = 443 if parts.scheme == "https" else 80
    return Endpoint(parts.scheme, parts.hostname, port or default, parts.path.rstrip("/"))


def aws_endpoint(region, bucket):
    """AWS's regional endpoint; virtual-hosted unless the bucket name has a dot."""
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return Endpoint("https", "s3.%s.%s" % (region, suffix), 443, "", "." in bucket)


def object_address(endpoint, bucket, key):
    """(Host header, unencoded path) of an object."""
    if endpoint.path_style:
        return endpoint.netloc(endpoint.host), "%s/%s/%s" % (endpoint.base_path, bucket, key)
    return endpoint.netloc(bucket + "." + endpoint.host), "%s/%s" % (endpoint.base_path, key)


def xml_child_text(root, name):
    """Text of the first child called `name`, whatever its namespace."""
    for child in root:
        if child.tag == name or child.tag.endswith("}" + name):
            return (child.text or "").strip()
    return ""


def parse_error_body(body):
    """(code, message) from an S3 XML error; ("", "") when the body is not such XML."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        return "", ""   # no document type or entity is ever expanded
    try:
        root = ElementTree.fromstring(body)
    except (ElementTree.ParseError, ValueError):
        return "", ""
    return xml_child_text(root, "Code"), xml_child_text(root, "Message")


class Response(object):
    """The status, headers and (at most MAX_ERROR_BODY bytes of) body of one answer."""

    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name):
        return self.headers.get(name.lower(), "")


def error_from_response(response, what):
    """The S3PushError for a non-2xx answer, named by its S3 code and request id."""
    code, message = parse_error_body(response.body)
    code = code or "HTTP%d" % response.status
    request_id = response.header("x-amz-request-id") or response.header("x-amz-id-2")
    text = "%s: %s (HTTP %d%s)" % (code, one_line(message or response.reason),
                                   response.status,
                                   ", request id " + request_id if request_id else "")
    if code == "RequestTimeTooSkewed":
        return ConfigError("%s: %s: set this host's clock right (NTP)" % (what, text))
    if code in ACCESS_CODES or response.status in (401, 403):
        return AccessError("%s: %s: check the credentials and that they allow s3:PutObject"
                           % (what, text))
    if code in CONFIG_CODES or response.status in (301, 307, 404):
        return ConfigError("%s: %s: check the bucket, region and endpoint" % (what, text))
    if code in TEMPORARY_CODES or response.status >= 500 or response.status == 429:
        return TemporaryError("%s: %s: try again later" % (what, text))
    return FileError("%s: %s" % (what, text))


def one_line(text, limit=300):
    """Server text folded to one short line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class Connection(object):
    """One persistent HTTP/1.1 connection to one host, reopened when it was closed."""

    def __init__(self, scheme, host, port, context=None):
        self.scheme = scheme
        self.host = host
        self.port = port
        self.context = context
        self.conn = None
        self.requests = 0   # answered on the current connection

    def close(self):
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def open(self):
        if self.scheme == "https":
            context = self.context or ssl.create_default_context()
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=CONNECT_TIMEOUT,
                                               context=context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            raise UnreachableError("cannot connect to %s:%d (%s): is the endpoint right and "
                                   "the server up?" % (self.host, self.port,
                                                       describe_os_error(exc)))
        conn.sock.settimeout(READ_TIMEOUT)
        self.conn, self.requests = conn, 0

    def exchange(self, method, target, headers, body):
        """Send one request and read the answer; body is bytes or a (file, length) pair."""
        if self.conn is None:
            self.open()
        conn = self.conn
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if isinstance(body, bytes):
            conn.endheaders(body)
        else:
            conn.endheaders()
            send_file_body(conn, body[0], body[1])
        answer = conn.getresponse()
        data = answer.read(MAX_ERROR_BODY if answer.status >= 300 else None)
        if answer.will_close or not answer.isclosed():
            self.close()
        else:
            self.requests += 1
        return Response(answer.status, answer.reason,
                        {k.lower(): v for k, v in answer.getheaders()}, data)


def send_file_body(conn, handle, length):
    """Stream `length` bytes of an open file from its start, in blocks."""
    handle.seek(0)
    left = length
    while left > 0:
        block = handle.read(min(BLOCK_BYTES, left))
        if not block:
            raise FileError("the file shrank while it was being sent")
        conn.send(block)
        left -= len(block)


def describe_os_error(exc):
    """A short reason for a network error, e.g. 'Connection refused' or 'timed out'."""
    if isinstance(exc, socket.timeout):
        return "timed out"
    return getattr(exc, "strerror", None) or exc.__class__.__name__


class S3Client(object):
    """Signs and sends requests for one bucket, reusing one connection."""

    def __init__(self, settings, bucket, clock=None):
        self.settings = settings
        self.bucket = bucket
        if settings.endpoint_url:
            self.endpoint = parse_endpoint_url(settings.endpoint_url)
        else:
            self.endpoint = aws_endpoint(settings.region, bucket)
        host = self.endpoint.host if self.endpoint.path_style else bucket + "." + \
            self.endpoint.host
        self.connection = Connection(self.endpoint.scheme, host, self.endpoint.port)
        self.clock = clock or utc_now

    def close(self):
        self.connection.close()

    def request(self, method, key, headers, body, body_hash, query=()):
        """One signed request for an object; a stale kept-alive connection is retried once."""
        host, path = object_address(self.endpoint, self.bucket, key)
        target = canonical_uri(path)
        if query:
            target += "?" + canonical_query_string(query)
        for attempt in (1, 2):
            signed = sign_request(method, host, path, query, headers, body_hash,
                                  self.settings.credentials, self.settings.region, self.clock())
            signed["user-agent"] = USER_AGENT
            reused = self.connection.requests > 0
            try:
                return self.connection.exchange(method, target, signed, body)
            except S3PushError:
                self.connection.close()
                raise
            except (OSError, http.client.HTTPException) as exc:
                self.connection.close()
                if not (reused and attempt == 1):
                    raise TemporaryError("the connection failed during the request (%s); "
                                         "the file is kept" % describe_os_error(exc))
        raise TemporaryError("the connection failed twice")   # not reached


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


# === S3 operations ===


class Digest(object):
    """What the first read of a file found: its bytes (small files), hashes and size."""

    def __init__(self, size, sha256_hex, md5_raw, body):
        self.size = size
        self.sha256_hex = sha256_hex
        self.md5_raw = md5_raw      # None where the interpreter forbids MD5 (FIPS)
        self.body = body            # the bytes for a small file, else None

    @property
    def md5_hex(self):
        return self.md5_raw.hex() if self.md5_raw is not None else None


def new_md5():
    """An MD5 hash for Content-MD5 and ETag checks, or None where FIPS forbids MD5."""
    try:
        return hashlib.new("md5", usedforsecurity=False)
    except TypeError:   # Python before 3.9 has no usedforsecurity
        pass
    except ValueError:
        return None
    try:
        return hashlib.md5()
    except ValueError:
        return None


def digest_file(handle, size):
    """Read `size` bytes once, computing SHA-256 and MD5 together."""
    sha, md5 = hashlib.sha256(), new_md5()
    keep = size <= IN_MEMORY_BYTES
    chunks, left = [], size
    while left > 0:
        block = handle.read(min(BLOCK_BYTES, left))
        if not block:
            raise FileError("the file shrank while it was being read; kept for the next run")
        sha.update(block)
        if md5 is not None:
            md5.update(block)
        if keep:
            chunks.append(block)
        left -= len(block)
    return Digest(size, sha.hexdigest(), md5.digest() if md5 is not None else None,
                  b"".join(chunks) if keep else None)


def put_headers(digest, content_type):
    headers = {"content-type": content_type, "content-length": str(digest.size)}
    if digest.md5_raw is not None:
        headers["content-md5"] = base64.b64encode(digest.md5_raw).decode("ascii")
    return headers


def etag_confirms(etag, digest):
    """True when the answer's ETag is the MD5 of the bytes sent (or no MD5 to compare).

    An ETag that is not a plain MD5 (SSE-KMS, some servers) cannot confirm; the
    server-checked Content-MD5 and signed SHA-256 are then what vouch for the bytes.
    """
    etag = etag.strip().strip('"').lower()
    if not etag:
        return False
    if digest.md5_hex is None or not re.match(r"^[0-9a-f]{32}$", etag):
        return True
    return hmac.compare_digest(etag, digest.md5_hex)


def put_object(client, key, handle, digest, content_type):
    """PUT one object; raise unless the server confirmed exactly these bytes."""
    if digest.size > MAX_PUT_BYTES:
        raise FileError("larger than 5 GiB, S3's limit for one PUT")
    body = digest.body if digest.body is not None else (handle, digest.size)
    response = client.request("PUT", key, put_headers(digest, content_type), body,
                              digest.sha256_hex)
    what = "s3://%s/%s" % (client.bucket, key)
    if not 200 <= response.status < 300:
        raise error_from_response(response, what)
    etag = response.header("etag")
    if not etag_confirms(etag, digest):
        raise FileError("%s: the server's ETag %s is not the MD5 of the file (%s): "
                        "the bytes were damaged on the way; kept" % (what, etag or "(none)",
                                                                      digest.md5_hex))


# === Local side ===


class Destination(object):
    """A parsed s3://BUCKET[/PREFIX]; prefix is '' or ends with '/'."""

    def __init__(self, bucket, prefix):
        self.bucket = bucket
        self.prefix = prefix


BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")


def parse_destination(url):
    """s3://BUCKET[/PREFIX] to a Destination, or a UsageError saying what is wrong."""
    if not url.lower().startswith("s3://"):
        raise UsageError("destination %r is not an s3://BUCKET[/PREFIX] URL" % url)
    bucket, _, prefix = url[5:].partition("/")
    if not BUCKET_NAME.match(bucket) or ".." in bucket:
        raise UsageError("bucket name %r in %r is not valid: 3-63 lower-case letters, digits, "
                         "dots and hyphens" % (bucket, url))
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return Destination(bucket, prefix)


def object_key(prefix, relative):
    """The key for a file: PREFIX + its path relative to SOURCE_DIR, '/' separated.

    Raises FileError for a name that is not UTF-8 or a key longer than S3 allows.
    """
    try:
        # From the bytes on disk: under a C locale Python 3.6 decodes names as ASCII.
        key = prefix + os.fsencode(relative).decode("utf-8")
    except UnicodeDecodeError:
        raise FileError("the name is not valid UTF-8 (%s): rename it; it was left in place"
                        % safe_name(relative))
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise FileError("the key would be %d bytes, over S3's limit of %d: shorten the path; "
                        "it was left in place" % (size, MAX_KEY_BYTES))
    return key


def safe_name(name):
    """A file name fit for a terminal: undecodable bytes and control characters escaped."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def is_excluded(name, relative, patterns):
    """True when the base name or the relative path matches any glob."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(relative, p)
               for p in patterns)


def scan(source_dir, patterns, errors):
    """Yield (path, relative path, lstat) of each regular file, streaming, no symlinks.

    Excluded names are skipped, and so are the directories they name. FIFOs,
    sockets and devices are never opened. Unreadable directories go to `errors`.
    """
    stack = [(source_dir, "")]
    while stack:
        directory, relative_dir = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError as exc:
            errors.append((directory, "cannot read the directory (%s)" % exc.strerror))
            continue
        with entries:
            for entry in entries:
                relative = relative_dir + entry.name
                if is_excluded(entry.name, relative, patterns):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, relative + "/"))
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path, relative, entry.stat(follow_symlinks=False)


def select_files(files, min_age, now, skipped):
    """Pass on files last modified at least min_age seconds before now; count the rest."""
    for path, relative, info in files:
        if now - info.st_mtime < min_age:
            skipped.append(path)
            continue
        yield path, relative, info


def lock_directory(source_dir):
    """An exclusive flock on SOURCE_DIR itself; the kernel drops it when the process dies.

    Returns the descriptor to keep open, or None when another run holds the lock.
    """
    fd = os.open(source_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def same_file(before, after):
    """True when two stat results are one unchanged file: device, inode, size and mtime."""
    return (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns) == \
        (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns)


def open_regular_file(path):
    """Open a file for reading without following a symlink or blocking on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise FileError("no longer a regular file; left in place")
    return os.fdopen(fd, "rb", buffering=0), info


def delete_if_unchanged(path, before):
    """Unlink the file only if it is still the one that was read; else keep it."""
    try:
        after = os.lstat(path)
    except FileNotFoundError:
        return
    if not same_file(before, after):
        raise FileError("changed while it was uploading; kept for the next run")
    os.unlink(path)


def guess_content_type(name):
    return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"


def move_file(client, path, relative, destination):
    """Upload one file, verify, then delete it. Returns its size."""
    key = object_key(destination.prefix, relative)
    try:
        handle, info = open_regular_file(path)
    except FileNotFoundError:
        raise FileError("vanished before it could be read; nothing to do")
    except OSError as exc:
        raise FileError("cannot read (%s); left in place" % exc.strerror)
    with handle:
        digest = digest_file(handle, info.st_size)
        put_object(client, key, handle, digest, guess_content_type(relative))
    delete_if_unchanged(path, info)
    return info.st_size


def remove_empty_dirs(source_dir, paths):
    """rmdir the directories of moved files and their parents, never SOURCE_DIR itself."""
    top = os.path.abspath(source_dir)
    candidates = {os.path.dirname(os.path.abspath(p)) for p in paths}
    for directory in sorted(candidates, key=len, reverse=True):
        while directory.startswith(top + os.sep):
            try:
                os.rmdir(directory)
            except OSError:
                break
            directory = os.path.dirname(directory)


# === Command line ===


def build_parser():
    parser = argparse.ArgumentParser(
        prog="s3push.py",
        usage="%(prog)s [options] SOURCE_DIR s3://BUCKET[/PREFIX]",
        description="Move the files under SOURCE_DIR into S3, verified: each file is "
                    "deleted only after the server confirmed its exact bytes.",
        epilog="exit status: 0 all moved, nothing to do or another run active; 2 usage; "
               "65 some files failed and were left; 66 SOURCE_DIR unusable; 70 internal "
               "error; 75 temporary failure, try again; 77 S3 refused the credentials or "
               "permission; 78 configuration or credentials problem; 130/143 interrupted.")
    parser.add_argument("source", metavar="SOURCE_DIR", help="directory whose files to move")
    parser.add_argument("destination", metavar="s3://BUCKET[/PREFIX]",
                        help="where the files go; keys are PREFIX/relative/path")
    parser.add_argument("--min-age", type=non_negative_int, default=DEFAULT_MIN_AGE,
                        metavar="SECONDS", help="leave files modified more recently than this "
                        "for a later run (default %(default)s)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="skip names or relative paths matching GLOB (repeatable); always "
                        "skipped: " + " ".join(DEFAULT_EXCLUDES))
    parser.add_argument("--delete-empty-dirs", action="store_true",
                        help="remove subdirectories the run emptied (never SOURCE_DIR)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would move where, change nothing")
    parser.add_argument("--profile", help="profile in ~/.aws/credentials and ~/.aws/config")
    parser.add_argument("--region", help="signing region (default: from the environment or "
                        "profile, else us-east-1)")
    parser.add_argument("--endpoint-url", metavar="URL",
                        help="S3-compatible server, e.g. http://127.0.0.1:9000")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print one line per moved file and a summary")
    parser.add_argument("--version", action="version", version="s3push " + VERSION)
    return parser


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("%r is not a whole number of seconds >= 0" % text)
    return value


def emit(stream, line):
    """Write one line; what the stream's encoding cannot show is escaped, not fatal."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    stream.write(line.encode(encoding, "backslashreplace").decode(encoding) + "\n")
    stream.flush()


class Run(object):
    """The tally of one run: what moved, what failed, what was left for later."""

    def __init__(self):
        self.moved = []
        self.bytes = 0
        self.failures = []     # exit codes of the failed files
        self.too_young = []
        self.fatal = None      # the error that stopped the run early
        self.started = time.monotonic()

    def exit_code(self):
        if self.fatal is not None:
            return self.fatal.exit_code
        if EXIT_FILES_LEFT in self.failures:
            return EXIT_FILES_LEFT
        return max(self.failures) if self.failures else EXIT_OK

    def summary(self):
        seconds = max(time.monotonic() - self.started, 1e-6)
        return ("s3push: moved %d files, %d bytes in %.2f s (%.2f MB/s); %d failed, "
                "%d left for later (younger than --min-age)"
                % (len(self.moved), self.bytes, seconds, self.bytes / seconds / 1e6,
                   len(self.failures), len(self.too_young)))


def report_failure(run, path, key_url, exc):
    """One line on stderr naming the file, the key (when there is one) and the reason."""
    run.failures.append(exc.exit_code)
    target = " -> " + key_url if key_url else ""
    emit(sys.stderr, "s3push: error: %s%s: %s" % (safe_name(path), target, exc))


def move_all(client, files, destination, options, run):
    """Move each selected file; a fatal error (credentials, server down) stops the run."""
    for path, relative, _ in files:
        url = "s3://%s/%s%s" % (destination.bucket, destination.prefix, safe_name(relative))
        try:
            size = move_file(client, path, relative, destination)
        except S3PushError as exc:
            report_failure(run, path, url, exc)
            if exc.fatal:
                run.fatal = exc
                return
            continue
        run.moved.append(path)
        run.bytes += size
        if options.verbose:
            emit(sys.stdout, "moved %s -> %s (%d bytes)" % (safe_name(path), url, size))


def dry_run(files, destination, run):
    """Print where each file would go; names that cannot be keys are reported."""
    for path, relative, info in files:
        try:
            key = object_key(destination.prefix, relative)
        except FileError as exc:
            report_failure(run, path, None, exc)
            continue
        emit(sys.stdout, "would move %s -> s3://%s/%s (%d bytes)"
             % (safe_name(path), destination.bucket, safe_name(key), info.st_size))


def first_and_rest(iterator):
    """(first item, iterator over all items) or (None, None) when it is empty."""
    first = next(iterator, None)
    if first is None:
        return None, None
    return first, itertools.chain([first], iterator)


def check_source(source):
    if not os.path.isdir(source):
        what = "does not exist" if not os.path.exists(source) else "is not a directory"
        raise NoInputError("SOURCE_DIR %s %s: check the path" % (safe_name(source), what))
    if not os.access(source, os.R_OK | os.X_OK):
        raise NoInputError("SOURCE_DIR %s is not readable by this user: fix its permissions"
                           % safe_name(source))


def run_transfer(options, environ):
    """The whole run after argument parsing; returns the exit status."""
    destination = parse_destination(options.destination)
    check_source(options.source)
    lock = None if options.dry_run else lock_directory(options.source)
    if lock is None and not options.dry_run:
        emit(sys.stderr, "s3push: another run is moving %s; this one exits"
             % safe_name(options.source))
        return EXIT_OK
    run, errors = Run(), []
    patterns = DEFAULT_EXCLUDES + tuple(options.exclude)
    files = select_files(scan(options.source, patterns, errors), options.min_age,
                         time.time(), run.too_young)
    first, files = first_and_rest(files)
    settings = load_settings(options, environ) if first is not None else None
    if options.dry_run:
        dry_run(files or [], destination, run)
    elif first is not None:
        client = S3Client(settings, destination.bucket)
        try:
            move_all(client, files, destination, options, run)
        finally:
            client.close()
        if options.delete_empty_dirs:
            remove_empty_dirs(options.source, run.moved)
    for path, message in errors:
        report_failure(run, path, None, FileError(message))
    if options.verbose:
        emit(sys.stdout, run.summary())
    return run.exit_code()


def on_sigterm(signum, frame):
    raise Interrupted(signum)


def main(argv=None):
    options = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return run_transfer(options, os.environ)
    except KeyboardInterrupt:
        emit(sys.stderr, "s3push: interrupted; files not yet confirmed were left in place")
        return EXIT_SIGNAL_BASE + signal.SIGINT
    except Interrupted as exc:
        emit(sys.stderr, "s3push: terminated; files not yet confirmed were left in place")
        return EXIT_SIGNAL_BASE + exc.signum
    except S3PushError as exc:
        emit(sys.stderr, "s3push: error: %s" % exc)
        return exc.exit_code
    except Exception as exc:   # a bug: say where, keep every file
        where = exc.__traceback__
        while where.tb_next is not None:
            where = where.tb_next
        emit(sys.stderr, "s3push: internal error: %s at line %d: %s; no file was lost"
             % (exc.__class__.__name__, where.tb_lineno, one_line(exc)))
        return EXIT_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""s3push: move the files that land in a directory into an S3 bucket, verified.

Synopsis:
    python3 s3push.py [options] SOURCE_DIR s3://BUCKET[/PREFIX]

Every regular file under SOURCE_DIR that is older than --min-age goes up to
BUCKET at key PREFIX/relative/path in one signed PUT. The local copy is removed
only after the server confirmed those exact bytes (its ETag equals the MD5 the
script computed, or it verified and echoed the CRC32 or SHA-256: --checksum),
the file is still the one that was read (same device,
inode, size and mtime), and no process has it open for writing. Anything
ambiguous keeps the file for the next run. With --archive-dir DIR the file is
moved into DIR (same filesystem, at its relative path, never over a name) instead.
Only PUT is ever sent: credentials allowing nothing but s3:PutObject suffice.

Exit status (the cron contract; these numbers never change):
    0    every eligible file moved, nothing to do, or another run is active
    2    usage error: a bad option or argument
    65   some files were left in place because they failed (or this account could
         not remove them: they are not uploaded); the others moved
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
    bucket owner --expected-bucket-owner, S3PUSH_EXPECTED_BUCKET_OWNER, the
                 profile's s3push_expected_bucket_owner, else none
    writers      /proc/sys/fs/protected_hardlinks; /proc/*/fd and /proc/*/fdinfo
                 where no file lease can be taken (see One file on disk)
    state        written and read: --state-dir, $XDG_STATE_HOME/s3push, else
                 ~/.local/state/s3push (this account's alone): the run lock, the
                 journals that let a multipart upload cut off part-way resume, and
                 the ledger of uploads the server confirmed, which lets the next run
                 remove a file whose run was killed before its removal
    network      HTTPS_PROXY, HTTP_PROXY, NO_PROXY and --ca-bundle (AWS_CA_BUNDLE,
                 ca_bundle) for every request: S3, STS and the metadata services

Security:
    No option takes a secret. The secret key and the session token are never
    printed, logged or put into exception text; Credentials shows only its key id.
    TLS certificates are verified. Requests sent: PUT only. Nothing outside
    SOURCE_DIR is read or removed whatever a writer does to the tree meanwhile:
    every file is reached from SOURCE_DIR's descriptor one name at a time, never
    through a symlink, and checked against what the scan saw (see The tree).

Sections (grep '^# ==='), lowest layer first; each uses only what stands above it:
constants and output; errors; the SigV4 signer; HTTP and XML transport; Session and
S3Client; credentials and settings; the object on the server (checksums, PUT,
multipart); keys; the tree (the walk, the lock, the state folder); the order (oldest
first); state kept between runs (resume journals, the ledger of confirmed uploads); the
manifest; the run's settings and its report; one file on disk (its checks, its writers,
its gzip); sending one file (the job, the queue, the parts); the move of one file
(move_file: one file from its open to its unlink, in numbered steps); the run (the lock,
the moves, summary and metrics); the command line (main last).
"""

import argparse
import collections
import errno
import fcntl
import fnmatch
import functools
import heapq
import io
import itertools
import marshal
import os
import re
import signal
import stat
import sys
import threading
import time

if sys.version_info < (3, 6):
    sys.exit("s3push needs Python 3.6 or newer; this is %s" % sys.version.split()[0])

# Imported by load_deferred_modules() where the scan first finds a file, so that a cron
# tick with nothing to send never pays for them (they are half the start-up time).
DEFERRED_MODULES = ("base64", "calendar", "configparser", "datetime", "email.utils", "hashlib",
                    "hmac", "json", "mimetypes", "random", "select", "shlex", "socket", "ssl",
                    "struct", "subprocess", "urllib.parse", "xml.etree.ElementTree", "zlib")


def load_deferred_modules():
    """Import DEFERRED_MODULES, each bound to its top-level name as `import` binds it."""
    for name in DEFERRED_MODULES:
        globals()[name.partition(".")[0]] = __import__(name)


# === Constants and output ===


VERSION = "0.1.0"
USER_AGENT = "s3push/%s python/%d.%d" % ((VERSION,) + tuple(sys.version_info[:2]))
ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
DEFAULT_REGION = "us-east-1"
DEFAULT_MIN_AGE = 60
DURATION_UNITS = (86400, 3600, 60, 1)   # d, h, m, s
DEFAULT_EXCLUDES = (".*", "*.tmp", "*.part", "*.partial", "*.swp", "*~")
MIB = 1024 ** 2
MAX_KEY_BYTES = 1024
MAX_PUT_BYTES = 5 * 1024 ** 3          # S3's limit for one PUT
MAX_OBJECT_BYTES = 5 * 1024 ** 4       # and for one object
MIN_PART_BYTES = 5 * MIB               # S3's minimum part size (but for the last part)
MAX_PARTS = 10000
DEFAULT_JOBS = 8
DEFAULT_MULTIPART_THRESHOLD = 32 * MIB   # measured: see README, Benchmark
DEFAULT_PART_SIZE = 32 * MIB
# Reads go 64 KiB at a time, and bodies up to that are kept: under glibc's mmap threshold
# (128 KiB), so each worker's allocator arena reuses the same few blocks. At 256 KiB the
# threshold rose past them and every worker kept about 1 MiB (measured: 8 workers on
# 4 MiB files, peak RSS 36.6 -> 32.2 MiB; the 1 GiB file's CPU +1-2 %).
IN_MEMORY_BYTES = 64 * 1024            # smaller bodies are read once and sent from memory
BLOCK_BYTES = 64 * 1024
MAX_ERROR_BODY = 64 * 1024             # an error answer longer than this is cut
MAX_ANSWER_BODY = 1024 * 1024          # a success answer is XML of a few hundred bytes
CONNECT_TIMEOUT = 10                   # seconds, at most (never more than --timeout)
METADATA_TIMEOUT = 1                   # seconds for the EC2 metadata service, as botocore
REFRESH_MARGIN = 300                   # refresh temporary credentials this long before expiry
DEFAULT_TIMEOUT = 60                   # seconds without progress before a request fails
DEFAULT_RETRIES = 5
DEFAULT_LOCK_WARN_AFTER = 3600         # seconds another run may hold the lock unremarked
BACKOFF_BASE = 0.2                     # seconds; full jitter below base * 2**retry
BACKOFF_CAP = 20.0
RETRY_AFTER_CAP = 60.0
SKEW_TOLERANCE = 300                   # seconds; S3 itself refuses beyond 900
MAX_CORRECTIONS = 3                    # clock, region, credentials: at most once each
MAX_SUMMARY_ERRORS = 20
ISO_SECONDS = "%Y-%m-%dT%H:%M:%SZ"   # UTC, as S3 writes times and as s3push reports them
MAX_SUMMARY_VERSIONS = 1000   # --summary-json lists this many; --manifest has them all
PROGRESS_INTERVAL = 0.5
RATE_BURST = 0.1                       # seconds of --bwlimit not used that may be caught up


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
    "InvalidBucketName", "IllegalLocationConstraintException",
])
TEMPORARY_CODES = frozenset([
    "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    # The body was damaged or cut on the way: sending it again is the cure.
    "BadDigest", "XAmzContentSHA256Mismatch", "IncompleteBody",
])


def redact(text, credentials):
    """text without the secret key, the session token or any signature: the one way by
    which request details reach the output (--debug) or an error message."""
    for secret in (credentials.secret_key, credentials.token) if credentials else ():
        if secret:
            text = text.replace(secret, "<redacted>")
    return re.sub(r"(Signature=)[0-9a-fA-F]+", r"\1<redacted>", text)


def one_line(text, limit=300):
    """Server text folded to one short line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def name_bytes(name):
    """The bytes of a name: a file name as on disk (under a C locale Python 3.6 decodes names
    as ASCII, the rest as surrogates), or a key as UTF-8; os.fsencode fails on the latter."""
    return name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name


def safe_name(name):
    """A file name or key fit for a terminal: undecodable bytes and control characters
    escaped."""
    text = name_bytes(name).decode("utf-8", "backslashreplace")
    if text.isprintable():   # nearly every name: one check, not one per character
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def emit(stream, line, flush=True):
    """Write a line (or lines); what the stream's encoding cannot show is escaped, not
    fatal."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    stream.write(line.encode(encoding, "backslashreplace").decode(encoding) + "\n")
    if flush:
        stream.flush()


LOG_TIME = "%Y-%m-%dT%H:%M:%S+00:00"   # --log-file: UTC, as the summary and the manifest


def open_log(path):
    """(a descriptor to append to the --log-file at path, None), the file made 0600; or
    (None, why not). Never through a symlink (one planted there would have the run append
    to the file it names), never blocked by a FIFO (opened non-blocking, then refused as
    all but a regular file is), never another account's file or one with other names (a
    hard link, or a folder above swapped for a symlink, would lead there)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW |
                     os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            return None, "a symlink: not followed; name the file itself"
        if exc.errno == errno.ENXIO:   # a FIFO that no process reads
            return None, "not a regular file"
        return None, exc.strerror or str(exc)
    info = os.fstat(fd)
    why = "not a regular file" if not stat.S_ISREG(info.st_mode) else \
        "another account's file (uid %d)" % info.st_uid if info.st_uid != os.geteuid() else \
        "%d hard links to it" % info.st_nlink if info.st_nlink != 1 else None
    if why is not None:   # a writer of its folder may have linked it there, or swapped
        os.close(fd)      # a folder above it: appended to, it is not the log's
        return None, why
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd, None


class Notices(object):
    """The one road of every line the run prints (line()), and of its warnings and notes
    to stderr, each topic said once a run; and of the copy of each line in --log-file.

    A warning is always shown: what the operator should fix or know now (a clock or a
    region corrected, credentials others may read, a lock or a summary that could not be
    kept, a file that vanished). A note only under -v: a lasting state of the host that
    the README documents (no resume journals, writers that cannot be seen), which cron
    would otherwise mail every tick."""

    def __init__(self, verbose=False):
        self.lock = threading.RLock()
        self.verbose = verbose
        self.said = set()
        self.before = None   # called before a line is written: clears a live status line
        self.log = None   # the --log-file's descriptor, while it can be written
        self.log_path = None

    def warning(self, message, once=None):
        """once: a topic said at most once a run (None: each time, e.g. a file's)."""
        self.say("s3push: warning: " + message, once, True)

    def note(self, message):
        self.say("s3push: " + message, message, self.verbose)

    def say(self, line, once, shown):
        with self.lock:
            if not shown or once is not None and once in self.said:
                return
            if once is not None:
                self.said.add(once)
            self.line(sys.stderr, line)

    def line(self, stream, text, flush=True):
        """Write text (a line, or lines) to stream and to the log: every line the run
        prints comes here, made free of secrets before (see redact)."""
        with self.lock:
            if self.before is not None:
                self.before()
            self.logged(text)
            emit(stream, text, flush)

    def open_log(self, path):
        """--log-file: append every line from now on to path (see open_log); one warning
        when it cannot be opened, and the run goes on."""
        self.log, problem = open_log(path)
        self.log_path = path
        if problem:
            self.warning("cannot write the --log-file %s (%s): its lines are only printed"
                         % (safe_name(path), problem))

    def logged(self, text):
        """text into the log, each line after the time, in one write(): the lines of runs
        that share the log never mix. One warning when it cannot be written, and no more
        lines to it."""
        if self.log is None:
            return
        stamp = time.strftime(LOG_TIME, time.gmtime())
        data = "".join("%s %s\n" % (stamp, line) for line in text.split("\n"))
        data = data.encode("utf-8", "backslashreplace")
        try:
            if os.write(self.log, data) == len(data):
                return
            problem = "written short: a full filesystem, or a file size limit"
        except OSError as exc:
            problem = exc.strerror or str(exc)
        os.close(self.log)
        self.log = None
        self.warning("cannot write the --log-file %s (%s): its lines are only printed"
                     % (safe_name(self.log_path), problem))


def fsync_folder(path):
    """Make the names just made or renamed in the folder path last through a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:   # a filesystem that cannot sync a folder: as good
            raise
    finally:
        os.close(fd)


def write_atomically(path, data, mode):
    """Write path anew: data (bytes) into path.PID.tmp, fsync'ed, renamed over path (and
    the folder fsync'ed, so that the new name lasts through a power cut), so a reader sees
    the old file or the new one, never half, and a crash leaves the old. mode: of a new
    file (the umask applies). Raises OSError; no temporary file is left."""
    temporary = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                 os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    try:
        fsync_folder(os.path.dirname(path) or ".")
    except OSError:
        pass   # the file is whole either way; only its name may not last a power cut


TORN_WRITE = re.compile(r"\.[0-9]+\.tmp\Z")   # what a kill in write_atomically leaves
TORN_WRITE_AGE = 3600   # seconds; a write under way takes far less, on NFS too


def remove_torn_writes(folder, now):
    """Remove the PATH.PID.tmp files that write_atomically left in folder when a run was
    killed mid-write, once older than TORN_WRITE_AGE: one of another host whose state
    folder is this one (a home over NFS) may be under way. Only for a folder that no other
    run of this host writes meanwhile (one that this run's lock keeps)."""
    try:
        names = [name for name in os.listdir(folder) if TORN_WRITE.search(name)]
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name)
        try:
            if now - os.lstat(path).st_mtime > TORN_WRITE_AGE:
                os.unlink(path)
        except OSError:
            pass


# The interpreter runs the Python of one thread at a time, and a thread hands that lock on
# at nearly every system call (a dozen for each small file). Threads spread over several
# CPUs hand it across them, each time waking another CPU to cold caches: on two CPUs that
# made a small file cost half as much CPU again, and the waits as much wall time. So a
# run's threads are kept on one CPU (one of those allowed, at random: runs of several
# sources spread, in containers too). A thread hashing and sending a body of
# WIDE_BODY_BYTES or more, gzipping a file or hashing it again for the ledger runs on all
# of them meanwhile: hashing, TLS and zlib let go of the lock, and those run side by
# side. Where the CPUs cannot be chosen (macOS, the BSDs, a container that refuses)
# nothing changes. A program the run starts (credential_process) shares the thread's.
WIDE_BODY_BYTES = 1 << 20


class WideCpus(object):
    """The context of CpuPlacement.wide: the calling thread on every allowed CPU, then
    back on the one."""

    def __init__(self, placement):
        self.placement = placement

    def __enter__(self):
        self.set(self.placement.allowed)

    def __exit__(self, *exc):
        self.set(self.placement.one)

    @staticmethod
    def set(cpus):
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:   # a CPU taken offline meanwhile: where it runs is no matter
            pass


class NoPlacement(object):
    """The context of CpuPlacement.wide where nothing changes."""

    def __enter__(self):
        pass

    def __exit__(self, *exc):
        pass


NO_PLACEMENT = NoPlacement()


class CpuPlacement(object):
    """The CPUs of the run's threads: narrow() keeps the calling thread, and the threads
    it starts from then on, on one; wide(size) lets a thread run on all while it works on
    size bytes. Each thread's own: a thread widened never widens another."""

    def __init__(self):
        self.allowed = self.one = None   # sets of CPU numbers, once narrowed

    def narrow(self):
        try:
            allowed = sorted(os.sched_getaffinity(0))
            if len(allowed) > 1:
                one = {random.choice(allowed)}
                os.sched_setaffinity(0, one)
                self.allowed, self.one = set(allowed), one
        except (AttributeError, OSError):   # no such call here, or refused: as it was
            pass

    def wide(self, size):
        """A context in which the calling thread runs on every allowed CPU, if size
        bytes are worth it."""
        return WideCpus(self) if self.one is not None and size >= WIDE_BODY_BYTES \
            else NO_PLACEMENT


# The run's: narrowed by move_all; widened by put_range, gzip_file and Ledger.vouching.
CPUS = CpuPlacement()

# === Errors ===


class S3PushError(Exception):
    """An expected failure; its text is one line for the operator, without secrets."""
    exit_code = EXIT_SOFTWARE
    fatal = True   # stop the whole run, not just this file
    status = None   # the HTTP status of the answer it reports, if it reports one


class UsageError(S3PushError):
    exit_code = EXIT_USAGE
    usage = ""   # the synopsis said before the error line, where argparse refused


class NoInputError(S3PushError):
    exit_code = EXIT_NO_INPUT


class ConfigError(S3PushError):
    exit_code = EXIT_CONFIG


class AccessError(S3PushError):
    exit_code = EXIT_NO_PERMISSION


class TemporaryError(S3PushError):
    exit_code = EXIT_TEMPFAIL
    fatal = False


class UnreachableError(S3PushError):
    """No connection to the host, or no answer from it (see SilenceWatch): `reason` says
    why, e.g. 'Connection refused'. Temporary as its exit status says, but no
    TemporaryError: a host that takes no connection, or answers none, stops the run at
    once, it is not retried and waited for."""
    exit_code = EXIT_TEMPFAIL

    def __init__(self, message, reason=""):
        S3PushError.__init__(self, message)
        self.reason = reason or message


class FileError(S3PushError):
    exit_code = EXIT_FILES_LEFT
    fatal = False


class ManifestError(FileError):
    """A --manifest line that cannot be written: its file is kept, and the run stops, as
    every later file would be uploaded and kept the same way (a full disk)."""
    fatal = True


class UnremovableError(FileError):
    """Files of one directory this account could not remove once uploaded: left alone,
    not uploaded (else each run would send them again); `files` counts them."""

    def __init__(self, message, files):
        FileError.__init__(self, message)
        self.files = files


class KeyTakenError(FileError):
    """If-None-Match: * met an object already at the key (HTTP 412)."""


class UploadGoneError(FileError):
    """NoSuchUpload: the server dropped the multipart upload (some do after a failed part)."""


class PartFailedError(TemporaryError):
    """A part the server failed itself (HTTP 500) every time it was sent: its upload may
    be broken there for good (rclone's server fails every later part of an upload whose
    stream broke), so it is started afresh (see multipart_upload)."""


class ChangedError(FileError):
    """The file changed while it was read for its upload: what reached the server is not
    one whole state of it (or may not be), so it is kept for the next run; never retried
    as if the network had damaged the bytes."""

    def __init__(self, message="changed while it was uploading; kept for the next run"):
        FileError.__init__(self, message)


# Outcomes that are not failures: the move of one file stops there (an exception unwinds
# it, so nothing after the check runs), but the run's exit status is not touched.
class LeftAlone(Exception):
    """A file left in place this run, not a failure; its text is one line."""


class Vanished(LeftAlone):
    """The file went (renamed or deleted by another process) before it was read: nothing
    was lost and nothing failed, but the operator is told (a warning)."""


class TreeChanged(Vanished):
    """A directory or file under SOURCE_DIR was moved, replaced or swapped for a symlink
    during the run: what is behind it is left alone this run, like a vanished file."""


class StillWritten(LeftAlone):
    """A process still has the file open for writing, or it changed since the scan: it is
    left for a later run, like a file younger than --min-age (said under -v only)."""


class Interrupted(BaseException):
    """Raised by the SIGTERM handler; a BaseException so no per-file handler swallows it."""

    def __init__(self, signum):
        BaseException.__init__(self, signum)
        self.signum = signum


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
                 service="s3", trace=None, keys=None):
    """Compose the steps: return the headers to send, Authorization included.

    path is unencoded; the caller sends canonical_uri(path) as the request target.
    now is an aware datetime: the signer never reads the clock itself. trace, if given,
    is called with the canonical request and the string to sign (for --debug). keys, if
    given, is a dict that keeps the last signing key derived (it changes with the day,
    the region and the secret), so that a client derives it once, not for each request.
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
    text = string_to_sign(amz_date, scope, request_text)
    if trace is not None:
        trace(request_text, text)
    derived_for = (credentials.secret_key, scope)
    key = keys.get(derived_for) if keys is not None else None
    if key is None:
        key = signing_key(credentials.secret_key, amz_date[:8], region, service)
        if keys is not None:
            keys.clear()
            keys[derived_for] = key
    signed["authorization"] = authorization_header(credentials.access_key, scope, signed_names,
                                                   signature(key, text))
    return signed


# === HTTP and XML transport ===


DEFAULT_PORTS = {"http": 80, "https": 443}


def url_port(parts):
    """The port of a urlsplit() result, else its scheme's default; None when what stands
    there is no port number."""
    try:
        return parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None


def proxy_settings(environ):
    """HTTPS_PROXY, HTTP_PROXY and NO_PROXY (lower case first, as curl reads them)."""
    def get(name):
        return environ.get(name.lower()) or environ.get(name) or ""
    return {"https": get("HTTPS_PROXY"), "http": get("HTTP_PROXY"),
            "no": [e.strip().lower() for e in get("NO_PROXY").split(",") if e.strip()]}


def bypasses_proxy(host, port, no_proxy):
    """NO_PROXY: '*', a host name or domain suffix ('example.com', '.example.com'), an IP,
    each optionally with ':port'."""
    host = host.lower().strip("[]")
    for entry in no_proxy:
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry == "*" or (entry_port and entry_port != str(port)):
            if entry == "*":
                return True
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


# A proxy from HTTP(S)_PROXY: authorization is the Proxy-Authorization value, or None.
Proxy = collections.namedtuple("Proxy", "host port authorization")


# How every request of a run reaches its host: the proxies (proxy_settings) and the CA
# bundle to trust over TLS (None: the system's CAs).
Network = collections.namedtuple("Network", "proxies ca_bundle")


def proxy_for(proxies, scheme, host, port):
    """The Proxy to use, or None."""
    url = proxies.get(scheme) or ""
    if not url or bypasses_proxy(host, port, proxies.get("no", [])):
        return None
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    proxy_port = url_port(parts)
    if parts.scheme != "http" or not parts.hostname or proxy_port is None:
        raise ConfigError("the %s proxy %s://%s is not http://HOST:PORT: fix %s_PROXY"
                          % (scheme, parts.scheme, parts.hostname or "", scheme.upper()))
    auth = None
    if parts.username is not None:
        pair = "%s:%s" % (urllib.parse.unquote(parts.username),
                          urllib.parse.unquote(parts.password or ""))
        auth = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    return Proxy(parts.hostname, proxy_port, auth)


class Endpoint(object):
    """Where requests go: scheme, host, port, an optional base path, addressing style."""

    def __init__(self, scheme, host, port, base_path="", path_style=True):
        self.scheme = scheme
        self.host = host
        self.port = port
        self.base_path = base_path
        self.path_style = path_style

    def netloc(self, host):
        return host if self.port == DEFAULT_PORTS[self.scheme] else "%s:%d" % (host, self.port)


def parse_endpoint_url(url):
    """An http(s) endpoint URL from the settings; path-style addressing is used with it."""
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:   # never echoed: what stands before the @ may be a password
        raise ConfigError("the endpoint URL holds a user name or a password (USER:PASSWORD@ "
                          "before its host), which s3push never sends: fix --endpoint-url, "
                          "AWS_ENDPOINT_URL(_S3) or endpoint_url to http(s)://HOST[:PORT]")
    port = url_port(parts)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or port is None \
            or parts.query or parts.fragment:
        raise ConfigError("endpoint URL %r is not http(s)://HOST[:PORT][/PATH]: fix "
                          "--endpoint-url, AWS_ENDPOINT_URL(_S3) or endpoint_url" % url)
    return Endpoint(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def aws_endpoint(region, bucket):
    """AWS's regional endpoint; virtual-hosted unless the bucket name has a dot."""
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return Endpoint("https", "s3.%s.%s" % (region, suffix), DEFAULT_PORTS["https"], "",
                    "." in bucket)


def object_address(endpoint, bucket, key):
    """(Host header, unencoded path) of an object."""
    if endpoint.path_style:
        return endpoint.netloc(endpoint.host), "%s/%s/%s" % (endpoint.base_path, bucket, key)
    return endpoint.netloc(bucket + "." + endpoint.host), "%s/%s" % (endpoint.base_path, key)


# AWS S3 writes a control character of a key as a character reference (&#x8;), some
# servers as the raw byte: XML 1.0 forbids both and expat refuses them. Each is read as a
# character of Unicode's private plane 15 (U+F0000 + code), which xml_text turns back.
CONTROL_CHARACTER = re.compile(rb"&#(x0*[0-9a-fA-F]{1,2}|0*[0-9]{1,2});"
                               rb"|[\x00-\x08\x0b\x0c\x0e-\x1f]")
PLANE_15 = 0xF0000
FROM_PLANE_15 = {PLANE_15 + code: code for code in range(32)}


def control_character(match):
    text = match.group(1)
    if text is None:
        code = ord(match.group(0))
    else:
        code = int(text[1:], 16) if text[:1] == b"x" else int(text)
    if code >= 32 or code in (9, 10, 13):   # XML's own: left to the parser
        return match.group(0)
    return chr(PLANE_15 + code).encode("utf-8")


def parse_xml(body):
    """The root element of an XML answer, or None; no DTD or entity is ever expanded."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        return None
    body = CONTROL_CHARACTER.sub(control_character, body)
    try:
        return xml.etree.ElementTree.fromstring(body.strip())
    except (xml.etree.ElementTree.ParseError, ValueError):
        return None


def local_name(tag):
    """An element's name without its namespace."""
    return tag.rsplit("}", 1)[-1]


def xml_element(root, name):
    """The first element called name, whatever its namespace, or None."""
    for element in root.iter() if root is not None else ():
        if local_name(element.tag) == name:
            return element
    return None


def xml_text(root, name):
    """Text of the first element called name, whatever its namespace ('' if none)."""
    element = xml_element(root, name)
    return (element.text or "").strip().translate(FROM_PLANE_15) if element is not None else ""


class Response(object):
    """The status, headers and (at most MAX_ERROR_BODY bytes of) body of one answer."""

    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.expected_owner = None   # the x-amz-expected-bucket-owner the request carried
        self.parsed = None   # (its XML root or None, (code, message)), once asked for

    def header(self, name):
        return self.headers.get(name.lower(), "")

    def parse(self):
        if self.parsed is None:
            root = parse_xml(self.body) if self.body.strip() else None
            error = ("", "")
            if root is not None and local_name(root.tag) == "Error":
                error = (xml_text(root, "Code"), xml_text(root, "Message"))
            self.parsed = (root, error)
        return self.parsed

    @property
    def xml(self):
        """The body's XML root (None if it is none), parsed once for all who read it."""
        return self.parse()[0]

    @property
    def error(self):
        """(code, message) of an S3 <Error> answer; ("", "") for anything else."""
        return self.parse()[1]


def error_from_response(response, what=""):
    """The S3PushError for a non-2xx answer, named by its S3 code and request id.

    what: the request, when the key alone does not say it (e.g. 'part 3').
    """
    code, message = response.error
    code = code or "HTTP%d" % response.status
    request_id = response.header("x-amz-request-id") or response.header("x-amz-id-2")
    text = "%s%s: %s (HTTP %d%s)" % (what + ": " if what else "", code,
                                     one_line(message or response.reason), response.status,
                                     ", request id " + request_id if request_id else "")
    if code == "RequestTimeTooSkewed":
        return ConfigError("%s: set this host's clock right (NTP)" % text)
    if response.expected_owner and response.status == 403 and code == "AccessDenied":
        return AccessError("%s: the bucket is not owned by account %s (the expected "
                           "bucket owner) or these credentials may not s3:PutObject there: "
                           "check both; nothing was stored" % (text, response.expected_owner))
    if code in ACCESS_CODES or response.status in (401, 403):
        return AccessError("%s: check the credentials and that they allow s3:PutObject" % text)
    if response.status == 407:
        return ConfigError("the proxy refused the request (HTTP 407): fix the user and "
                           "password in HTTP_PROXY or HTTPS_PROXY")
    if response.status == 412 or code == "PreconditionFailed":
        return KeyTakenError("%s: an object already exists at this key and --if-exists is "
                             "keep: kept (a conflict to resolve by hand, or --if-exists "
                             "number)" % text)
    if response.status == 501 or code == "NotImplemented":   # not now, not later
        return FileError("%s: this server does not do that" % text)
    if code == "NoSuchUpload":   # completed by an attempt whose answer was lost, or expired
        return UploadGoneError("%s: the multipart upload is gone; the file is sent again "
                               "next run" % text)
    if code in CONFIG_CODES or response.status in (301, 307, 404):
        return ConfigError("%s: check the bucket, region and endpoint" % text)
    if code in TEMPORARY_CODES or response.status >= 500 or response.status == 429:
        return TemporaryError("%s: try again later" % text)
    return FileError(text)


def content_stamp(info):
    """What changes with a file's contents, whatever a writer does to its mtime: size,
    mtime and ctime (the kernel sets ctime on every change, utimes() included)."""
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns


class FileRange(object):
    """length bytes of an open file from offset: a request body read with pread, never held.
    `state`: the content_stamp the body's checksum was computed in; a file no longer in it is
    not sent (ChangedError), so a changed file is never retried as a damaged body."""

    def __init__(self, fd, offset, length, state=None):
        self.fd = fd
        self.offset = offset
        self.length = length
        self.state = state

    def blocks(self):
        if self.state is not None and content_stamp(os.fstat(self.fd)) != self.state:
            raise ChangedError()
        position, end = self.offset, self.offset + self.length
        while position < end:
            block = os.pread(self.fd, min(BLOCK_BYTES, end - position), position)
            if not block:
                raise FileError("the file shrank while it was being sent; kept for the next run")
            position += len(block)
            yield block


def tls_context(ca_bundle):
    """Certificates always verified; against ca_bundle instead of the system's CAs if given."""
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("cannot use the CA bundle %s (%s): fix --ca-bundle, AWS_CA_BUNDLE "
                          "or ca_bundle" % (ca_bundle, one_line(exc)))


def is_certificate_error(exc):
    return isinstance(exc, ssl.CertificateError) or (
        isinstance(exc, ssl.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc))


def describe_os_error(exc):
    """A short reason for a network error, e.g. 'Connection refused' or 'timed out'."""
    if isinstance(exc, socket.timeout):
        return "timed out"
    return getattr(exc, "strerror", None) or one_line(exc) or exc.__class__.__name__


class RateLimit(object):
    """--bwlimit: a pace shared by every connection of a run, so that the bodies they send
    together stay at `rate` bytes per second. Each slice of a body is given the moment it
    may start (after the slices before it, at the rate); time nobody sent in is not saved
    up beyond RATE_BURST seconds."""

    def __init__(self, rate):
        self.rate = float(rate)
        self.slice = int(min(max(rate // 16, 4096), 65536))   # short gaps at low rates too
        self.lock = threading.Lock()
        self.clock = 0.0   # time.monotonic() when what was handed out so far is sent

    def take(self, size):
        """Wait until size more bytes may go."""
        with self.lock:
            now = time.monotonic()
            start = max(self.clock, now - RATE_BURST)
            self.clock = start + size / self.rate
        if start > now:
            time.sleep(start - now)

    def send(self, sock, data):
        view = memoryview(data)
        for offset in range(0, len(view), self.slice):
            piece = view[offset:offset + self.slice]
            self.take(len(piece))
            sock.sendall(piece)


# The limits of an answer's head, as http.client's: a line's bytes, and its header lines.
MAX_HEAD_LINE = 65536
MAX_HEADERS = 100
MAX_INTERIM_ANSWERS = 10
# Seconds an answer may take to arrive whole once its request went out (at least three
# --timeout): each read waits at most --timeout, but a server that trickles a byte now and
# then would hold the run forever. AWS trickles spaces into the answer of a large
# CompleteMultipartUpload for minutes: this leaves it many.
ANSWER_TIME = 15 * 60
UNSAFE_IN_TARGET = re.compile("[\x00-\x20\x7f]")
UNSAFE_IN_NAMES = re.compile("[:\\s\x00]")
UNSAFE_IN_VALUES = re.compile("[\r\n\x00]")
STATUS_LINE = re.compile(r"(HTTP/1\.[0-9]) ([0-9]{3})(?: (.*))?\Z")


class AnswerError(OSError):
    """An answer cut short or that is not HTTP/1.x: a connection that broke, retried as
    the operating system's errors of a connection are."""


# One answer read off a connection; reusable: whether the next request may follow it there.
Answer = collections.namedtuple("Answer", "response reusable")


def request_head(method, target, headers):
    """The request line and header lines of one request, as bytes (latin-1, as http.client
    sends them)."""
    # CR, LF or NUL would let a value smuggle in a header or a request of its own. The
    # error names the header, never its value (a signature or a token).
    if UNSAFE_IN_TARGET.search(method + target) or UNSAFE_IN_NAMES.search("".join(headers)) \
            or UNSAFE_IN_VALUES.search("".join(headers.values())):
        culprits = [name for name, value in headers.items() if UNSAFE_IN_NAMES.search(name)
                    or UNSAFE_IN_VALUES.search(value)] or ["its target"]
        raise ValueError("refused to send a request with CR, LF or NUL in %s"
                         % ", ".join(culprits))
    lines = ["%s %s HTTP/1.1" % (method, target)]
    lines.extend("%s: %s" % item for item in headers.items())
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def read_head_line(reader):
    """One line of an answer's head as sent (b'' at the end of the stream)."""
    line = reader.readline(MAX_HEAD_LINE + 1)
    if len(line) > MAX_HEAD_LINE:   # no server sends one: this is not HTTP
        raise AnswerError("a line of the answer's head is over %d bytes" % MAX_HEAD_LINE)
    return line


def read_status_line(reader):
    """(version, status, reason) of an answer's first line."""
    line = read_head_line(reader)
    if not line:   # e.g. a kept-alive connection that the server had closed
        raise AnswerError("the server closed the connection without an answer")
    match = STATUS_LINE.match(line.decode("latin-1").rstrip("\r\n"))
    if match is None:
        raise AnswerError("the answer is not HTTP/1.x: %s" % one_line(repr(line), 80))
    return match.group(1), int(match.group(2)), (match.group(3) or "").strip()


def header_fields(lines):
    """{lower-case name: value} of header lines (text, without their line ends); a repeated
    field's values joined with ', ' (RFC 9110 5.3)."""
    headers, name = {}, None
    for line in lines:
        if line[:1] in (" ", "\t") and name is not None:   # obs-fold: the value goes on
            headers[name] += " " + line.strip()
            continue
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        headers[name] = headers[name] + ", " + value if name in headers else value
    return headers


def read_header_lines(reader):
    """The header fields up to the blank line (header_fields). A head the reader holds
    whole already (an answer comes in one piece) is taken in one read; else it is read
    line by line. Either way within http.client's limits."""
    held = reader.peek(MAX_HEAD_LINE)   # what is buffered (one read if nothing is)
    end = 0 if held.startswith(b"\r\n") else held.find(b"\r\n\r\n") + 2   # 1: not all
    if end != 1 and end <= MAX_HEAD_LINE and \
            held.count(b"\n", 0, end) == held.count(b"\r\n", 0, end):   # no bare LF
        lines = reader.read(end + 2)[:end].decode("latin-1").split("\r\n")[:-1]
        if len(lines) > MAX_HEADERS:
            raise AnswerError("the answer has more than %d header lines" % MAX_HEADERS)
        return header_fields(lines)
    lines = []
    for _ in range(MAX_HEADERS + 1):
        line = read_head_line(reader)
        if line in (b"\r\n", b"\n"):
            return header_fields(lines)
        if not line:
            raise AnswerError("the answer was cut short in its head")
        lines.append(line.decode("latin-1").rstrip("\r\n"))
    raise AnswerError("the answer has more than %d header lines" % MAX_HEADERS)


def read_exactly(reader, size, before=0):
    """size bytes of a body; before: the bytes of it read already (for the error)."""
    data = reader.read(size)
    if len(data) < size:   # the stream ended before the body did
        raise AnswerError("the answer was cut short after %d bytes" % (before + len(data)))
    return data


def read_chunked(reader, limit):
    """(at most limit bytes of a chunked body, whether it was read to its end):
    RFC 9112 7.1, each chunk its size in hex, its bytes and a line end; then a trailer."""
    parts, size = [], 0
    while True:
        try:
            chunk = int(read_head_line(reader).split(b";", 1)[0], 16)
        except ValueError:
            chunk = -1
        if chunk < 0:
            raise AnswerError("the answer was cut short after %d bytes (a broken chunk)" % size)
        if chunk == 0:
            read_header_lines(reader)   # the trailer, never needed
            return b"".join(parts), True
        if size + chunk > limit:   # more than we keep: the rest is left, and the connection
            return b"".join(parts), False
        parts.append(read_exactly(reader, chunk, size))
        size += chunk
        if read_head_line(reader) not in (b"\r\n", b"\n"):
            raise AnswerError("the answer was cut short after %d bytes (a broken chunk)" % size)


def read_body(reader, method, status, headers, limit):
    """(at most limit bytes of an answer's body, whether the stream is at its end)."""
    if method == "HEAD" or status < 200 or status in (204, 304):   # these have none
        return b"", True
    if headers.get("transfer-encoding", "").lower().endswith("chunked"):
        return read_chunked(reader, limit)
    try:
        length = int(headers.get("content-length", ""))
    except ValueError:
        length = -1
    if length < 0:   # no length said: the body runs until the server closes
        return reader.read(limit), False
    return read_exactly(reader, min(length, limit)), length <= limit


def keeps_alive(version, headers):
    """Whether the server keeps the connection for another request (RFC 9112 9.3)."""
    tokens = headers.get("connection", "").lower()
    return "close" not in tokens and (version != "HTTP/1.0" or "keep-alive" in tokens)


def read_answer(reader, method):
    """The Answer to one request: an error's body is kept to MAX_ERROR_BODY bytes."""
    version, status, reason = read_status_line(reader)
    headers = read_header_lines(reader)
    for _ in range(MAX_INTERIM_ANSWERS + 1):
        if status >= 200:
            break
        # 100 Continue and other interim answers: the final one follows
        version, status, reason = read_status_line(reader)
        headers = read_header_lines(reader)
    else:   # a server that sends them without end would hold the run forever
        raise AnswerError("more than %d interim (1xx) answers to one request"
                          % MAX_INTERIM_ANSWERS)
    limit = MAX_ERROR_BODY if status >= 300 else MAX_ANSWER_BODY
    body, whole = read_body(reader, method, status, headers, limit)
    reusable = whole and keeps_alive(version, headers)
    return Answer(Response(status, reason, headers, body), reusable)


class AnswerStream(io.RawIOBase):
    """What the buffered reader of a Connection reads from: its socket, each read waiting
    at most the connection's timeout, and none past the answer's deadline (answer_by)."""

    def __init__(self, sock, connection):
        io.RawIOBase.__init__(self)
        self.sock, self.connection = sock, connection

    def readable(self):
        return True

    def readinto(self, buffer):
        timeout = self.connection.timeout
        left = self.connection.answer_by - time.monotonic()
        if left >= timeout:
            return self.sock.recv_into(buffer)
        if left <= 0:
            raise socket.timeout("the answer did not arrive whole within %d s"
                                 % max(ANSWER_TIME, 3 * timeout))
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(timeout)


class Connection(object):
    """One persistent HTTP/1.1 connection to one host, reopened when it was closed."""

    def __init__(self, scheme, host, port, timeout=DEFAULT_TIMEOUT, tls=None, proxy=None,
                 rate_limit=None):
        self.scheme = scheme
        self.host = host
        self.port = port
        self.timeout = timeout
        self.tls = tls          # an ssl.SSLContext for https
        self.proxy = proxy      # a Proxy, or None
        self.rate_limit = rate_limit   # a RateLimit, or None
        self.sock = None
        self.reader = None   # the one buffered reader of sock: what it holds is the next answer's
        self.answer_by = float("inf")   # time.monotonic(): the answer read must be whole by then

    def close(self):
        if self.sock is not None:
            self.reader.close()
            self.sock.close()
        self.sock = self.reader = None

    def open(self):
        via = self.proxy or self
        try:
            sock = socket.create_connection((via.host, via.port),
                                            timeout=min(CONNECT_TIMEOUT, self.timeout))
        except OSError as exc:
            raise self.connect_error(exc)
        try:
            # Head and body may go out in separate writes: without this, Nagle's algorithm
            # and delayed ACKs stall each streamed request by up to 40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                sock = self.secure(sock)
        except (OSError, ssl.CertificateError) as exc:
            sock.close()
            raise self.connect_error(exc)
        sock.settimeout(self.timeout)
        self.sock, self.reader = sock, io.BufferedReader(AnswerStream(sock, self))

    def secure(self, sock):
        """TLS with the endpoint itself, through a CONNECT tunnel when there is a proxy."""
        if self.proxy:
            address = "[%s]:%d" % (self.host, self.port) if ":" in self.host else \
                "%s:%d" % (self.host, self.port)
            headers = {"Host": address}
            if self.proxy.authorization:
                headers["Proxy-Authorization"] = self.proxy.authorization
            sock.sendall(request_head("CONNECT", address, headers))
            with sock.makefile("rb") as reader:   # the proxy says nothing more before TLS
                _, status, reason = read_status_line(reader)
                read_header_lines(reader)
            if status != 200:
                raise AnswerError("the proxy refused the tunnel: HTTP %d %s" % (status, reason))
        return (self.tls or tls_context(None)).wrap_socket(sock, server_hostname=self.host)

    def connect_error(self, exc):
        """The ConfigError or UnreachableError for a connection that could not be made."""
        if is_certificate_error(exc):
            return ConfigError("the TLS certificate of %s:%d is not trusted (%s): if the "
                               "server uses a private CA, name it with --ca-bundle, "
                               "AWS_CA_BUNDLE or ca_bundle in the profile"
                               % (self.host, self.port, one_line(exc)))
        reason = describe_os_error(exc) + self.via()
        return UnreachableError("cannot connect to %s:%d (%s): is the endpoint right and "
                                "the server up?" % (self.host, self.port, reason), reason)

    def via(self):
        """', through the proxy HOST:PORT' (never its password), or ''."""
        return ", through the proxy %s:%d" % (self.proxy.host, self.proxy.port) \
            if self.proxy else ""

    def exchange(self, method, target, headers, body):
        """Send one request and read the answer; body is bytes or a FileRange."""
        if self.proxy and self.scheme == "http":   # a forward proxy takes absolute URLs
            target = "http://%s:%d%s" % (self.host, self.port, target)
            if self.proxy.authorization:
                headers = dict(headers, **{"proxy-authorization": self.proxy.authorization})
        head = request_head(method, target, headers)
        if self.sock is not None and self.ended():
            self.close()
        if self.sock is None:
            self.open()
        try:
            self.send(head, body)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the server may have answered early (an error) and closed: read it
        self.answer_by = time.monotonic() + max(ANSWER_TIME, 3 * self.timeout)
        answer = read_answer(self.reader, method)
        if not answer.reusable:   # closed by the server, or a body left unread in it
            self.close()
        return answer.response

    def ended(self):
        """Whether the server ended this idle connection (its keep-alive timed out: a FIN,
        or a 408 said unasked). A request sent on it would be lost to a reset and cost a
        retry; under --retries 0, its file stays for the next run."""
        try:
            if hasattr(self.sock, "pending") and self.sock.pending():
                return True   # TLS bytes already in: a close_notify, or unasked words
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(self.sock, select.POLLIN)
                return bool(poller.poll(0))
            return bool(select.select([self.sock], [], [], 0)[0])   # some macOS builds
        except (OSError, ValueError):   # select: a descriptor above FD_SETSIZE
            return False

    def send(self, head, body):
        if isinstance(body, bytes) and self.rate_limit is None:
            # One write for the head and a small body: half the syscalls of a small PUT,
            # and the server gets it in one piece.
            self.sock.sendall(head + body)
            return
        self.sock.sendall(head)
        for block in [body] if isinstance(body, bytes) else body.blocks():
            if self.rate_limit is None:
                self.sock.sendall(block)
            else:
                self.rate_limit.send(self.sock, block)


def http_call(network, method, url, headers=None, body=b"", timeout=METADATA_TIMEOUT):
    """(status, body) of one small request to a credential service (STS, the metadata
    services): through a Connection like every S3 request, so with the same proxy rules
    and TLS trust. No answer: UnreachableError, its reason e.g. 'timed out'."""
    parts = urllib.parse.urlsplit(url)
    port = url_port(parts)
    if port is None:
        raise UnreachableError("no answer from %s (not http(s)://HOST[:PORT])" % url,
                               "not http(s)://HOST[:PORT]")
    tls = tls_context(network.ca_bundle) if parts.scheme == "https" else None
    connection = Connection(parts.scheme, parts.hostname, port, timeout, tls,
                            proxy_for(network.proxies, parts.scheme, parts.hostname, port))
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    headers["host"] = parts.netloc
    if body or method != "GET":
        headers["content-length"] = str(len(body))
    try:
        answer = connection.exchange(method, (parts.path or "/") + (
            "?" + parts.query if parts.query else ""), headers, body)
    except (OSError, ValueError) as exc:
        reason = describe_os_error(exc) + connection.via()
        raise UnreachableError("no answer from %s (%s)" % (parts.netloc, reason), reason)
    finally:
        connection.close()
    return answer.status, answer.body


# === Session and S3Client ===


# What one request is signed with: the credentials, region and endpoint of the moment, and
# the seconds to add to this host's clock.
Signing = collections.namedtuple("Signing", "credentials region endpoint offset")


class Deadline(object):
    """--deadline: the moment (time.monotonic()) after which no upload and no retry starts;
    None for none."""

    def __init__(self, at=None):
        self.at = at

    def allows_wait(self, seconds):
        return self.at is None or time.monotonic() + seconds < self.at

    def passed(self):
        return self.at is not None and time.monotonic() >= self.at


class SilenceWatch(object):
    """The one place that decides that the endpoint stopped answering, shared by the
    run's S3Clients. It has when requests go unanswered one after another for twice
    --timeout with no answer to any request in between. Unanswered: timed out, or
    answered 502 or 504 by a gateway (a proxy, a load balancer: no x-amz-request-id) that
    heard nothing from the endpoint behind it. Counted from when the first of them last
    heard from it (--timeout before it timed out, the gateway's answer itself; not before
    the last answer) to the last. A gateway's answers make it silent only while requests
    for two keys or more, not given up, go unanswered: a file that a gateway always
    refuses (it breaks the server behind) is that file's failure, not the endpoint's, and
    leaves the count once given up. Any other answer, or a failure that is no timeout (a
    reset), ends the count. A slow request is retried as usual; with nothing else
    answered, once.

    Once silent, every request of the run fails with one UnreachableError (exit 75,
    fatal): those in flight at once (their connections shut), the others before they
    start or retry. So the run stops within three --timeout of the endpoint going silent
    (most often two: its requests time out together), keeping every file not confirmed."""

    GATEWAY_STATUSES = (502, 504)   # Bad Gateway, Gateway Timeout: no answer from behind

    def __init__(self, timeout):
        self.lock = threading.Lock()
        self.timeout = timeout
        self.heard = float("-inf")   # time.monotonic() of the last answer
        self.since = None   # since when nothing was heard, once a request went unanswered
        self.keys = set()   # the keys of the requests unanswered since then
        self.message = None   # once silent: the text of what every request fails with
        self.stopped = threading.Event()   # set then: ends a wait before a retry
        self.clients = set()   # the S3Clients of the run, whose requests it may cut

    def error(self):
        """Once the endpoint is silent, the UnreachableError every request fails with (a
        new one each time: raised in several threads at once), else None."""
        return UnreachableError(self.message, "timed out") if self.message else None

    def check(self):
        if self.message:
            raise self.error()

    def answered(self):
        self.heard, self.since = time.monotonic(), None

    def failed(self, exc, where, key):
        """A request to where (scheme://host) for key failed of exc: the UnreachableError
        to raise instead once the endpoint is silent, else None (exc stands)."""
        if not isinstance(exc, socket.timeout):
            if isinstance(exc, OSError):   # a reset, an answer cut short: it was heard
                self.answered()
            return self.error()
        return self.unanswered(where, self.timeout, key, True)

    def got(self, response, where, key):
        """A request to where for key got response: the UnreachableError to raise instead
        once the endpoint is silent, else None."""
        if response.status not in self.GATEWAY_STATUSES or \
                response.header("x-amz-request-id"):   # the endpoint's own 502 or 504
            self.answered()
            return None
        return self.unanswered(where, 0, key, False)

    def unanswered(self, where, waited, key, alone):
        """A request for key that last heard from where waited seconds ago got no answer;
        alone: whether it may make the endpoint silent with no other key's."""
        now = time.monotonic()
        with self.lock:
            if self.since is None:
                self.since, self.keys = max(now - waited, self.heard), set()
            self.keys.add(key)
            if not self.message and now - self.since >= 2 * self.timeout and \
                    (alone or len(self.keys) > 1):
                self.silent(where, now - self.since)
            return self.error()

    def given_up(self, key):
        """The request for key got a gateway's answer to its last retry: its file failed,
        and its key leaves the count (which ends with no key left)."""
        with self.lock:
            self.keys.discard(key)
            if not self.keys:
                self.since = None

    def silent(self, where, seconds):
        """Give up on the endpoint: requests in flight end now, not a --timeout later."""
        self.message = ("no answer from %s for %d s: every request in that time timed out "
                        "or got a gateway's 502 or 504 (--timeout %ds); the run stops, files "
                        "not sent are kept for the next run" % (where, seconds, self.timeout))
        self.stopped.set()
        for client in self.clients:
            sock = client.connection and client.connection.sock
            if sock is None:
                continue
            try:   # its blocked read or write returns. Not TLS's shutdown, which would
                # unwrap it first: a write of its worker meanwhile would go out in clear.
                socket.SocketType.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass   # closed meanwhile by its worker


REGION_NAME = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-\d+$")


def endpoint_for(endpoint_url, region, bucket):
    return parse_endpoint_url(endpoint_url) if endpoint_url else aws_endpoint(region, bucket)


def answer_time(response):
    """The server's clock: <ServerTime> of a skew error, else the Date header (aware UTC)."""
    server_time = xml_text(response.xml, "ServerTime")
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", server_time)
    if match:
        return datetime.datetime.strptime(match.group(1) + "Z", ISO_SECONDS).replace(
            tzinfo=datetime.timezone.utc)
    try:
        when = email.utils.parsedate_to_datetime(response.header("date"))
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


class Session(object):
    """What every worker shares, and what a server's answer may correct during the run:
    the clock offset (a host clock minutes off), the region (a bucket elsewhere) and the
    credentials (expired: read again, once, from their source). Each correction is
    announced once on stderr; the request that met it is sent again at once.
    """

    def __init__(self, settings, bucket, notices, reload_credentials=None):
        self.lock = threading.Lock()
        self.notices = notices
        self.bucket = bucket
        self.endpoint_url = settings.endpoint_url
        self.credentials = settings.credentials
        self.region = settings.region
        self.endpoint = endpoint_for(settings.endpoint_url, settings.region, bucket)
        self.offset = 0.0                 # seconds to add to this host's clock
        self.reload_credentials = reload_credentials
        self.reloaded = False
        self.last_refresh = 0.0
        # Only for https: loading a CA bundle costs ~40 ms of CPU (AWS_CA_BUNDLE is often
        # set host-wide, also where the endpoint is plain http).
        self.tls = tls_context(settings.network.ca_bundle) \
            if self.endpoint.scheme == "https" else None
        self.proxies = settings.network.proxies
        self.expected_owner = settings.expected_bucket_owner
        self.debug = False

    def snapshot(self):
        """What a request is signed with now: a Signing."""
        with self.lock:
            self.refresh_if_expiring()
            return Signing(self.credentials, self.region, self.endpoint, self.offset)

    def refresh_if_expiring(self):
        """Temporary credentials are read again from their source before they expire
        (at most once a minute; on failure the old ones serve until refused)."""
        expiration = self.credentials.expiration
        now = time.time()
        if expiration is None or self.reload_credentials is None or \
                now < expiration - REFRESH_MARGIN or now - self.last_refresh < 60:
            return
        self.last_refresh = now
        try:
            self.credentials = self.reload_credentials()
        except S3PushError as exc:
            self.notices.warning("could not refresh the credentials (%s)" % exc,
                                 once="refresh")

    def correct(self, response, used, signed_at):
        """True when the answer showed a mistake that is now fixed (maybe by another
        worker since this request was signed): send the request again."""
        with self.lock:
            if used != Signing(self.credentials, self.region, self.endpoint, self.offset):
                return True
            return (self.fix_clock(response, signed_at) or self.fix_region(response)
                    or self.fix_credentials(response))

    def fix_clock(self, response, signed_at):
        code, _ = response.error
        server_time = answer_time(response)
        if response.status not in (400, 403) or server_time is None:
            return False
        skew = (server_time - signed_at).total_seconds()
        if code != "RequestTimeTooSkewed" and abs(skew) < SKEW_TOLERANCE:
            return False
        self.offset += skew
        self.notices.warning("this host's clock is %d s %s the server's: signing with the "
                             "server's time for this run; fix the clock (NTP)"
                             % (abs(skew), "behind" if skew > 0 else "ahead of"), once="clock")
        return True

    def fix_region(self, response):
        region = response.header("x-amz-bucket-region") or xml_text(response.xml, "Region")
        if response.status not in (301, 307, 400, 403) or not region or \
                region == self.region or not REGION_NAME.match(region):
            return False
        self.notices.warning("bucket %s is in region %s, not %s: set --region %s (or "
                             "AWS_REGION) to spare a round trip"
                             % (self.bucket, region, self.region, region), once="region")
        self.region = region
        self.endpoint = endpoint_for(self.endpoint_url, region, self.bucket)
        return True

    def fix_credentials(self, response):
        code, _ = response.error
        if code != "ExpiredToken" or self.reloaded or self.reload_credentials is None:
            return False
        self.reloaded = True
        try:
            fresh = self.reload_credentials()
        except S3PushError:
            return False
        old = self.credentials
        if (fresh.access_key, fresh.secret_key, fresh.token) == \
                (old.access_key, old.secret_key, old.token):
            return False
        self.notices.warning("the credentials had expired; read them again from %s"
                             % fresh.source, once="token")
        self.credentials = fresh
        return True


def is_retryable(response):
    """A failed answer that error_from_response, the one place that classifies them, says
    is temporary: 5xx (but 501), 429, SlowDown, RequestTimeout (a 400), ..."""
    return response.status >= 300 and \
        type(error_from_response(response)) is TemporaryError


def backoff_delay(retry, retry_after, unit):
    """Seconds to wait before retry number `retry` (0 first): the server's Retry-After
    (capped), else full jitter, unit * min(cap, base * 2**retry), with unit in [0, 1).
    """
    try:
        return min(max(float(retry_after), 0.0), RETRY_AFTER_CAP)
    except ValueError:
        return unit * min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(retry, 30))


class S3Client(object):
    """Signs and sends requests for one bucket over one connection (one per worker)."""

    def __init__(self, session, retries=0, timeout=DEFAULT_TIMEOUT, deadline=None,
                 rate_limit=None, watch=None):
        self.session = session
        self.deadline = deadline or Deadline()
        self.rate_limit = rate_limit
        self.retries = retries
        self.timeout = timeout
        self.connection = None
        self.signing_keys = {}   # see sign_request
        self.watch = watch or SilenceWatch(timeout)
        with self.watch.lock:
            self.watch.clients.add(self)

    def close(self):
        with self.watch.lock:
            self.watch.clients.discard(self)
        if self.connection is not None:
            self.connection.close()

    def request(self, method, key, headers, body, body_hash, query=(), validate=None):
        """One signed request with retries and corrections; returns the last answer.

        Transient answers (5xx, 429, SlowDown, RequestTimeout, ...) and broken
        connections (an answer cut short too) are retried with exponential backoff and
        full jitter, or after the server's Retry-After, while the run's deadline allows.
        A skewed clock, a wrong region and an expired token are corrected and sent again
        without using up a retry. Each attempt is signed afresh; a FileRange body is read
        from disk again. validate(response), if given, checks a 2xx answer and raises
        TemporaryError to have the request retried (an ETag that is not the MD5 sent, a
        complete without its result). A server that refuses connections is not retried,
        nor one that stopped answering (SilenceWatch).
        """
        retry = corrections = 0
        while True:
            self.watch.check()   # a silent endpoint (SilenceWatch) is asked nothing more
            used = self.session.snapshot()
            signed_at = datetime.datetime.now(datetime.timezone.utc) + \
                datetime.timedelta(seconds=used.offset)
            failure, retry_after = None, ""
            try:
                response = self.attempt(method, key, query, headers, body, body_hash, used,
                                        signed_at, validate)
            except TemporaryError as exc:   # a broken connection, a damaged body
                failure = exc
            else:
                if response.status >= 300 and corrections < MAX_CORRECTIONS and \
                        self.session.correct(response, used, signed_at):
                    corrections += 1   # a correction is no retry: sent again at once
                    continue
                if not is_retryable(response):
                    return response
                retry_after = response.header("retry-after")
            delay = backoff_delay(retry, retry_after, random.random())
            if retry >= self.retries or not self.deadline.allows_wait(delay):
                if failure is not None:
                    raise failure
                if response.status in SilenceWatch.GATEWAY_STATUSES:
                    self.watch.given_up(key)
                return response
            self.watch.stopped.wait(delay)
            retry += 1

    def attempt(self, method, key, query, headers, body, body_hash, used, signed_at,
                validate):
        endpoint = used.endpoint
        host, path = object_address(endpoint, self.session.bucket, key)
        target = canonical_uri(path)
        if query:
            target += "?" + canonical_query_string(query)
        connect_host = host.rsplit(":", 1)[0] if ":" in host else host
        if self.connection is None or self.connection.host != connect_host or \
                self.connection.port != endpoint.port:
            if self.connection is not None:   # the client stays known to its SilenceWatch
                self.connection.close()
            self.connection = Connection(endpoint.scheme, connect_host, endpoint.port,
                                         self.timeout, self.session.tls, proxy_for(
                                             self.session.proxies, endpoint.scheme,
                                             connect_host, endpoint.port), self.rate_limit)
        if self.session.expected_owner:   # S3 refuses (403) if another account owns it
            headers = dict(headers, **{"x-amz-expected-bucket-owner":
                                       self.session.expected_owner})
        trace = self.trace(method, target, used.credentials, self.session.notices) \
            if self.session.debug else None
        signed = sign_request(method, host, path, query, headers, body_hash, used.credentials,
                              used.region, signed_at, trace=trace, keys=self.signing_keys)
        signed["user-agent"] = USER_AGENT
        try:
            response = self.connection.exchange(method, target, signed, body)
        except (S3PushError, OSError) as exc:   # AnswerError included: an answer cut short
            self.connection.close()
            silence = self.watch.failed(exc, "%s://%s" % (endpoint.scheme, host), key)
            if silence is not None:
                raise silence
            if isinstance(exc, S3PushError):
                raise
            raise TemporaryError("the connection failed during the request (%s); the file "
                                 "is kept" % describe_os_error(exc))
        silence = self.watch.got(response, "%s://%s" % (endpoint.scheme, host), key)
        if silence is not None:
            raise silence
        response.expected_owner = self.session.expected_owner
        if self.session.debug:
            self.session.notices.line(sys.stderr, "s3push: debug: answer %d %s, ETag %s, "
                                      "request id %s" % (
                                          response.status, response.reason,
                                          response.header("etag") or "-",
                                          response.header("x-amz-request-id") or "-"))
        if validate is not None and 200 <= response.status < 300:
            validate(response)
        return response

    @staticmethod
    def trace(method, target, credentials, notices):
        """--debug: the canonical request and string to sign, through redact()."""
        def show(request_text, text):
            notices.line(sys.stderr, redact(
                "s3push: debug: %s %s\n--- canonical request\n%s\n--- string to sign\n%s"
                % (method, target, request_text, text), credentials))
        return show


# === Credentials and settings ===


class Credentials(object):
    """An access key pair; its repr shows the key id and where it came from, never the secret."""
    __slots__ = ("access_key", "secret_key", "token", "source", "expiration")

    def __init__(self, access_key, secret_key, token=None, source="", expiration=None):
        self.access_key = access_key
        self.secret_key = secret_key
        self.token = token
        self.source = source
        self.expiration = expiration   # seconds since the epoch, for temporary ones

    def __repr__(self):
        return "Credentials(access_key=%r, source=%r)" % (self.access_key, self.source)


ACCOUNT_ID = re.compile(r"^\d{12}$")


class Settings(object):
    """Everything resolved from options, environment and files, before any request."""

    def __init__(self, region, endpoint_url, credentials, network=Network({}, None),
                 expected_bucket_owner=None):
        self.region = region
        self.endpoint_url = endpoint_url
        self.credentials = credentials
        self.network = network   # of every request: S3's and the credential services'
        self.expected_bucket_owner = expected_bucket_owner   # an account id, or None


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


def has_keys(section):
    return bool(section) and bool(set(section) & {"aws_access_key_id", "aws_secret_access_key"})


def parse_expiration(text):
    """Seconds since the epoch of an ISO 8601 UTC time such as 2026-11-24T08:00:00Z."""
    match = re.match(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)", text or "")
    return calendar.timegm(tuple(int(x) for x in match.groups())) if match else None


def credentials_from_json(data, source):
    """Credentials from the JSON of credential_process, a container or the EC2 metadata."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ConfigError("%s did not answer with JSON credentials" % source)
    if not isinstance(doc, dict) or not doc.get("AccessKeyId") or \
            not doc.get("SecretAccessKey"):
        raise ConfigError("%s gave no AccessKeyId and SecretAccessKey" % source)
    return Credentials(doc["AccessKeyId"], doc["SecretAccessKey"],
                       doc.get("SessionToken") or doc.get("Token") or None, source,
                       parse_expiration(doc.get("Expiration")))


def check_credentials(credentials):
    """Refuse keys with white space or control characters (a paste gone wrong): sent as
    headers they would make the HTTP library raise an error that quotes them."""
    for name, value in (("access key id", credentials.access_key),
                        ("secret access key", credentials.secret_key),
                        ("session token", credentials.token or "")):
        if any(c.isspace() or not c.isprintable() or ord(c) > 126 for c in value):
            raise ConfigError("the %s from %s holds a space, a control or a non-ASCII "
                              "character: copy it again" % (name, credentials.source))


def resolve_credentials(environ, explicit_profile, profile, sources, io=None,
                        region=DEFAULT_REGION, network=Network({}, None)):
    """The AWS tools' order: the environment (passed over for an explicit --profile), a
    role to assume (role_arn), the credentials file, credential_process, the config file,
    container credentials, the EC2 instance profile.

    sources: [(section or None, path)] for the credentials file, then the config file.
    io: the CredentialSources that need I/O (STS, a process, metadata services); without
    it only the environment and the files count. region: where STS is asked; network: how
    the services are reached (the Network of S3 requests too).
    """
    (cred_section, cred_path), (conf_section, conf_path) = sources
    conf_section = conf_section or {}
    steps = [
        lambda: None if explicit_profile else environment_credentials(environ),
        lambda: io.assume_role(conf_section, profile, region, network)
        if io and conf_section.get("role_arn") else None,
        lambda: credentials_from_section(cred_section, cred_path, profile)
        if has_keys(cred_section) else None,
        lambda: io.process(conf_section["credential_process"], profile)
        if io and conf_section.get("credential_process") else None,
        lambda: credentials_from_section(conf_section, conf_path, profile)
        if has_keys(conf_section) else None,
        lambda: io.container(network) if io else None,
        lambda: io.instance(network) if io else None,
    ]
    for step in steps:
        found = step()
        if found is not None:
            check_credentials(found)
            return found
    raise ConfigError("no credentials for profile '%s': set AWS_ACCESS_KEY_ID and "
                      "AWS_SECRET_ACCESS_KEY, add them to %s, or run with an instance "
                      "profile or container role" % (profile, cred_path))


def resolve_settings(options, environ, credentials_ini, config_ini, paths, io=None):
    """Pure: options (argparse namespace), environ and parsed files give the Settings; the
    one place where the profile and the region are decided.

    paths: (credentials file path, config file path), for messages. io: as for
    resolve_credentials.
    """
    explicit = bool(options.profile)
    profile = options.profile or environ.get("AWS_PROFILE") or "default"
    cred_section = profile_section(credentials_ini, profile, False)
    conf_section = profile_section(config_ini, profile, True)
    if profile != "default" and cred_section is None and conf_section is None:
        raise ConfigError("profile '%s' not found in %s or %s: check --profile or AWS_PROFILE"
                          % (profile, paths[0], paths[1]))
    conf_section = conf_section or {}
    region = (options.region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
              or conf_section.get("region") or DEFAULT_REGION)
    ca_bundle = (options.ca_bundle or environ.get("AWS_CA_BUNDLE")
                 or conf_section.get("ca_bundle") or None)
    network = Network(proxy_settings(environ), ca_bundle)
    credentials = resolve_credentials(environ, explicit, profile,
                                      [(cred_section, paths[0]), (conf_section, paths[1])],
                                      io, region, network)
    endpoint = (options.endpoint_url or environ.get("AWS_ENDPOINT_URL_S3")
                or environ.get("AWS_ENDPOINT_URL") or conf_section.get("endpoint_url") or None)
    owner = (options.expected_bucket_owner or environ.get("S3PUSH_EXPECTED_BUCKET_OWNER")
             or conf_section.get("s3push_expected_bucket_owner") or None)
    if owner is not None and not ACCOUNT_ID.match(owner):
        raise ConfigError("the expected bucket owner %r (S3PUSH_EXPECTED_BUCKET_OWNER or "
                          "s3push_expected_bucket_owner) is not a 12-digit account id"
                          % owner)
    return Settings(region, endpoint, credentials, network, owner)


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


def process_credentials(command, profile):
    """credential_process: run it (no shell), read its JSON; its output is never shown."""
    what = "credential_process of profile '%s'" % profile
    try:
        done = subprocess.run(shlex.split(command), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=60)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise ConfigError("%s could not run (%s): fix the command"
                          % (what, exc.__class__.__name__))
    if done.returncode != 0:
        raise ConfigError("%s failed with exit status %d" % (what, done.returncode))
    return credentials_from_json(done.stdout, what)


def container_credentials(environ, network):
    """ECS/EKS container credentials, or None when the container variables are not set."""
    relative = environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    url = "http://169.254.170.2" + relative if relative else \
        environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if not url:
        return None
    token = environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
    token_file = environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    if token_file:
        try:
            with open(token_file) as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise ConfigError("cannot read %s (%s)" % (token_file, exc.strerror))
    what = "the container credentials service %s" % url.split("?")[0]
    try:
        status, body = http_call(network, "GET", url,
                                 {"Authorization": token} if token else {}, timeout=2)
    except UnreachableError as exc:
        raise ConfigError("%s did not answer (%s)" % (what, exc.reason))
    if status != 200:
        raise ConfigError("%s answered HTTP %d" % (what, status))
    return credentials_from_json(body, what)


NO_METADATA_HINT = (
    "no credentials found, and the EC2 metadata service did not answer in 1 s: off EC2, "
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a profile (and "
    "AWS_EC2_METADATA_DISABLED=true); in a container on EC2, raise the instance's metadata "
    "hop limit to 2 (aws ec2 modify-instance-metadata-options --http-put-response-hop-limit 2)")


def instance_credentials(environ, network):
    """The EC2 instance profile through IMDSv2 (token PUT, then GETs), or None."""
    if environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return None
    base = (environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            or "http://169.254.169.254").rstrip("/")
    try:
        status, token = http_call(network, "PUT", base + "/latest/api/token",
                                  {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    except UnreachableError as exc:
        if "timed out" in exc.reason:   # the PUT's answer may not reach a container:
            raise ConfigError(NO_METADATA_HINT)   # too few hops allowed
        return None
    try:
        if status != 200:
            return None
        headers = {"X-aws-ec2-metadata-token": token.decode("ascii", "replace").strip()}
        listing = base + "/latest/meta-data/iam/security-credentials/"
        status, roles = http_call(network, "GET", listing, headers)
        role = roles.decode("utf-8", "replace").split()[0] if status == 200 and roles else ""
        if not role:
            return None
        status, body = http_call(network, "GET", listing + role, headers)
    except UnreachableError:
        return None   # not on EC2, or in a container with a metadata hop limit of 1
    if status != 200:
        return None
    return credentials_from_json(body, "the EC2 instance profile %s" % role)


def role_source_credentials(section, profile, environ, inis, paths, network):
    """The credentials that call AssumeRole for a profile with role_arn: those of its
    source_profile, or of its credential_source (Environment, Ec2InstanceMetadata,
    EcsContainer), as the AWS CLI has it; exactly one of the two."""
    source, named = section.get("source_profile"), section.get("credential_source")
    sources = {"Environment": lambda environ, network: environment_credentials(environ),
               "Ec2InstanceMetadata": instance_credentials,
               "EcsContainer": container_credentials}
    if source and named:
        raise ConfigError("profile '%s' has both source_profile and credential_source: keep "
                          "one" % profile)
    if named:
        if named not in sources:
            raise ConfigError("profile '%s': credential_source = %s is not one of %s"
                              % (profile, named, ", ".join(sorted(sources))))
        found = sources[named](environ, network)
        if found is None:
            raise ConfigError("profile '%s': credential_source = %s found no credentials"
                              % (profile, named))
        check_credentials(found)
        return found
    if not source:
        raise ConfigError("profile '%s' has role_arn but neither source_profile nor "
                          "credential_source: add one" % profile)
    return resolve_credentials(
        environ, True, source, [(profile_section(inis[0], source, False), paths[0]),
                                (profile_section(inis[1], source, True), paths[1])])


def assume_role(section, source, region, environ, profile, network):
    """STS AssumeRole, signed with the source profile's keys by our own signer."""
    url = environ.get("AWS_ENDPOINT_URL_STS") or "https://sts.%s.amazonaws.com" % region
    params = [("Action", "AssumeRole"), ("Version", "2011-06-15"),
              ("RoleArn", section["role_arn"]), ("DurationSeconds",
                                                 section.get("duration_seconds", "3600")),
              ("RoleSessionName", section.get("role_session_name") or "s3push-%d" % time.time())]
    if section.get("external_id"):
        params.append(("ExternalId", section["external_id"]))
    body = canonical_query_string(params).encode("ascii")
    netloc = urllib.parse.urlsplit(url).netloc
    headers = sign_request("POST", netloc, "/", [], {
        "content-type": "application/x-www-form-urlencoded; charset=utf-8",
        "content-length": str(len(body))}, payload_hash(body), source, region,
        datetime.datetime.now(datetime.timezone.utc),
        service="sts")
    what = "AssumeRole of %s (profile '%s')" % (section["role_arn"], profile)
    try:
        status, answer = http_call(network, "POST", url.rstrip("/") + "/", headers, body,
                                   timeout=10)
    except UnreachableError as exc:
        raise ConfigError("%s: STS did not answer (%s)" % (what, exc.reason))
    root = parse_xml(answer)
    if status != 200:
        raise AccessError("%s failed: %s: %s" % (what, xml_text(root, "Code") or status,
                                                 one_line(xml_text(root, "Message"))))
    return Credentials(xml_text(root, "AccessKeyId"), xml_text(root, "SecretAccessKey"),
                       xml_text(root, "SessionToken"), "role %s" % section["role_arn"],
                       parse_expiration(xml_text(root, "Expiration")))


class CredentialSources(object):
    """The credential sources that need I/O, one method each: STS AssumeRole, a process,
    the container and the EC2 instance metadata services."""

    def __init__(self, environ, inis, paths):
        self.environ, self.inis, self.paths = environ, inis, paths

    def assume_role(self, section, profile, region, network):
        source = role_source_credentials(section, profile, self.environ, self.inis, self.paths,
                                         network)
        return assume_role(section, source, region, self.environ, profile, network)

    def process(self, command, profile):
        return process_credentials(command, profile)

    def container(self, network):
        return container_credentials(self.environ, network)

    def instance(self, network):
        return instance_credentials(self.environ, network)


def load_settings(options, environ):
    """Read the credentials and config files named by the environment, then resolve."""
    home = os.path.expanduser("~")
    cred_path = environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(
        home, ".aws", "credentials")
    conf_path = environ.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config")
    cred_path, conf_path = os.path.expanduser(cred_path), os.path.expanduser(conf_path)
    inis, paths = (read_ini_file(cred_path), read_ini_file(conf_path)), (cred_path, conf_path)
    return resolve_settings(options, environ, inis[0], inis[1], paths,
                            CredentialSources(environ, inis, paths))


def warn_if_exposed(credentials, notices):
    """The file the credentials came from ('PATH [profile]'), if group or others may read
    it, deserves a word (ssh refuses such keys)."""
    path = credentials.source.rsplit(" [", 1)[0]
    if not credentials.source.endswith("]") or not os.path.isfile(path):
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o077:
        notices.warning("%s holds credentials and is readable by group or others (mode "
                        "%04o): chmod 600 it" % (path, stat.S_IMODE(mode)))


# === The object on the server: checksums, PUT, multipart ===
# Each body goes under a checksum the server verifies and its answer proves (Md5Check,
# Crc32Check or Sha256Check); an object is one PUT or a multipart upload, never read back.


CRC32_POLYNOMIAL = 0xEDB88320   # zlib's, bit-reflected: x^0 is the top bit


def gf2_multiply(a, b):
    """a * b modulo the CRC-32 polynomial (both bit-reflected, as zlib keeps them)."""
    product, bit = 0, 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ CRC32_POLYNOMIAL if b & 1 else b >> 1
    return product


def x_power(n):
    """x^n modulo the CRC-32 polynomial, by squaring."""
    result, square = 1 << 31, 1 << 30   # x^0, x^1
    while n:
        if n & 1:
            result = gf2_multiply(square, result)
        square = gf2_multiply(square, square)
        n >>= 1
    return result


def crc32_combine(crc1, crc2, length2):
    """The CRC32 of A+B from the CRC32s of A and B and B's length: appending length2
    bytes multiplies A's remainder by x^(8 length2); the two then add (XOR)."""
    return gf2_multiply(x_power(8 * length2), crc1) ^ crc2


class Crc32(object):
    """zlib's CRC32 as hashlib offers a hash: update(), digest() (its 4 bytes, big-endian,
    as x-amz-checksum-crc32 carries them), hexdigest()."""

    def __init__(self):
        self.value = 0

    def update(self, data):
        self.value = zlib.crc32(data, self.value)

    def digest(self):
        return struct.pack(">I", self.value)

    def hexdigest(self):
        return self.digest().hex()


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


def digest_of(hashed):
    """A hash's digest, or None for no hash (an MD5 where FIPS forbids it)."""
    return hashed.digest() if hashed is not None else None


def base64_text(digest):
    """A digest as a header carries it (Content-MD5, x-amz-checksum-crc32): in base64."""
    return base64.b64encode(digest).decode("ascii")


def plain_etag(etag):
    """An ETag as compared and recorded: without its quotes, in lower case."""
    return etag.strip().strip('"').lower()


def etag_confirms(etag, md5_hex):
    """True when an ETag is the MD5 of the bytes sent (or there is no MD5 to compare).

    An ETag that is not a plain MD5 (SSE-KMS, some servers) cannot confirm; the
    signed Content-MD5 the server checked is then what vouches for the bytes.
    """
    etag = plain_etag(etag)
    if not etag:
        return False
    if md5_hex is None or not re.match(r"^[0-9a-f]{32}$", etag):
        return True
    return hmac.compare_digest(etag, md5_hex)


def check_etag(etag, md5_hex):
    """Raise (a retryable error) unless the answer's ETag confirms the bytes sent."""
    if not etag:   # e.g. a proxy's answer, not the server's
        raise TemporaryError("the answer carried no ETag (cut short?); the file is kept")
    if not etag_confirms(etag, md5_hex):
        raise TemporaryError("the server's ETag %s is not the MD5 of what was sent (%s): the "
                             "bytes were damaged on the way; the file is kept"
                             % (etag, md5_hex))


def check_echo(response, header, algorithm, digest):
    """Raise unless the answer echoes in header (x-amz-checksum-crc32, -sha256) the digest
    sent, which the server verified (AWS S3, MinIO and LocalStack refuse a body that does
    not match it). No echo: this server does not verify it (rclone's, Ceph RGW 16) and
    cannot prove any upload by it."""
    echo = response.header(header)
    if not echo:
        if not response.header("etag"):   # headers cut short
            raise TemporaryError("the answer carried no checksum (cut short?); the file is kept")
        raise ConfigError("the server did not confirm the %s it was sent (no %s in its "
                          "answer: it does not verify checksums); the file is kept: run with "
                          "--checksum md5" % (algorithm, header))
    if echo != base64_text(digest):
        raise TemporaryError("the server's %s %s is not that of what was sent (%s): the "
                             "bytes were damaged on the way; the file is kept"
                             % (algorithm, one_line(echo, 40), base64_text(digest)))


MD5_OF_PARTS = "md5_of_parts"   # a multipart object's proof under MD5 (see Proof)
SHA256_OF_PARTS = "sha256_of_parts"   # and under SHA-256


class Proof(collections.namedtuple("Proof", "checksum value etag version_id")):
    """What the server confirmed of a whole object, as the manifest records it: the
    checksum that proved it ("md5", "crc32", "sha256", or for a multipart upload under
    MD5 or SHA-256 "md5_of_parts" or "sha256_of_parts", the hash of the parts' hashes and
    their count), its value in hex, the ETag and the VersionId ('' where the bucket keeps
    no versions)."""
    __slots__ = ()


# A check (Md5Check, Crc32Check, Sha256Check) holds only what differs between them: new(),
# the hash a body is read through (hashlib's, or Crc32); the headers that carry its value
# (a digest, raw bytes); how a PUT's answer proves it (confirm); how a multipart upload
# composes it (start_headers, part_element, complete, proof); of_parts, the name of a
# multipart Proof that only its part size reproduces (else None); payload_sha256, whether
# its hash is the body's SHA-256, which a signed payload then shares (see digest_range).


class Md5Check(object):
    """--checksum md5: every body goes under its signed Content-MD5, which every S3 server
    checks, and the ETag it answers must be that MD5 (unless SSE-KMS: verify_md5 off, the
    Content-MD5 the server checked then vouches). A multipart object's ETag is the MD5 of
    its parts' MD5s and their count. No hash where FIPS forbids MD5: values are None (the
    payload's signed SHA-256 then vouches, and no ETag can be compared)."""
    name = "md5"
    of_parts = MD5_OF_PARTS
    forgeable = False   # no bytes chosen to match keep an MD5 (see Sending)
    payload_sha256 = False

    def new(self):
        return new_md5()

    def headers(self, value):
        return {"content-md5": base64_text(value)} if value is not None else {}

    def confirm(self, answer, value, sending):
        check_etag(answer.header("etag"), value.hex() if value is not None and
                   sending.verify_md5 else None)

    def start_headers(self):
        return {}

    def part_element(self, value):
        return ""

    def complete(self, values, lengths):
        """(headers of CompleteMultipartUpload, the object's expected ETag or '')."""
        if None in values:
            return {}, ""
        md5 = new_md5()
        md5.update(b"".join(values))
        return {}, "%s-%d" % (md5.hexdigest(), len(values))

    def proof(self, answer, response, key, expected, etag, sending):
        """The Proof of a completed multipart upload: the ETag in its
        CompleteMultipartUploadResult, which must be the parts' when there is an MD5 to
        compare; never a HEAD, which PutObject-only keys cannot do."""
        # Ceph RGW 16.2 answers <ETag></ETag> after the key: there its parts, each checked
        # by its MD5 and named in the list (RGW completes no other: InvalidPart), are the
        # proof. A result without an ETag element, or without the key, proves nothing.
        if not etag and (xml_element(answer, "ETag") is None or
                         xml_text(answer, "Key") != key):
            raise FileError("the server's CompleteMultipartUploadResult carries no ETag "
                            "(nor the key, as Ceph RGW's does): nothing proves the object; "
                            "kept")
        if expected and etag and sending.verify_md5 and etag != expected:
            raise FileError("the server's ETag %s is not %s, the MD5 of the parts' MD5s: kept"
                            % (etag, expected))
        return Proof(self.of_parts, expected, etag, response.header("x-amz-version-id"))


class Crc32Check(object):
    """--checksum crc32: every body goes under its signed x-amz-checksum-crc32, which the
    server must verify and echo (AWS S3, MinIO, LocalStack); no echo, no proof. A
    multipart object carries the whole file's CRC32 (FULL_OBJECT: comparable with the
    file whatever the part size; COMPOSITE would be a CRC of the parts' CRCs, which only
    this part size reproduces), combined here from the parts'."""
    name = "crc32"
    of_parts = None   # its multipart proof is the whole file's CRC32
    forgeable = True   # four bytes chosen to match keep any CRC32 (see Sending)
    payload_sha256 = False

    def new(self):
        return Crc32()

    def headers(self, value):   # the SDK header too: Object Lock wants MD5 or it
        return {"x-amz-checksum-crc32": base64_text(value),
                "x-amz-sdk-checksum-algorithm": "CRC32"}

    def confirm(self, answer, value, sending):
        check_echo(answer, "x-amz-checksum-crc32", "CRC32", value)

    def start_headers(self):
        return {"x-amz-checksum-algorithm": "CRC32", "x-amz-checksum-type": "FULL_OBJECT"}

    def part_element(self, value):
        return "<ChecksumCRC32>%s</ChecksumCRC32>" % base64_text(value)

    def complete(self, values, lengths):
        whole = 0
        for value, length in zip(values, lengths):
            whole = crc32_combine(whole, int.from_bytes(value, "big"), length)
        whole = struct.pack(">I", whole)
        return {"x-amz-checksum-crc32": base64_text(whole),
                "x-amz-checksum-type": "FULL_OBJECT"}, whole

    def proof(self, answer, response, key, expected, etag, sending):
        echo = xml_text(answer, "ChecksumCRC32") or response.header("x-amz-checksum-crc32")
        if echo != base64_text(expected):
            raise FileError("the server did not confirm the whole file's CRC32 %s (it said "
                            "%s): kept; a server without FULL_OBJECT checksums needs "
                            "--checksum md5" % (base64_text(expected),
                                                one_line(echo or "nothing", 40)))
        return Proof(self.name, expected.hex(), etag, response.header("x-amz-version-id"))


class Sha256Check(object):
    """--checksum sha256: every body goes under its signed x-amz-checksum-sha256, which the
    server must verify and echo (AWS S3, LocalStack); no echo, no proof. S3 keeps it for
    an auditor to read off the object. A multipart object's is COMPOSITE, S3's only kind
    for SHA-256: the SHA-256 of the parts' SHA-256s and their count ("-N"), which only
    this part size reproduces (the ledger keeps it, as for an MD5 of parts)."""
    name = "sha256"
    of_parts = SHA256_OF_PARTS
    forgeable = False
    payload_sha256 = True

    def new(self):
        return hashlib.sha256()

    def headers(self, value):   # the SDK header too: Object Lock wants MD5 or it
        return {"x-amz-checksum-sha256": base64_text(value),
                "x-amz-sdk-checksum-algorithm": "SHA256"}

    def confirm(self, answer, value, sending):
        check_echo(answer, "x-amz-checksum-sha256", "SHA-256", value)

    def start_headers(self):
        return {"x-amz-checksum-algorithm": "SHA256", "x-amz-checksum-type": "COMPOSITE"}

    def part_element(self, value):
        return "<ChecksumSHA256>%s</ChecksumSHA256>" % base64_text(value)

    def complete(self, values, lengths):
        """(no headers: the parts' values are the list's, the object's "hex-N")."""
        return {}, "%s-%d" % (hashlib.sha256(b"".join(values)).hexdigest(), len(values))

    def proof(self, answer, response, key, expected, etag, sending):
        echo = xml_text(answer, "ChecksumSHA256") or response.header("x-amz-checksum-sha256")
        digest, count = expected.split("-")
        sent = "%s-%s" % (base64_text(bytes.fromhex(digest)), count)   # as S3 writes it
        if echo != sent:
            raise FileError("the server did not confirm %s, the SHA-256 of the parts' "
                            "SHA-256s (it said %s): kept" % (sent, one_line(echo or "nothing",
                                                                            60)))
        return Proof(self.of_parts, expected, etag, response.header("x-amz-version-id"))


MD5 = Md5Check()
CHECKSUMS = {check.name: check for check in (MD5, Crc32Check(), Sha256Check())}   # by name
OF_PARTS = {check.of_parts: check for check in CHECKSUMS.values() if check.of_parts}


class Digest(collections.namedtuple("Digest", "size sha256_hex value md5 body")):
    """What one read of a file or part found: its size, its SHA-256 (None: the payload
    goes unsigned), the value of the check that proves it (its digest), an MD5 beside it
    (see Sending; else None) and (small) its bytes."""
    __slots__ = ()

    @property
    def payload_hash(self):
        """x-amz-content-sha256: the SHA-256, or UNSIGNED-PAYLOAD when the signed
        checksum is what vouches for the body."""
        return self.sha256_hex or UNSIGNED_PAYLOAD


def digest_range(fd, offset, length, check, sha256=False, md5=False):
    """Read a range once with pread, through the check's hash, and in the same pass its
    SHA-256 if sha256 (the check's own hash, if it is one) and an MD5 if md5. Bodies up
    to IN_MEMORY_BYTES are kept, to be sent without a second read."""
    proving = check.new()
    sha = hashlib.sha256() if sha256 and not check.payload_sha256 else None
    md5 = new_md5() if md5 else None
    hashes = [hashed for hashed in (proving, sha, md5) if hashed is not None]
    keep = length <= IN_MEMORY_BYTES
    chunks = []
    for block in FileRange(fd, offset, length).blocks():
        for hashed in hashes:
            hashed.update(block)
        if keep:
            chunks.append(block)
    sha = proving if sha256 and check.payload_sha256 else sha   # one hash, not two
    return Digest(length, sha.hexdigest() if sha is not None else None, digest_of(proving),
                  digest_of(md5), b"".join(chunks) if keep else None)


def digest_bytes(data, check):
    """The Digest of a small body under the check, its SHA-256 signed."""
    hashed = check.new()
    if hashed is not None:
        hashed.update(data)
    return Digest(len(data), payload_hash(data), digest_of(hashed), None, data)


class Sending(object):
    """How one file's object is sent: its headers (type, storage class, encryption, ACL,
    mtime, ...), a condition (--if-exists keep or number: If-None-Match: *), the check
    that proves each body (Md5Check, Crc32Check or Sha256Check; verify_md5 off under
    SSE-KMS, whose ETag is no MD5), and whether each body's SHA-256 is signed too
    (--sign-payload, no MD5, or plain http; under Sha256Check the same hash) or the body
    goes UNSIGNED-PAYLOAD under its signed checksum (one hash, not two).

    Over plain http anyone on the path may change a body and keep its CRC32 (four bytes
    chosen to match: the check is forgeable): each body then goes under its signed
    SHA-256, which AWS checks, and its signed Content-MD5 too (md5_beside), which every
    server checks (no four bytes keep an MD5)."""

    def __init__(self, headers, condition, verify_md5, sign_payload, checksum=MD5,
                 plain_http=False):
        self.headers = headers
        self.condition = condition
        self.verify_md5 = verify_md5
        self.sign_payload = sign_payload or plain_http
        self.checksum = checksum
        self.md5_beside = plain_http and checksum.forgeable


def body_headers(digest, check, content_type=None):
    headers = {"content-length": str(digest.size)}
    if content_type:
        headers["content-type"] = content_type
    if digest.md5 is not None:   # beside a forgeable check (see Sending)
        headers.update(MD5.headers(digest.md5))
    headers.update(check.headers(digest.value))
    return headers


def check_answer(response, what):
    """Raise the S3PushError for a failed answer, including a 200 that carries an <Error>."""
    if not 200 <= response.status < 300:
        error = error_from_response(response, what)
        error.status = response.status
        raise error
    code, _ = response.error
    if code:   # CompleteMultipartUpload can fail after its 200 was sent
        raise error_from_response(Response(500, "error in a 200 answer", response.headers,
                                           response.body), what)


class Sent(collections.namedtuple("Sent", "etag value")):
    """What the server confirmed of one PUT: its ETag as sent back, and the value of the
    check (the Sending's: its digest) of the bytes read and sent."""
    __slots__ = ()


def put_range(client, key, fd, offset, length, headers, sending, query=(), what="",
              state=None):
    """PUT a range of an open file, a whole object or one part: read once for its check's
    value (and SHA-256 if the payload is signed), sent with it, retried until the answer
    confirms it (check.confirm). state: the file's content_stamp before it is read, if the
    caller has it. Returns (what was Sent, the answer)."""
    check = sending.checksum
    state = content_stamp(os.fstat(fd)) if state is None else state
    with CPUS.wide(length):
        digest = digest_range(fd, offset, length, check, sending.sign_payload,
                              sending.md5_beside)
        body = digest.body if digest.body is not None else FileRange(fd, offset, length, state)
        headers = dict(body_headers(digest, check), **headers)
        try:
            try:
                response = client.request("PUT", key, headers, body, digest.payload_hash,
                                          query=query, validate=lambda answer:
                                          check.confirm(answer, digest.value, sending))
            except TemporaryError as exc:
                raise exc.__class__("%s: %s" % (what, exc)) if what else exc
            check_answer(response, what)
        except S3PushError as exc:   # a body refused because the file changed as it was read
            if isinstance(exc, ChangedError) or exc.fatal or \
                    content_stamp(os.fstat(fd)) == state:
                raise
            raise ChangedError() from None
    return Sent(response.header("etag"), digest.value), response


def put_object(client, key, fd, info, sending):
    """PUT one object from an open file (info: its fstat, taken before it is read); raise
    unless the server confirmed these bytes. Returns its Proof."""
    sent, response = put_range(client, key, fd, 0, info.st_size,
                               dict(sending.headers, **sending.condition), sending,
                               state=content_stamp(info))
    return Proof(sending.checksum.name, sent.value.hex() if sent.value is not None else "",
                 plain_etag(sent.etag), response.header("x-amz-version-id"))


def multipart_headers(sending):
    """The headers that start a multipart upload: the object's, and the check's."""
    return dict(sending.headers, **sending.checksum.start_headers())


def create_multipart_upload(client, key, sending):
    """POST ?uploads; returns the upload id."""
    headers = {"content-length": "0"}
    headers.update(multipart_headers(sending))
    response = client.request("POST", key, headers, b"", EMPTY_SHA256, query=[("uploads", "")])
    check_answer(response, "starting the multipart upload")
    answer = response.xml
    upload_id = xml_text(answer, "UploadId")
    if not upload_id:   # each try would leave one more upload behind: none is made
        raise ConfigError("the server's answer to starting a multipart upload (POST "
                          "?uploads) %s: the file is kept; raise --multipart-threshold "
                          "above it, or report this answer: %s" % (
                              "gave no UploadId" if answer is not None else
                              "is not XML that parses",
                              one_line(response.body[:200].decode("utf-8", "replace"))))
    return upload_id


def upload_part(client, key, upload_id, number, fd, offset, length, sending):
    """PUT one part; returns what was Sent once the answer confirms it."""
    return put_range(client, key, fd, offset, length, {}, sending,
                     [("partNumber", str(number)), ("uploadId", upload_id)],
                     "part %d" % number)[0]


def xml_escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(
        '"', "&quot;")


def check_complete_result(response):
    """Raise (a retryable error) unless a 2xx answer to CompleteMultipartUpload is its
    CompleteMultipartUploadResult (or an <Error>, check_answer's): an empty, cut or foreign
    200 (a proxy's, a load balancer's) proves nothing."""
    root = response.xml
    if response.error[0] or root is not None and \
            local_name(root.tag) == "CompleteMultipartUploadResult":
        return
    raise TemporaryError("the answer is no CompleteMultipartUploadResult (%s): it proves "
                         "nothing; the file is kept" % (
                             one_line(response.body[:200].decode("utf-8", "replace")) or
                             "an empty body"))


def complete_multipart_upload(client, key, upload_id, parts, sending, lengths):
    """POST the part list (each part's ETag, and its check's element); the check confirms
    the object from the answer. Returns the object's Proof."""
    check = sending.checksum
    body = ("<CompleteMultipartUpload>%s</CompleteMultipartUpload>" % "".join(
        "<Part><PartNumber>%d</PartNumber><ETag>%s</ETag>%s</Part>" % (
            n, xml_escape(part.etag), check.part_element(part.value))
        for n, part in enumerate(parts, 1))).encode("utf-8")
    digest = digest_bytes(body, MD5)
    headers = body_headers(digest, MD5, "application/xml")
    headers.update(sending.condition)
    extra, expected = check.complete([part.value for part in parts], lengths)
    headers.update(extra)
    try:
        response = client.request("POST", key, headers, body, digest.payload_hash,
                                  query=[("uploadId", upload_id)],
                                  validate=check_complete_result)
    except TemporaryError as exc:
        raise TemporaryError("completing the multipart upload: %s" % exc) from None
    check_answer(response, "completing the multipart upload")
    etag = plain_etag(xml_text(response.xml, "ETag"))   # the result's; a header proves no result
    return check.proof(response.xml, response, key, expected, etag, sending)


def metadata_value(value):
    """A metadata value as a header carries it: ASCII as it is, anything else in RFC 2047
    (=?UTF-8?B?...?=), which is how S3 itself hands non-ASCII metadata back."""
    if all(ord(c) < 128 for c in value):
        return value
    return "=?UTF-8?B?%s?=" % base64.b64encode(value.encode("utf-8")).decode("ascii")


def tagging_header(tags):
    """x-amz-tagging: the tags URL-encoded as a query string."""
    return "&".join("%s=%s" % (uri_encode(key), uri_encode(value)) for key, value in tags)


def part_size_for(size, requested):
    """The requested part size, grown so that the file fits in 10,000 parts (whole MiB)."""
    needed = -(-size // MAX_PARTS)
    part = max(requested, needed, MIN_PART_BYTES)
    return -(-part // MIB) * MIB


def part_ranges(size, part_size):
    """[(part number, offset, length)]; the last part may be short."""
    return [(n + 1, offset, min(part_size, size - offset))
            for n, offset in enumerate(range(0, size, part_size))]


# === Keys: where each file goes ===


class Destination(object):
    """A parsed s3://BUCKET[/PREFIX]: prefix is '' or ends with '/', and each file's
    relative path is appended to it; or, when it names a part of the file's path
    ({path}, {dir}, {name}, {stem}, {ext}: whole_key), it is each file's whole key."""

    def __init__(self, bucket, prefix, whole_key=False):
        self.bucket = bucket
        self.prefix = prefix
        self.whole_key = whole_key

    def url(self, key):
        """s3://BUCKET/KEY as the lines for the operator show it (the key escaped)."""
        return "s3://%s/%s" % (self.bucket, safe_name(key))


BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")


PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
TIME_PARTS = {"date": "%Y-%m-%d", "year": "%Y", "month": "%m", "day": "%d", "hour": "%H"}
PLACEHOLDERS = ("hostname",) + tuple(TIME_PARTS) + tuple("mtime_" + p for p in TIME_PARTS)
# Only in the destination: parts of the file's path (any makes it the whole key), and
# more of the file, so that rotated logs of one name each get a key of their own.
PATH_PLACEHOLDERS = ("path", "dir", "name", "stem", "ext")
FILE_PLACEHOLDERS = PATH_PLACEHOLDERS + ("mtime_epoch", "size", "inode")


def check_template(text, where, known=PLACEHOLDERS):
    """A UsageError naming any placeholder in text that is not a known one."""
    for name in PLACEHOLDER.findall(text):
        if name not in known:
            raise UsageError("unknown placeholder {%s} in %r: known are %s" % (
                name, where, " ".join("{%s}" % p for p in known)))


# A name that is not UTF-8 (Latin-1 from an old Windows share, a camera's firmware) cannot
# be a key as it is: each byte of it that is not part of valid UTF-8 is written as U+201B
# (a high-reversed-9 quotation mark) and its two upper-case hex digits, and each U+201B of
# the name itself is doubled, as rclone's InvalidUtf8 encoding writes them (b"caf\xe9.csv"
# -> "caf\u201bE9.csv", a file named "caf\u201bE9.csv" -> "caf\u201b\u201bE9.csv"). So a
# key reads back left to right (U+201B twice: one U+201B; U+201B and two hex digits: that
# byte) to one name only: two names never share a key. The original bytes of a name that
# is not UTF-8 also go with its object (NAME_HEADER) and its manifest line.
ESCAPE_MARK = "\u201b"
ESCAPED = re.compile("\u201b|[\udc80-\udcff]")   # the mark, or a byte surrogateescape held
NAME_HEADER = "x-amz-meta-s3push-name"


def escaped_char(match):
    """U+201B doubled, or a byte that is not UTF-8 as U+201B and its two hex digits."""
    char = match.group()
    return char * 2 if char == ESCAPE_MARK else "%s%02X" % (ESCAPE_MARK, ord(char) & 0xFF)


def key_text(name):
    """A file name or path (see name_bytes) as the text of a key: its UTF-8 as it is, but
    for U+201B doubled and the bytes that are not UTF-8 escaped (U+201B and two hex
    digits)."""
    return ESCAPED.sub(escaped_char, name_bytes(name).decode("utf-8", "surrogateescape"))


def percent_bytes(name):
    """None for a UTF-8 name; else its bytes percent-encoded, '/' kept, as NAME_HEADER and
    the manifest's path_bytes carry them (urllib.parse.unquote_to_bytes gives them back)."""
    raw = name_bytes(name)
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError:
        return urllib.parse.quote_from_bytes(raw, safe="/~")   # "~" as on every Python


def mtime_text(mtime_ns):
    """An mtime in seconds to the nanosecond, exactly as it is: -1.5 s is -1.500000000
    (divmod would floor it to -2 and 500000000)."""
    seconds, fraction = divmod(abs(mtime_ns), 10 ** 9)
    return "%s%d.%09d" % ("-" if mtime_ns < 0 else "", seconds, fraction)


def file_fields(relative, info):
    """The FILE_PLACEHOLDERS' values for a file: relative is its path as key text
    (key_text), info its ScanStat. {dir} is '' for a file at the top ('//' in a key is
    then made '/'). {mtime_epoch} is whole seconds, floored as the date is."""
    directory, _, name = relative.rpartition("/")
    stem, ext = os.path.splitext(name)
    return {"path": relative, "dir": directory, "name": name, "stem": stem, "ext": ext,
            "mtime_epoch": str(info.st_mtime_ns // 10 ** 9), "size": str(info.st_size),
            "inode": str(info.st_ino)}


def expand_template(text, hostname, upload_time, mtime, fields=None):
    """The text (a prefix, a header value) with {hostname}, {date}, {year}, ... of the
    upload time and {mtime_date}, {mtime_year}, ... of the file's mtime (seconds), all in
    UTC, and the file's fields (file_fields) filled in, in one pass: what a value holds
    is never expanded."""
    if "{" not in text:
        return text

    def value(match):
        name = match.group(1)
        if fields is not None and name in fields:
            return fields[name]
        if name == "hostname":
            return hostname
        if not name.startswith("mtime_"):
            return upload_time.strftime(TIME_PARTS[name])
        try:   # a file dated past 9999 (touch -d, a bad clock) or before year 1
            modified = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise FileError("its mtime (%d s since 1970) is out of the years 1 to 9999 that "
                            "{%s} can show: left in place; touch it to a real date" % (
                                mtime, name))
        return modified.strftime(TIME_PARTS[name[len("mtime_"):]])
    return PLACEHOLDER.sub(value, text)


def parse_destination(url):
    """s3://BUCKET[/PREFIX] to a Destination, or a UsageError saying what is wrong."""
    if not url.lower().startswith("s3://"):
        raise UsageError("destination %r is not an s3://BUCKET[/PREFIX] URL" % url)
    if re.search("[\udc80-\udcff]", url):   # bytes of argv that are not UTF-8
        raise UsageError("destination %r is not UTF-8, as keys are: give the prefix in UTF-8"
                         % url)
    bucket, _, prefix = url[5:].partition("/")
    if not BUCKET_NAME.match(bucket) or ".." in bucket:
        raise UsageError("bucket name %r in %r is not valid: 3-63 lower-case letters, digits, "
                         "dots and hyphens" % (bucket, url))
    check_template(prefix, url, PLACEHOLDERS + FILE_PLACEHOLDERS)
    whole_key = any(name in PATH_PLACEHOLDERS for name in PLACEHOLDER.findall(prefix))
    if prefix and not prefix.endswith("/") and not whole_key:
        prefix += "/"
    return Destination(bucket, prefix, whole_key)


def checked_key(key):
    """The key, or a FileError when it is longer than S3 allows."""
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise FileError("the key would be %d bytes, over S3's limit of %d: shorten the path; "
                        "it was left in place" % (size, MAX_KEY_BYTES))
    return key


def object_key(prefix, relative):
    """The key for a file: PREFIX + its path relative to SOURCE_DIR, '/' separated, as
    key text (key_text: from the bytes on disk, U+201B doubled, those that are not UTF-8
    escaped); checked_key's FileError for a key longer than S3 allows."""
    return checked_key(prefix + key_text(relative))


MAX_NUMBERED_KEYS = 100   # --if-exists number tries KEY, then at most this many more


def numbered_key(key, number):
    """KEY with a number before its extension: logs/app.log -> logs/app.1.log; a name
    without an extension gets it at the end: logs/app -> logs/app.1."""
    head, _, name = key.rpartition("/")
    stem, extension = os.path.splitext(name)
    return "%s%s%s.%d%s" % (head, "/" if head else "", stem, number, extension)


def gzip_key(key):
    """The key of a file's gzip: KEY.gz, checked (the 3 bytes may take it past S3's
    limit). KEY is key text already: never escaped again."""
    return checked_key(key + ".gz")


def candidate_keys(key, if_exists):
    """The keys a file may go to, in turn: KEY (checked already), then under --if-exists
    number KEY.1, KEY.2, ..., each checked (checked_key)."""
    yield key
    if if_exists == "number":
        for number in range(1, MAX_NUMBERED_KEYS + 1):
            yield checked_key(numbered_key(key, number))


def guess_content_type(name):
    return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"


# === The tree: the walk, the lock, the state folder ===


def globs(patterns):
    """The globs (--exclude, --include: fnmatch's case-sensitive syntax) as one compiled
    expression, or None for none: one match per name instead of one per glob."""
    if not patterns:
        return None
    return re.compile("|".join(fnmatch.translate(pattern) for pattern in patterns))


def matches(name, relative, expression):
    """True when the base name or the relative path matches a glob of globs()."""
    return expression is not None and (expression.match(name) is not None or (
        relative != name and expression.match(relative) is not None))


# The walk never leaves SOURCE_DIR, whatever a writer does to the tree meanwhile: SOURCE_DIR
# is opened once, every directory below it is reached from that descriptor one name at a
# time without following a symlink and checked against the device and inode the scan saw,
# and each file is opened, checked and unlinked through its own directory's descriptor.
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK


# A name that went, or became a symlink or something else than a directory, under the run.
CHANGED_ERRNOS = frozenset([errno.ENOENT, errno.ENOTDIR, errno.ELOOP])


# "1": the kernel lets nobody hard-link a file they could not read and write themselves.
PROTECTED_HARDLINKS = "/proc/sys/fs/protected_hardlinks"


# The removal (see remove_file): just before its unlink, a file's name is renamed to an
# aside name beside it, ".s3push-ID-NAME" (ID: the run's token and a count), so that what
# is unlinked is what that rename brought, checked, never whatever took the name meanwhile.
# One rename within the directory: no mkdir, no new inode, no mode bits, so it works on a
# full disk and on filesystems that ignore modes. A run killed part-way leaves the aside
# name: the next run removes it if the ledger says the server confirmed those bytes, else
# moves it as the file it was (its key made from NAME). The private folders of earlier
# versions (".s3push-handover-RUN-RANDOM") are scanned as part of their directory, and
# removed once empty.
ASIDE_PREFIX = ".s3push-"   # looked for before the excludes (".*")
ASIDE = re.compile(r"\.s3push-([0-9a-f]{8})[0-9a-f]{8}-(.+)\Z", re.S)
OLD_PRIVATE_DIR = re.compile(r"\.s3push-handover-[0-9a-f]{8}-[0-9a-f]{8}\Z")
NAME_MAX = 255   # bytes in a name: a longer aside name is not made


def key_name(name):
    """The name a file's key is made from: its own, or under an aside name the one it had."""
    if name.startswith(ASIDE_PREFIX):
        match = ASIDE.match(name)
        if match:
            return match.group(2)
    return name


def name_free(dir_fd, name):
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return True
    return False


def give_back(parent_fd, aside, name):
    """Move what an aside name holds back to name, never replacing what holds that name
    now (link() fails if it is taken); False when it stays (the name is taken, or this
    filesystem has no hard links). A directory of this account's goes back by rename to
    a free name (the rename would replace an empty directory made in between)."""
    try:
        info = os.stat(aside, dir_fd=parent_fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):   # only this account's: no other's takes a name
            if info.st_uid != os.geteuid() or not name_free(parent_fd, name):
                return False
            os.rename(aside, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        else:   # a symlink is linked itself, never followed
            os.link(aside, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd,
                    follow_symlinks=False)
            os.unlink(aside, dir_fd=parent_fd)
        return True
    except OSError:
        return False


class AsideNames(object):
    """This run's aside names: an id (the run's token and a count: no random draw a file)
    and the name. What the scan meets of earlier runs' is moved; this run's own are in
    use and left alone."""

    def __init__(self, recover):
        self.token = os.urandom(4).hex()
        self.count = itertools.count()
        self.recover = recover   # not under --dry-run: nothing is removed then

    def new(self, name):
        """(an id, the aside name for name, None where it would be too long a name)."""
        ident = "%s%08x" % (self.token, next(self.count) % 2 ** 32)
        aside = "%s%s-%s" % (ASIDE_PREFIX, ident, name)
        return ident, aside if len(os.fsencode(aside)) <= NAME_MAX else None

    def meet(self, fd, directory, name, stack):
        """True when the scan is to take name as a file: an earlier run's aside name. An
        earlier version's private folder of this account goes, if empty, or is scanned
        as part of its directory; anything else of ours is left alone."""
        match = ASIDE.match(name)
        if match:
            if match.group(1) == self.token:
                return False
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                return False
            if not stat.S_ISREG(info.st_mode) and self.recover:   # came in, not given back
                give_back(fd, name, match.group(2))
            return stat.S_ISREG(info.st_mode)
        if OLD_PRIVATE_DIR.match(name):
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                    return False
                if self.recover:
                    os.rmdir(name, dir_fd=fd)
                    return False
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    return False
            stack.append(directory.adopt(name, info))
        return False


class Directory(collections.namedtuple("Directory", "relative steps")):
    """A directory under SOURCE_DIR as the scan met it: its relative path ('' or ending in
    '/') and, for each step down from SOURCE_DIR, (name, device, inode) as seen then."""
    __slots__ = ()

    def child(self, name, info):
        return Directory(self.relative + name + "/",
                         self.steps + ((name, info.st_dev, info.st_ino),))

    def adopt(self, name, info):
        """An earlier version's private folder in this directory: what it holds keeps the
        relative paths (and so the keys) it had here."""
        return Directory(self.relative, self.steps + ((name, info.st_dev, info.st_ino),))


class ScanStat(collections.namedtuple("ScanStat",
                                      "st_dev st_ino st_size st_mtime_ns since_ns")):
    """What the scan keeps of a file's lstat: enough to tell later whether it is still the
    same, unchanged file (a whole stat_result is several times the size, and up to
    ORDER_WINDOW of them are held), and since_ns: when it was last written, as its age is
    judged (see future_dated)."""
    __slots__ = ()

    @property
    def st_mtime(self):
        return self.st_mtime_ns / 1e9


class Found(collections.namedtuple("Found", "directory name info")):
    """A regular file the scan found: its Directory, its name there and its ScanStat."""
    __slots__ = ()

    @property
    def relative(self):
        return self.directory.relative + self.name


def file_identity(info):
    """A file as the scan, the move and the journals know it: device, inode, size and
    mtime (a list: as a journal keeps it in JSON)."""
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns]


def same_version(before, after):
    """True when two stat results are one version of one file: device, inode, size and
    mtime (file_identity). Not ctime: the scan keeps none and a rename aside changes it;
    content_stamp tells whether the open file changed since it was read."""
    return file_identity(before) == file_identity(after)


def open_source(source):
    """A descriptor of SOURCE_DIR, resolved once (it may itself be a symlink): the whole run
    reaches its files through it, whatever becomes of the path."""
    return os.open(source, os.O_RDONLY | os.O_DIRECTORY)


def try_lock(fd):
    """An exclusive flock on fd (the run lock's file; SOURCE_DIR itself where the state
    folder cannot keep one, which any account that may read it could hold too); the
    kernel drops it when the process dies. False when another run holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def default_state_dir(environ):
    """$XDG_STATE_HOME/s3push, else ~/.local/state/s3push; None without a home."""
    base = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):   # the XDG spec: a relative path is to be ignored
        home = environ.get("HOME", "")
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".local", "state")
    return os.path.join(base, "s3push")


def others_may_write(info):
    """Whether an account other than this one may write in the folder of that stat (its
    owner, or its group or everyone by its mode): rename, replace or plant what it holds."""
    return info.st_uid != os.geteuid() or bool(info.st_mode & 0o022)


class StateFolder(collections.namedtuple("StateFolder", "path fd problem")):
    """The state folder (see default_state_dir), opened and checked once a run: its path,
    its descriptor (None: unusable, and problem says why). The run lock, the spill and
    the gzip spool use the descriptor; the ledger, the journals and the pending manifest
    objects, in a folder of their own below it (pair_folder), only when it is usable."""
    __slots__ = ()


def open_state_folder(path, make=True):
    """The StateFolder at path (None: no HOME), made 0700 if missing (with make); usable
    only if it is this account's and no other account may write in it. Never an error."""
    if path is None:
        return StateFolder(None, None, "no HOME and no --state-dir")
    try:
        if make:
            os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return StateFolder(path, None, "%s: %s" % (safe_name(path), exc.strerror or exc))
    info = os.fstat(fd)
    if others_may_write(info):
        os.close(fd)
        return StateFolder(path, None, "%s: owned by uid %d, mode %04o: it must be this "
                           "account's and writable by it alone" % (
                               safe_name(path), info.st_uid, stat.S_IMODE(info.st_mode)))
    return StateFolder(path, fd, None)


# Another run holding the run lock: its pid and since when (seconds since the epoch); each
# None when not known.
LockHolder = collections.namedtuple("LockHolder", "pid since")


def process_runs(pid):
    """Whether a process of that pid runs (another account's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def lock_holder(fd):
    """The LockHolder of the run lock's file, open as fd: the pid it wrote, and the file's
    mtime, which that write set as it took the lock. No other account writes in the state
    folder, and the kernel sets the mtime: nothing there to forge or to parse."""
    text = os.pread(fd, 32, 0).strip()
    pid = int(text) if text.isdigit() else 0
    # A pid that no longer runs was read in the instant between the lock taken and the
    # pid written over the last holder's: the holder has just begun.
    if not pid or not process_runs(pid):
        return LockHolder(None, None)
    return LockHolder(pid, os.fstat(fd).st_mtime)


def run_lock(folder_fd, name):
    """The exclusive flock on the lock file name in the state folder (open as folder_fd),
    where no other account can open it, let alone hold it. The kernel drops it when the
    process dies; the holder's pid is in the file, for the runs it keeps out, and its
    mtime says since when. Returns (descriptor, None), or (None, the holder's LockHolder)
    when another run holds it; OSError when the state folder cannot keep it."""
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=folder_fd)
    try:
        if not try_lock(fd):
            holder = lock_holder(fd)
            os.close(fd)
            return None, holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd, None


def source_lock_name(root_fd):
    """The run lock of SOURCE_DIR (open as root_fd): named by its device and inode, so
    that every spelling of its path shares it."""
    source = os.fstat(root_fd)
    return "run-%x-%x.lock" % (source.st_dev, source.st_ino)


def path_lock_name(source):
    """The lock taken before the first look at SOURCE_DIR (a look that may hang for good
    on a dead network mount): named by this host and SOURCE_DIR's path as given, made
    absolute (nothing resolved: a symlink or '..' resolved would be a look), % and /
    escaped; by their SHA-256 where that is long. The host: a state folder shared by
    hosts (a home over NFS) keeps no host out of its own directory."""
    name = "%s-%s" % tuple(text.replace("%", "%25").replace("/", "%2F") for text in (
        os.uname().nodename, os.path.join(os.getcwd(), source)))
    if len(os.fsencode(name)) > 200:
        import hashlib   # here alone: an idle tick does not load it
        name = hashlib.sha256(os.fsencode(name)).hexdigest()
    return "path-%s.lock" % name


DIRECTORY_CHANGED = ("a directory on its path was moved, replaced or swapped for a symlink "
                     "during the run; left alone")


def open_directory(root_fd, steps):
    """A descriptor of the directory that steps lead to from SOURCE_DIR (open as root_fd):
    each name opened relative to the one before, never through a symlink, and its device
    and inode checked against the scan's. TreeChanged when the tree changed."""
    fd = root_fd
    try:
        for name, device, inode in steps:
            child = os.open(name, DIRECTORY_FLAGS, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = child
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != (device, inode):
                raise OSError(errno.ENOENT, "replaced")
        if fd == root_fd:   # SOURCE_DIR itself: a descriptor of its own, for the caller
            fd = os.dup(root_fd)
    except BaseException as exc:
        if fd != root_fd:
            os.close(fd)
        if isinstance(exc, OSError) and exc.errno in CHANGED_ERRNOS:
            raise TreeChanged(DIRECTORY_CHANGED)
        raise
    return fd


def check_directory_in_place(root_fd, steps):
    """TreeChanged unless the directory that steps lead to from SOURCE_DIR is still where
    the scan saw it: its parent opened as open_directory does, and itself looked at with
    one fstatat (its device and inode the scan's, a directory, not a symlink)."""
    if not steps:
        return
    parent = open_directory(root_fd, steps[:-1]) if len(steps) > 1 else root_fd
    try:
        name, device, inode = steps[-1]
        try:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in CHANGED_ERRNOS:
                raise TreeChanged(DIRECTORY_CHANGED)
            raise
        if (info.st_dev, info.st_ino) != (device, inode) or not stat.S_ISDIR(info.st_mode):
            raise TreeChanged(DIRECTORY_CHANGED)
    finally:
        if parent != root_fd:
            os.close(parent)


def list_directory(fd):
    """The names in the directory open as fd, streamed (memory stays flat however many).

    os.scandir takes a descriptor from Python 3.7; before, /proc/self/fd/N is that very
    directory; without either, os.listdir(fd) reads it whole.
    """
    if os.scandir in os.supports_fd:
        with os.scandir(fd) as entries:   # on a duplicate of fd, which it closes
            for entry in entries:
                yield entry.name
        return
    proc = "/proc/self/fd/%d" % fd
    if not os.path.isdir(proc):
        yield from os.listdir(fd)
        return
    with os.scandir(proc) as entries:
        for entry in entries:
            yield entry.name


# Whether this account may remove the files of a directory: faccessat with the effective
# ids (ACLs, read-only mounts and immutable directories included); where this Python has
# no such call, each file is tried as before.
ACCESS_AT = os.access in os.supports_dir_fd and os.access in os.supports_effective_ids


class Removal(collections.namedtuple("Removal", "refused owner")):
    """What the scan knows of removing a directory's files: `refused`, why none can be
    removed (else None); `owner`, in a sticky directory of another account, the uid whose
    files alone may be removed (this account's), else None."""
    __slots__ = ()

    def allows(self, info):
        return self.refused is None and (self.owner is None or info.st_uid == self.owner)

    def reason(self):
        return self.refused or "a sticky directory: the files are another account's"


def removal_in(fd):
    """The Removal for the directory open as fd."""
    info, euid = os.fstat(fd), os.geteuid()
    owner = euid if info.st_mode & stat.S_ISVTX and euid not in (0, info.st_uid) else None
    if ACCESS_AT and not os.access(".", os.W_OK | os.X_OK, dir_fd=fd, effective_ids=True):
        readonly = os.fstatvfs(fd).f_flag & os.ST_RDONLY
        return Removal("a read-only filesystem" if readonly else
                       "no write permission on the directory", owner)
    return Removal(None, owner)


# Why a file is left for a later run: the reason labels of the metrics and the summary.
YOUNG = "young"               # younger than --min-age
SIZED_OUT = "size"            # outside --min-size, --max-size
WRITING = "writing"           # still open for writing (StillWritten)
LEFT_REASONS = (YOUNG, SIZED_OUT, WRITING)
FUTURE_SLACK = 5              # seconds an mtime may run ahead of this host's clock
FUTURE_NAMED = 5              # future-dated files a warning names; the rest are counted
DEFAULT_WARN_WAITING = 86400  # --warn-waiting: a still-written file this old is named


class FilesLeft(object):
    """The files left for a later run, by reason (LEFT_REASONS): how many, and when the
    oldest was last written (ns since the epoch; see future_dated), for its age in the
    metrics and the summary. Counts and a minimum, not lists: memory stays flat however
    many wait."""

    def __init__(self):
        self.counts = dict.fromkeys(LEFT_REASONS, 0)
        self.oldest = {}   # reason: since_ns of its oldest file

    def add(self, reason, since_ns):
        self.counts[reason] += 1
        if since_ns < self.oldest.get(reason, since_ns + 1):
            self.oldest[reason] = since_ns

    def add_all(self, other):
        for reason, count in other.counts.items():
            self.counts[reason] += count
        for reason, since_ns in other.oldest.items():
            self.oldest[reason] = min(since_ns, self.oldest.get(reason, since_ns))

    def oldest_seconds(self, now):
        """The age of the oldest file left for each reason at now (0: none left)."""
        return {reason: round(max(now - self.oldest[reason] / 1e9, 0), 3)
                if reason in self.oldest else 0 for reason in LEFT_REASONS}


class Selection(object):
    """Which files the scan passes on: names no exclude glob matches (given include globs,
    files one of them matches: every directory is still walked), written (see
    future_dated; now_ns: the clock at the start) at or before young_after_ns (ns since
    the epoch: --min-age), of min_size to max_size bytes. The files left for their age
    or size go to `left` (FilesLeft), and nothing else is made of them; the future-dated
    are counted, the first few named."""

    def __init__(self, excludes=(), includes=(), young_after_ns=float("inf"), min_size=0,
                 max_size=None, now_ns=float("inf")):
        self.excludes, self.includes = globs(excludes), globs(includes)
        self.young_after_ns = young_after_ns
        self.future_after_ns = now_ns + FUTURE_SLACK * 10 ** 9
        self.min_size = min_size
        self.max_size = float("inf") if max_size is None else max_size
        self.left = FilesLeft()
        self.future = []          # the first FUTURE_NAMED future-dated files' paths
        self.future_count = 0


def scan_reaches(relative, selection, folder=False):
    """Whether the scan, with selection's globs, would meet the file (or with folder, walk
    the folder) at relative, a '/'-separated path under SOURCE_DIR: no exclude glob
    matches a name on its way (see scan_entry), and for a file, given include globs, one
    of them matches it. Its age and size aside."""
    parts = relative.split("/")
    for end, name in enumerate(parts, 1):
        if matches(name, "/".join(parts[:end]), selection.excludes):
            return False
    return folder or selection.includes is None or \
        matches(parts[-1], relative, selection.includes)


UNREMOVABLE = "unremovable"   # scan_entry's answer for a file that would be kept


def future_dated(selection, info, relative):
    """When a file whose mtime is past selection.future_after_ns was last written, as its
    age is judged: its ctime where the mtime is still more than FUTURE_SLACK ahead of the
    clock (a writer's clock ahead, tar, touch), for no user can set a ctime: the kernel
    sets it at every change. Those are counted in selection, the first few named. The
    clock is read again: a file written during a long scan is not future-dated."""
    if info.st_mtime_ns <= time.time() * 1e9 + FUTURE_SLACK * 10 ** 9:
        return info.st_mtime_ns
    selection.future_count += 1
    if len(selection.future) < FUTURE_NAMED:
        selection.future.append(relative)
    return info.st_ctime_ns


def scan_entry(fd, directory, name, selection, stack, errors, removal, aside=False):
    """The Found for one name of a directory (open as fd) if it is a regular file to send
    (UNREMOVABLE for one this account could not remove: see Removal; None for one the
    Selection leaves, counted in selection.left); a subdirectory goes on stack. The
    scan's hot path: one lstat a name. aside: an earlier run's aside name, which no
    exclude skips."""
    if not aside and matches(name, directory.relative + name, selection.excludes):
        return None
    try:
        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None   # gone since the listing
    except OSError as exc:
        errors.append((directory.relative + name, FileError("cannot read (%s)"
                                                            % exc.strerror)))
        return None
    if stat.S_ISREG(info.st_mode):
        shown = key_name(name) if aside else name
        if selection.includes is not None and not matches(
                shown, directory.relative + shown, selection.includes):
            return None
        since = info.st_mtime_ns
        if since > selection.future_after_ns:
            since = future_dated(selection, info, directory.relative + shown)
        if since > selection.young_after_ns:
            selection.left.add(YOUNG, since)
            return None
        if not selection.min_size <= info.st_size <= selection.max_size:
            selection.left.add(SIZED_OUT, since)
            return None
        if not removal.allows(info):
            return UNREMOVABLE
        return Found(directory, name, ScanStat(info.st_dev, info.st_ino, info.st_size,
                                               info.st_mtime_ns, since))
    if stat.S_ISDIR(info.st_mode) and not aside:
        stack.append(directory.child(name, info))
    return None


def scan_directory(fd, directory, selection, stack, errors, asides):
    """The regular files of one directory (open as fd); its subdirectories go on stack.
    Names of ours (AsideNames) are met before the excludes (".*") would skip them. Files
    left for their age or size are counted in selection.left; files this account could not
    remove are counted, and go to errors once for the directory."""
    removal, kept = removal_in(fd), 0
    for name in list_directory(fd):
        aside = name.startswith(ASIDE_PREFIX) and asides.meet(fd, directory, name, stack)
        found = scan_entry(fd, directory, name, selection, stack, errors, removal, aside)
        if found is UNREMOVABLE:
            kept += 1
        elif found is not None:
            yield found
    if kept:
        errors.append((directory.relative, UnremovableError(
            "this account (uid %d) cannot remove %d file%s here (%s): left alone, not "
            "uploaded; give it write permission on the directory, or run s3push as the "
            "files' owner" % (os.geteuid(), kept, "" if kept == 1 else "s", removal.reason()),
            kept)))


def scan(root_fd, selection, errors, asides):
    """Yield a Found for each regular file under SOURCE_DIR (open as root_fd) that the
    Selection passes on, streaming.

    Symlinks are never followed; excluded names are skipped, and so are the directories
    they name; FIFOs, sockets and devices are never opened. Three descriptors at most are
    open at once, however deep or wide the tree. A directory that cannot be read or that
    changed under the scan goes to `errors` as (relative path, FileError or TreeChanged).
    """
    stack = [Directory("", ())]
    while stack:
        directory = stack.pop()
        try:
            fd = open_directory(root_fd, directory.steps)
        except TreeChanged as exc:
            errors.append((directory.relative, exc))
            continue
        except OSError as exc:
            errors.append((directory.relative, FileError("cannot read the directory (%s)"
                                                         % exc.strerror)))
            continue
        try:
            yield from scan_directory(fd, directory, selection, stack, errors, asides)
        finally:
            os.close(fd)


def remove_directory(root_fd, steps):
    """rmdir the directory steps lead to; False when it is not empty or not the same."""
    try:
        parent = open_directory(root_fd, steps[:-1])
    except (OSError, TreeChanged):
        return False
    name, device, inode = steps[-1]
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if (info.st_dev, info.st_ino) != (device, inode):
            return False
        os.rmdir(name, dir_fd=parent)
        return True
    except OSError:
        return False
    finally:
        os.close(parent)


def remove_empty_dirs(root_fd, directories):
    """rmdir the directories moved files were in, and their parents, never SOURCE_DIR; each
    through its parent's descriptor, and only while it is the directory the scan saw."""
    for steps in sorted({d.steps for d in directories}, key=len, reverse=True):
        while steps and remove_directory(root_fd, steps):
            steps = steps[:-1]


# === The order: oldest first ===


ORDER_WINDOW = 10000   # files held at once to send the oldest first; beyond, spilled
MAX_RUNS = 64          # sorted runs merged at once (each open, with an 8 KiB buffer)
SPILL_BATCH = 256      # records read or written at once: 64 runs hold 16,384 in memory


def unnamed_file(folder_fd, prefix):
    """A new file of the state folder, open for reading and writing, its name unlinked
    at once: only this process reaches it, and a killed run leaves nothing behind."""
    name = "%s%s" % (prefix, os.urandom(8).hex())
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=folder_fd)
    os.unlink(name, dir_fd=folder_fd)
    return fd


class Spill(object):
    """Sorted runs of files written to unnamed files of the state folder (created, then
    unlinked at once: a killed run leaves nothing), read back in order. A record is a
    marshal'ed tuple in the order files go: (since_ns, directory's relative path, name,
    directory's number, device, inode, size, mtime), ties broken by the path; the Directory
    objects stay in memory, one per directory, as the scan made them. Without a usable
    state folder (a StateFolder without a descriptor), no run can be written."""

    def __init__(self, state):
        self.folder_fd, self.problem = state.fd, state.problem
        self.directories = []   # by number
        self.numbers = {}       # id(Directory): number

    def record(self, found):
        directory = found.directory
        number = self.numbers.get(id(directory))
        if number is None:
            number = self.numbers[id(directory)] = len(self.directories)
            self.directories.append(directory)
        info = found.info
        return (info.since_ns, directory.relative, found.name, number, info.st_dev,
                info.st_ino, info.st_size, info.st_mtime_ns)

    def found(self, record):
        since, _, name, number, device, inode, size, mtime = record
        return Found(self.directories[number], name, ScanStat(device, inode, size, mtime,
                                                              since))

    def write(self, records):
        """A new run holding records (already in order): a file open for reading. They go
        SPILL_BATCH to a marshal'ed list (one call per record would cost more than all
        the sorting), each after its length: read back whole, a batch is decoded from
        memory (marshal.load from a file reads it piece by piece, 7 times slower)."""
        if self.folder_fd is None:
            raise OSError(errno.ENOENT, self.problem)
        run = os.fdopen(unnamed_file(self.folder_fd, ".s3push-spill-"), "w+b")
        try:
            records = iter(records)
            while True:
                batch = list(itertools.islice(records, SPILL_BATCH))
                if not batch:
                    break
                data = marshal.dumps(batch)
                run.write(len(data).to_bytes(8, "little"))
                run.write(data)
            run.flush()
            run.seek(0)
        except BaseException:
            run.close()
            raise
        return run

    @staticmethod
    def read(run):
        """The records of a run, in order, from its start; a run that cannot be read back
        stops the run (every file stays for the next one)."""
        try:
            run.seek(0)
            while True:
                size = int.from_bytes(run.read(8), "little")
                if not size:
                    return
                batch = marshal.loads(run.read(size))
                yield from batch
        except (OSError, EOFError, ValueError) as exc:
            raise TemporaryError("cannot read back the order spilled to the state folder "
                                 "(%s): files not moved yet are left for the next run"
                                 % (getattr(exc, "strerror", None) or exc))

    def merged(self, runs, held):
        """The records of the runs and of held (sorted), merged in order."""
        return heapq.merge(*[self.read(run) for run in runs] + [held])


def oldest_first(files, window, spill, notices):
    """The files oldest first (by their ScanStat's since_ns: the mtime, or the ctime of a
    future-dated file; ties by path), for O(n log n) time and O(window) memory: runs of
    `window` files are sorted and spilled; at most MAX_RUNS runs are kept (more are merged
    into one), and at the end the runs and the files still held are merged. A tree of
    fewer than `window` files is sorted in memory, with no spill. Where no run can be
    written (no state folder, a full disk), the order gives way, said once: what was
    held goes on, and then each window of files in its own order."""
    held, runs, spilling = [], [], True
    try:
        for found in files:
            held.append(spill.record(found))
            if len(held) < window:
                continue
            held.sort()
            if spilling:
                try:
                    if len(runs) == MAX_RUNS - 1:   # merged into one: a few files open
                        merged = spill.write(spill.merged(runs, held))
                        for run in runs:
                            run.close()
                        runs = [merged]
                    else:
                        runs.append(spill.write(held))
                    held = []
                    continue
                except OSError as exc:
                    notices.warning("cannot spill the order of a backlog of more than %d "
                                    "files to the state folder (%s): they go oldest first "
                                    "within each %d instead" % (
                                        window, exc.strerror or exc, window))
                    spilling = False
            for record in spill.merged(runs, held):   # what is held goes on as it is
                yield spill.found(record)
            for run in runs:
                run.close()
            runs, held = [], []
        held.sort()
        for record in spill.merged(runs, held):
            yield spill.found(record)
    finally:
        for run in runs:
            run.close()


# === State kept between runs: resume journals, the ledger ===
# A multipart upload cut off part-way (a kill, a reboot, a link that drops) resumes on the
# next run from a journal kept outside SOURCE_DIR, one folder per source and destination:
# the file it was for (device, inode, size, mtime), its key and upload id, and each part
# the server confirmed (number, range, MD5, CRC32 or SHA-256, ETag). The server is asked nothing
# (no ListParts): PutObject-only keys resume too. A recorded part is reused only while
# the file's bytes there still have its checksum; from the first that differs, all are
# sent again.

JOURNAL_VERSION = 1
MAX_JOURNAL_BYTES = 16 * MIB   # 10,000 parts take about 2 MiB
DEFAULT_RESUME_DAYS = 7


def open_journal(path):
    """A journal to read, never through a symlink nor a FIFO; ValueError for what is no
    regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("it is no regular file")
    return open(fd, "rb")


class JournalPart(collections.namedtuple("JournalPart", "offset length check_hex etag")):
    """One part the server confirmed, as the journal recorded it: check_hex is its MD5,
    CRC32 or SHA-256 (the journal's "checksum"), in hex."""
    __slots__ = ()


def parse_journal(data):
    """(header, {part number: JournalPart}) from a journal's bytes; ValueError (or
    KeyError, TypeError) when it is not a whole journal of this version. A last line cut
    short (a kill in the middle of an append) was never written."""
    lines = data.split(b"\n")[:-1]
    if not lines:
        raise ValueError("it is empty")
    header = json.loads(lines[0].decode("utf-8"))
    if not isinstance(header, dict) or header.get("s3push_journal") != JOURNAL_VERSION:
        raise ValueError("it was written by another version of s3push")
    for name, kind in (("key", str), ("upload_id", str), ("part_size", int),
                       ("headers", str), ("file", list), ("steps", list), ("name", str),
                       ("created", (int, float))):
        if not isinstance(header.get(name), kind):
            raise ValueError("its %s is missing" % name)
    checksum = header.setdefault("checksum", MD5.name)   # journals before CRC32 had MD5s
    if checksum not in CHECKSUMS:
        raise ValueError("its checksum is unknown")
    parts = {}
    for line in lines[1:]:
        record = json.loads(line.decode("utf-8"))
        check_hex = str(record[checksum])
        bytes.fromhex(check_hex)
        parts[int(record["part"])] = JournalPart(int(record["offset"]),
                                                 int(record["length"]), check_hex,
                                                 str(record["etag"]))
    return header, parts


def part_line(number, part, check):
    return json.dumps({"part": number, "offset": part.offset, "length": part.length,
                       check.name: part.check_hex, "etag": part.etag}) + "\n"


def checksum_of_range(fd, offset, length, check):
    """The check's value of a range of the file, in hex."""
    return digest_range(fd, offset, length, check).value.hex()


class Resumption(collections.namedtuple("Resumption", "upload_id created parts")):
    """A multipart upload to go on with: its id, when it was created (time.time()), and
    {part number: JournalPart} of the parts the server holds."""
    __slots__ = ()


class Journal(object):
    """The journal of one file's multipart upload. A write that fails turns it off for
    the rest of its upload (the upload goes on, as without a journal): say() tells."""

    def __init__(self, path, found, info, max_age, say):
        self.path, self.found, self.identity = path, found, file_identity(info)
        self.max_age, self.say = max_age, say
        self.lock = threading.Lock()
        self.fd = None
        self.checksum = None   # the upload's: set by start()
        self.pending = None    # the text start() left for the first confirmed part to write

    def load(self):
        """(header, parts) of the journal kept for this very file, or None (also when its
        upload is older than max_age: a lifecycle rule has likely removed it)."""
        try:
            with open_journal(self.path) as handle:
                data = handle.read(MAX_JOURNAL_BYTES + 1)
            if len(data) > MAX_JOURNAL_BYTES:
                raise ValueError("it is too large")
            header, parts = parse_journal(data)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self.unusable(exc.strerror)
        except (ValueError, KeyError, TypeError) as exc:
            return self.unusable(exc if isinstance(exc, ValueError) else "it is corrupt")
        if header["file"] != self.identity or time.time() - header["created"] > self.max_age:
            return None
        return header, parts

    def unusable(self, why):
        self.say("the resume journal %s of %s is unusable (%s): its upload starts over"
                 % (self.path, safe_name(self.found.relative), one_line(why)))
        return None

    def start(self, key, plan, resumption, once_confirmed=False):
        """Write the journal afresh (a new file renamed over the old): the upload, how it
        is cut into parts, and the parts of it that are reused. once_confirmed: only when
        the first part is confirmed (the journal there until then stays the one resumed
        should this upload fail before that)."""
        header = {"s3push_journal": JOURNAL_VERSION, "key": key,
                  "upload_id": resumption.upload_id, "created": resumption.created,
                  "part_size": plan.part_size, "headers": plan.headers,
                  "checksum": plan.checksum.name, "file": self.identity,
                  "steps": [list(step) for step in self.found.directory.steps],
                  "name": self.found.name}
        text = json.dumps(header) + "\n" + "".join(part_line(n, p, plan.checksum) for n, p
                                                   in sorted(resumption.parts.items()))
        with self.lock:
            self.close_file()
            self.checksum = plan.checksum
            self.pending = text if once_confirmed else None
            if not once_confirmed:
                self.write_start(text)

    def write_start(self, text):
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            write_atomically(self.path, text.encode("utf-8"), 0o600)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            self.fail(exc)

    def confirmed(self, number, offset, length, sent):
        """Append one part the server confirmed: one write of one line, then fsync."""
        part = JournalPart(offset, length, sent.value.hex(), sent.etag)
        with self.lock:
            if self.pending is not None:
                self.write_start(self.pending)
                self.pending = None
            if self.fd is not None:
                try:
                    os.write(self.fd, part_line(number, part, self.checksum).encode("utf-8"))
                    os.fsync(self.fd)
                except OSError as exc:
                    self.fail(exc)

    def fail(self, exc):
        self.close_file()
        self.say("cannot write resume journals in %s (%s): an upload cut off part-way "
                 "will start over" % (os.path.dirname(self.path), exc.strerror))

    def close(self):
        with self.lock:
            self.close_file()

    def close_file(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def remove(self):
        """The upload completed, or is gone: nothing to resume any more."""
        with self.lock:
            self.close_file()
            self.pending = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.fail(exc)


class NoJournal(object):
    """What stands for a journal where none is kept (--resume-days 0, no state folder,
    no MD5 to check parts by)."""

    def __init__(self, found):
        self.found = found

    def load(self):
        return None

    def start(self, key, plan, resumption, once_confirmed=False):
        pass

    def confirmed(self, number, offset, length, sent):
        pass

    def remove(self):
        pass

    def close(self):
        pass


def journal_is_stale(root_fd, path, now, max_age):
    """Whether a journal is of no more use: unusable, its upload older than max_age, or
    the file it was kept for gone from SOURCE_DIR or changed (reached as the scan reaches files,
    never through a symlink)."""
    try:
        with open_journal(path) as handle:
            header, _ = parse_journal(handle.read(MAX_JOURNAL_BYTES))
        steps = [(str(name), int(device), int(inode)) for name, device, inode in
                 header["steps"]]
    except (ValueError, KeyError, TypeError):
        return True
    if now - header["created"] > max_age:
        return True
    try:
        parent = open_directory(root_fd, steps)
    except TreeChanged:
        return True
    try:
        info = os.stat(header["name"], dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return True
    finally:
        os.close(parent)
    return file_identity(info) != header["file"]   # another file, or changed: not resumed


def reusable_parts(journal, key, fd, plan):
    """The Resumption of an upload the journal holds for this file, key, part size and
    headers, with the parts whose bytes in the file still have the recorded value, up to
    the first that differs; None when there is none."""
    loaded = journal.load()
    if loaded is None:
        return None
    header, recorded = loaded
    if (header["key"], header["part_size"], header["headers"], header["checksum"]) != \
            (key, plan.part_size, plan.headers, plan.checksum.name):
        return None
    reused = {}
    for number, offset, length in plan.ranges:
        part = recorded.get(number)
        if part is None:
            continue   # in flight when the run was cut off
        if (part.offset, part.length) != (offset, length) or \
                checksum_of_range(fd, offset, length, plan.checksum) != part.check_hex:
            break   # rewritten here: this part and every one after it are sent again
        reused[number] = part
    return Resumption(header["upload_id"], header["created"], reused)


def headers_fingerprint(headers):
    return hashlib.sha256(json.dumps(sorted(headers.items())).encode("utf-8")).hexdigest()


def pair_folder(state_dir, source, destination):
    """The folder under the state folder of one SOURCE_DIR and destination (a Destination):
    the resume journals of its uploads, its ledger, and its runs' manifest objects not yet
    sent."""
    name = hashlib.sha256(b"\0".join([os.fsencode(os.path.realpath(source)), (
        "s3://%s/%s" % (destination.bucket, destination.prefix)).encode("utf-8")]))
    return os.path.join(state_dir, name.hexdigest()[:24])


PAIR_HOST = "host"   # in a pair_folder: the name of the host whose run kept it last


def mark_host(pair, source, notices):
    """Note this host's name in the pair folder, with a warning where another host's is
    there: hosts that share a state folder (a home over NFS) share the pair folder of a
    SOURCE_DIR path and destination, and each one's run drops the others' records. Said
    once after a host is renamed, or a container made anew, at every run where hosts share."""
    path = os.path.join(pair, PAIR_HOST)
    host = os.fsencode(os.uname().nodename)
    try:
        with open(path, "rb") as handle:
            last = handle.read(256)
    except FileNotFoundError:
        last = None
    except OSError:
        return
    if last == host:
        return
    if last:
        notices.warning("the state of %s in %s was kept last by host %s, not %s: hosts that "
                        "share a state folder drop each other's records (give each its own "
                        "--state-dir); said once if this host was renamed" % (
                            safe_name(source), safe_name(os.path.dirname(pair)),
                            safe_name(last), safe_name(host)))
    try:
        write_atomically(path, host, 0o600)
    except OSError:
        pass   # a full state folder: said by the ledger


class Journals(object):
    """The journals of one source and destination, in their pair_folder."""

    def __init__(self, folder, max_age, say):
        self.folder = folder
        self.max_age, self.say = max_age, say

    def for_file(self, found, info):
        name = hashlib.sha256(name_bytes(found.relative)).hexdigest()[:32] + ".journal"
        return Journal(os.path.join(self.folder, name), found, info, self.max_age, self.say)

    def sweep(self, root_fd, now):
        """Remove the journals of no more use (see journal_is_stale)."""
        try:
            names = [n for n in os.listdir(self.folder) if n.endswith(".journal")]
        except OSError:
            return
        for name in names:
            path = os.path.join(self.folder, name)
            try:
                if journal_is_stale(root_fd, path, now, self.max_age):
                    os.unlink(path)
            except OSError:
                pass


# The ledger: before anything is renamed or removed, what the server confirmed of a file
# is appended to it, one JSON line, fsync'ed (a group of workers' lines share one fsync):
# the key, the file's identity (device, inode, size, mtime, ctime), its aside name, the
# checksum that proved it, ETag and VersionId; the manifest's line is made from it. A file
# the ledger vouches for is removed without another PUT, so a run killed between an
# upload and its removal costs nothing: no 412, no numbered copy, no second object. It is
# a file of the state folder beside the resume journals; at the end of a run it keeps only
# the records whose file is still there.

LEDGER_NAME = "confirmed.jsonl"
LEDGER_COMPACT = MIB   # about 2,500 records: beyond, written anew without those resolved
MANIFEST_FIELDS = ("path", "bucket", "key", "size", "mtime", "checksum", "etag", "version_id",
                   "compression", "compressed_size")   # and the run's tag and time


def ledger_identity(info):
    """The file a record is of: file_identity and the ctime (kept for the reader of the
    ledger; a chmod moves it, so it proves nothing the content check does not)."""
    return file_identity(info) + [info.st_ctime_ns]


def places(record):
    """The relative paths a record's file may be at: its name's, and its aside name's."""
    return [record["dir"] + name for name in (record["name"], record["aside"]) if name]


def at_its_place(record, info, endpoint):
    """Whether a record found by the file's relative path (see places) is of that file
    (info: its fstat): the same size and mtime, and the same endpoint (another server
    with a bucket of that name never got it). Not its device and inode: vfat and exFAT
    hand inode numbers out anew at each mount, and a card may come back as another
    device. Neither those nor the times are proof: what was sent is checked again
    (content_proven)."""
    return record.get("endpoint") == endpoint and \
        record["file"][2:4] == [info.st_size, info.st_mtime_ns]


def content_proven(fd, size, record):
    """Whether the file open as fd (size bytes) holds what the record says the server
    confirmed: its proof computed again from the file (for a gzip, the file's own
    CRC32, which the gzip's trailer carried); False where it cannot be (no MD5 here)."""
    (name, value), = record["checksum"].items()
    if record.get("file_crc32"):
        name, value = "crc32", record["file_crc32"]
    part_size = record.get("part_size") if name in OF_PARTS else None
    check = OF_PARTS[name] if part_size else CHECKSUMS.get(name)
    if check is None or check.new() is None:   # FIPS forbids MD5
        return False
    if not part_size:
        return checksum_of_range(fd, 0, size, check) == value
    ranges = part_ranges(size, part_size)   # the parts' hashes, composed as the upload's were
    values = [digest_range(fd, offset, length, check).value for _, offset, length in ranges]
    return check.complete(values, [length for _, _, length in ranges])[1] == value


def still_there(root_fd, record):
    """Whether the record's file may still be at its name or its aside name, as it was
    (size, mtime): its record is kept for a later run. Only a file seen gone or changed
    drops it; a folder that cannot be read now (a card pulled, a share down) keeps it.
    Each folder is opened by its name, never through a symlink."""
    fd = os.dup(root_fd)
    try:
        for name in record["dir"].split("/")[:-1]:
            child = os.open(name, DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        for name in (record["name"], record["aside"]):
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False) if name else None
            except FileNotFoundError:
                continue
            if info is not None and record["file"][2:4] == [info.st_size, info.st_mtime_ns]:
                return True
        return False
    except OSError as exc:
        return exc.errno not in CHANGED_ERRNOS
    except (ValueError, KeyError, TypeError):
        return False
    finally:
        os.close(fd)


class Ledger(object):
    """The ledger of one source and destination (see above). A record is a dict: the
    manifest's fields, and "id", "endpoint", "file" (ledger_identity), "dir" (the
    relative path of its folder), "name", "aside", and what proves the bytes again
    ("part_size", "file_crc32")."""

    def __init__(self, folder, notices, problem=None):
        self.path = os.path.join(folder, LEDGER_NAME) if folder else None
        self.notices, self.problem = notices, problem   # problem: why there is no folder
        self.lock = threading.Lock()        # the file and the records
        self.sync_lock = threading.Lock()   # one fsync at a time, for all lines before it
        self.fd = None
        self.retired = []   # descriptors replaced or dropped: closed by sync or close
        self.size = 0   # of the file: where a line cut short is cut back to
        self.written = self.synced = 0   # lines written, and made durable
        self.records = {}   # relative path (see places): the records not yet resolved
        self.compact_at = LEDGER_COMPACT   # bytes

    def open(self):
        """Read what earlier runs left and open the ledger for appending; without it (no
        state folder: self.problem) files still move, with a warning."""
        try:
            if self.path is None:
                raise OSError(errno.ENOENT, self.problem or "no state folder")
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT |
                              os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            self.load(self.fd)
        except OSError as exc:
            self.fail(exc)
            self.read_only()

    def read_only(self):
        """What earlier runs recorded, where the ledger can be read but not written (a
        read-only or full state folder): their files are still removed without a PUT."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, TypeError):
            return
        try:
            self.load(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def load(self, fd):
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0) if size else b""
        end = data.rfind(b"\n") + 1   # a line cut short by a kill was never acted upon
        if end != len(data) and fd == self.fd:
            os.ftruncate(fd, end)
        self.size = end
        exported = set()
        for line in data[:end].splitlines():
            try:
                record = json.loads(line.decode("utf-8", "surrogateescape"))
                if "exported" in record:
                    exported.add(record["exported"])
                else:
                    self.keep(record)
            except (ValueError, KeyError, TypeError):
                continue
        for record in self.unresolved():
            record["line_written"] = record.get("line_written") or record["id"] in exported

    def fail(self, exc):
        if self.fd is not None:
            try:   # the lines written so far: their files are removed all the same
                os.fsync(self.fd)
            except OSError:
                pass
        self.close_file()
        self.notices.warning(
            "cannot keep the ledger of confirmed uploads%s (%s): files still move, but one "
            "whose run is killed between its upload and its removal goes up again" % (
                " " + safe_name(self.path) if self.path else "", exc.strerror or exc),
            once="ledger")

    def keep(self, record):
        for place in places(record):
            self.records[place] = record

    def unresolved(self):
        return list({record["id"]: record for record in self.records.values()}.values())

    def vouching(self, found, fd, info, endpoint):
        """The record of an earlier upload of these very bytes of this very file, or None
        (see at_its_place, content_proven: the file is read again only then)."""
        with self.lock:
            record = self.records.get(found.relative)
        if record is None or not at_its_place(record, info, endpoint):
            return None
        with CPUS.wide(info.st_size):
            return record if content_proven(fd, info.st_size, record) else None

    def write(self, record):
        """Keep a record and write its line, not yet durable: the number sync() takes
        (0: the ledger is off, and the record is kept in memory only, said once). It is
        synced before its file is renamed or removed."""
        with self.lock:
            self.keep(record)
            return self.append(record)

    def exported(self, record):
        """The record's manifest line is written (not fsync'ed: lost, it is written again)."""
        record["line_written"] = True
        with self.lock:
            self.append({"exported": record["id"]})

    def append(self, record):
        """Write one whole line; its number, or 0 when the ledger is off (lock held)."""
        if self.fd is None:
            return 0
        data = self.lines([record])
        try:
            if os.write(self.fd, data) != len(data):   # a full disk: the line cut back
                os.ftruncate(self.fd, self.size)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            self.fail(exc)
            return 0
        self.size += len(data)
        self.written += 1
        return self.written

    def sync(self, line):
        """Make line durable: one fsync covers every line written before it started."""
        if self.synced >= line:   # another's fsync did (synced only grows)
            return
        with self.sync_lock:
            if self.synced >= line:
                return
            with self.lock:   # compact() may replace the file meanwhile: see retire
                fd, upto = self.fd, self.written
                self.close_retired()   # no fsync uses them: this one holds sync_lock
            if fd is None:
                return
            try:
                os.fsync(fd)
            except OSError as exc:
                with self.lock:
                    self.fail(exc)
                return
            self.synced = max(self.synced, upto)

    def resolved(self, record):
        """The record's file is gone: nothing left to vouch for. Past LEDGER_COMPACT bytes
        the ledger is written anew with the records left (those of files in flight): on
        a long run it stays small."""
        with self.lock:
            for place in places(record):
                if self.records.get(place) is record:
                    del self.records[place]
            if self.fd is not None and self.size > self.compact_at:
                self.compact()

    def compact(self):
        """Write the ledger anew with the records not yet resolved (lock held)."""
        data = self.lines(self.unresolved())
        try:
            write_atomically(self.path, data, 0o600)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:   # a full state folder: appending to the old one goes on
            self.compact_at = self.size + LEDGER_COMPACT
            return
        self.retire()
        self.fd, self.size = fd, len(data)
        self.synced = self.written   # what is left was fsync'ed by write_atomically

    @staticmethod
    def lines(records):
        return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode(
            "utf-8", "surrogateescape")

    def close(self, root_fd):
        """Keep only the records whose file is still there (kept at the last instant, or
        not reached by this run), in a ledger written anew; none: no ledger."""
        with self.sync_lock, self.lock:   # no fsync at work on what is closed here
            fd, self.fd = self.fd, None
            self.close_retired()
        if fd is None:
            return
        os.close(fd)
        kept = [record for record in self.unresolved() if still_there(root_fd, record)]
        try:
            if kept:
                write_atomically(self.path, self.lines(kept), 0o600)
            else:
                os.unlink(self.path)
        except OSError as exc:   # the old one stays: its records are checked again
            self.notices.warning("cannot rewrite the ledger %s (%s)" % (
                safe_name(self.path), exc.strerror or exc), once="ledger")

    def close_file(self):
        self.retire()
        self.fd = None

    def retire(self):
        """Drop the descriptor (lock held), never closing it while an fsync may still be at
        work on it (one that took it before the lock): at once where no sync runs (the
        order of the locks is sync's: only a try here), else by that sync or by close."""
        if self.fd is not None:
            self.retired.append(self.fd)
        if self.sync_lock.acquire(False):
            try:
                self.close_retired()
            finally:
                self.sync_lock.release()

    def close_retired(self):
        """Close the descriptors retired (both locks held: no fsync can be at work on
        them)."""
        for old in self.retired:
            os.close(old)
        self.retired = []


# === The manifest ===
# --manifest FILE: a JSON line per file the server confirmed, each written whole before
# its file is unlinked. Runs of other sources may append to the same file: an flock on it
# serializes their appends. A run's lines carry its id; --manifest-key sends them as one
# object, and until the server confirmed it a small record in the pair folder lets a
# later run send it (see PendingObjects).

PENDING_VERSION = 1
PENDING_SUFFIX = ".manifest-object"
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{16}\Z")


def new_run_id(started):
    """A run's id: its start (UTC, to the second, so that ids sort as the runs began) and
    64 random bits, so that no two runs of a fleet share one in its lifetime."""
    return "%s-%s" % (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started)),
                      os.urandom(8).hex())


MANIFEST_LOCK_WAIT = 10.0   # seconds: runs hold it for one line; beyond, it is held on purpose


def flock_or_not(fd, operation):
    """flock(fd, operation), waiting at most MANIFEST_LOCK_WAIT: False where the
    filesystem has no flock (some network filesystems), None when it stays held (by an
    account that may read the file: it must not stall the run); the caller goes on
    without it."""
    give_up, pause = time.monotonic() + MANIFEST_LOCK_WAIT, 0.005
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return False
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            if time.monotonic() > give_up:
                return None
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def no_room(fd):
    """Whether the filesystem of the file open as fd has not one block left for this
    account (root may use the reserved ones); False where it tells no size (some FUSE)."""
    info = os.fstatvfs(fd)
    return info.f_blocks > 0 and (info.f_bfree if os.geteuid() == 0 else info.f_bavail) == 0


def whole_lines_end(fd, end):
    """Where the last whole line of the file open as fd (end bytes long) ends: end itself,
    or just after its last newline (0 when there is none)."""
    if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
        return end   # nearly always: one byte read, not a block
    while end > 0:
        start = max(0, end - BLOCK_BYTES)
        block = os.pread(fd, end - start, start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def open_manifest(path):
    """A descriptor to append to the manifest at path (made 0600), never through a symlink
    (a link planted there would have this run append where it points): ConfigError for
    a symlink or what is no regular file, OSError when it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW |
                     os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise ConfigError("--manifest %s is a symlink: not followed; name the file "
                              "itself" % safe_name(path))
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError("--manifest %s is not a regular file: name one" % safe_name(path))
    return fd


class ManifestPlace(collections.namedtuple("ManifestPlace", "path device inode offset")):
    """Where a run's lines are: in the manifest at path (absolute), that very file (device,
    inode), from offset on (its size when the run opened it)."""
    __slots__ = ()


class Manifest(object):
    """--manifest FILE: a JSON line per file the server confirmed, appended and fsync'ed
    before the file is unlinked, so that every removed file has its line (a line whose
    file was then kept, e.g. a writer came at the last moment, says what is on the
    server all the same). open() before the first line; a line that cannot be written
    whole is cut off again and keeps its file: the record is part of the move."""

    def __init__(self, path, source, run, notices):
        self.path, self.source, self.run, self.notices = path, source, run, notices
        self.lock = threading.Lock()
        self.fd = None
        self.place = None   # a ManifestPlace, once open
        self.unlocked = False
        self.written = 0   # lines this run wrote

    def open(self):
        """Open the file (see open_manifest) and cut off a line an earlier run was cut
        short in; ConfigError, or OSError."""
        with self.lock:
            if self.fd is not None:
                return
            fd = open_manifest(self.path)
            try:
                if no_room(fd):   # else every file would be uploaded, then kept
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                info = os.fstat(fd)
                locked = self.lock_file(fd, fcntl.LOCK_EX)
                try:
                    offset = self.mend(fd)
                finally:
                    if locked:
                        fcntl.flock(fd, fcntl.LOCK_UN)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            self.place = ManifestPlace(os.path.abspath(self.path), info.st_dev, info.st_ino,
                                       offset)

    def lock_file(self, fd, operation):
        if self.unlocked:   # held past the wait once: not waited for again this run
            return False
        locked = flock_or_not(fd, operation)
        self.unlocked = locked is None
        if locked is None:
            self.notices.warning("the manifest %s stayed locked by another process for %d s "
                                 "(an account that may read it can hold its lock): written "
                                 "without the lock; let no other account read it"
                                 % (safe_name(self.path), MANIFEST_LOCK_WAIT), once="flock")
        elif not locked:
            self.notices.note("cannot flock the manifest %s: the runs that share it must "
                              "not run at once" % safe_name(self.path))
        return bool(locked)

    def mend(self, fd):
        """The file's size once a last line cut short (a run stopped in the middle of
        writing it, before its file could go) is cut off; never glued to the next."""
        end = os.fstat(fd).st_size
        whole = whole_lines_end(fd, end)
        if whole != end:
            os.ftruncate(fd, whole)
            self.notices.warning("the manifest %s ended in %d bytes of a line cut short (a "
                                 "run stopped while writing it; its file was kept): cut off"
                                 % (safe_name(self.path), end - whole))
        return whole

    def append(self, data):
        """Append data (whole lines) and fsync, whole or not at all: after a short write
        or an error the file is cut back to where it was; OSError then."""
        locked = self.lock_file(self.fd, fcntl.LOCK_EX)
        try:
            end = self.mend(self.fd)
            try:
                view = memoryview(data)
                while view:   # a short count: the next write says why (ENOSPC, EDQUOT)
                    view = view[os.write(self.fd, view):]
                os.fsync(self.fd)
            except BaseException:   # an error, or SIGTERM between two writes
                try:
                    os.ftruncate(self.fd, end)
                except OSError:
                    pass   # the next append, of this run or a later one, cuts it off
                raise
        finally:
            if locked:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def write(self, record):
        """Write the line of a ledger record (see Ledger), under this run's tag and time
        (a line written late, by the run that found the file's upload confirmed, is in its
        own run's --manifest-key object); True once it is written."""
        fields = {name: record[name] for name in MANIFEST_FIELDS}
        if "path_bytes" in record:   # a path that is not UTF-8 (see confirmation)
            fields["path_bytes"] = record["path_bytes"]
        line = json.dumps(dict(fields, time=time.strftime(ISO_SECONDS, time.gmtime()),
                               run=self.run), sort_keys=True) + "\n"
        try:
            self.open()
            with self.lock:
                self.append(line.encode("utf-8", "surrogateescape"))
                self.written += 1
        except OSError as exc:
            raise ManifestError("cannot write the manifest %s (%s): kept, uploaded, and the "
                                "run stops here; the record is part of the move"
                                % (safe_name(self.path), exc.strerror or exc))
        return True

    def close(self):
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class NoManifest(object):
    """No --manifest: nothing recorded."""
    place = None

    def open(self):
        pass

    def write(self, record):
        return False   # no line: a later run with --manifest writes it, if still vouched

    def close(self):
        pass


def line_run(line):
    """The run of a manifest line; None when it is no JSON object."""
    try:
        record = json.loads(line.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return None
    return record.get("run", "") if isinstance(record, dict) else None


def run_lines(place, run, notices):
    """The lines of run in the manifest at place, in order; None when the file there is
    no longer the one the run wrote to (rotated away, or cut shorter than where the run
    began): its lines are gone. OSError. A line that does not parse is skipped (and the
    operator told): s3push's own lines are whole (see Manifest.append), so it is none of
    this run's, and failing on it would stop every later upload until someone edits it."""
    fd = os.open(place.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as handle:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (place.device, place.inode) or \
                info.st_size < place.offset:
            return None
        locked = flock_or_not(fd, fcntl.LOCK_SH)   # no line half written meanwhile
        if locked is None:
            notices.warning("the manifest %s stayed locked by another process: read without "
                            "its lock" % safe_name(place.path), once="flock-read")
        handle.seek(place.offset)
        lines, bad = [], 0
        for line in handle:
            if not line.endswith(b"\n"):
                break   # cut short by a run that stopped: the next append cuts it off
            found = line_run(line)
            bad += found is None
            if found == run:
                lines.append(line)
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
    if bad:
        notices.warning("the manifest %s holds lines that are not s3push's JSON: skipped"
                        % safe_name(place.path), once="manifest-bad-lines")
    return lines


class ManifestObject(collections.namedtuple("ManifestObject", "run key place")):
    """A run's --manifest-key object: its run id, its key (the template filled in with
    that run's id and start) and the ManifestPlace of its lines."""
    __slots__ = ()


class PendingObjects(object):
    """The --manifest-key objects of one source and destination not yet confirmed: a
    small JSON file each in their pair_folder, written (and the folder fsync'ed) before
    the run's first manifest line and removed once the server confirmed the object, so
    that the object of a run whose upload failed, or that was killed, is sent by the
    next. Runs of SOURCE_DIR hold its run lock: none sends another's while it runs."""

    def __init__(self, folder):
        self.folder = folder

    def path(self, run):
        return os.path.join(self.folder, run + PENDING_SUFFIX)

    def add(self, item):
        """OSError when the record cannot be kept."""
        text = json.dumps({"s3push_pending": PENDING_VERSION, "run": item.run,
                           "key": item.key, "manifest": list(item.place)})
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        write_atomically(self.path(item.run), text.encode("utf-8"), 0o600)

    def earlier(self, run, notices):
        """The ManifestObjects of the other runs, the oldest first; a record that does
        not parse is dropped, one that cannot be read is left (a warning each)."""
        try:
            names = sorted(os.listdir(self.folder))
        except OSError:   # none yet; or a folder this account cannot read, said elsewhere
            return []
        items = []
        for name in names:
            other = name[:-len(PENDING_SUFFIX)]
            if not name.endswith(PENDING_SUFFIX) or not RUN_ID.match(other) or other == run:
                continue
            try:
                with open(self.path(other), "rb") as handle:
                    record = json.loads(handle.read(MAX_JOURNAL_BYTES).decode("utf-8"))
                items.append(ManifestObject(str(record["run"]), str(record["key"]),
                                            ManifestPlace(*record["manifest"])))
            except OSError as exc:
                notices.warning("cannot read %s, the record of a --manifest-key object not "
                                "sent (%s): left for a later run" % (self.path(other),
                                                                     exc.strerror or exc))
            except (ValueError, KeyError, TypeError) as exc:
                notices.warning("the record %s of a --manifest-key object not sent is "
                                "unusable (%s): dropped" % (self.path(other), one_line(exc)))
                self.remove(other)
        return items

    def remove(self, run):
        try:
            os.unlink(self.path(run))
        except OSError:
            pass   # left: the next run sends the same lines to the same key again


# === The run's settings and its report ===
# Option checks, object headers and key templates; the Tally of the run and the Report
# that says it; ObjectSettings, how every file's object goes up.


MAX_METADATA_BYTES = 2048   # S3: user metadata, keys and values, as UTF-8
MAX_TAGS = 10               # S3: tags on one object


def check_upload_options(options, now):
    """A UsageError, naming the option, for what S3 would refuse of the upload options
    taken together (each value alone was checked as it was parsed)."""
    if options.sse_kms_key_id and not (options.sse or "").startswith("aws:kms"):
        raise UsageError("--sse-kms-key-id goes with --sse aws:kms (or aws:kms:dsse)")
    for option, pairs in (("--metadata", options.metadata), ("--tag", options.tag)):
        for key, value in pairs:
            check_template(value, "%s %s=%s" % (option, key, value))
    for option in ("cache_control", "content_encoding", "content_disposition"):
        check_template(getattr(options, option) or "", "--" + option.replace("_", "-"))
    if options.manifest_key:
        if not options.manifest:
            raise UsageError("--manifest-key uploads the lines of --manifest FILE: give both")
        check_template(options.manifest_key, "--manifest-key", PLACEHOLDERS + ("run_id",))
        if "{run_id}" not in options.manifest_key:   # else a run's object replaces another's
            raise UsageError("--manifest-key %s has no {run_id}: each run's object needs a "
                             "key of its own, e.g. manifests/{hostname}/{date}/{run_id}.jsonl"
                             % options.manifest_key)
    names = [key.lower() for key, _ in options.metadata]
    for key in names:
        if names.count(key) > 1 or key in ("mtime", "s3push-size", "s3push-name"):
            raise UsageError("--metadata %s: %s" % (key, "given twice" if names.count(key) > 1
                                                    else "s3push sets it itself"))
    size = sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in options.metadata)
    size += len("s3push-size18446744073709551615") if options.compress else 0
    if size + len("mtime1234567890.123456789") > MAX_METADATA_BYTES:
        raise UsageError("--metadata: %d bytes of keys and values, with s3push's mtime over "
                         "S3's limit of 2 KiB: send less" % size)
    keys = [key for key, _ in options.tag]
    if len(keys) > MAX_TAGS or len(set(keys)) != len(keys):
        raise UsageError("--tag: S3 takes at most %d tags an object, each key once; got %s"
                         % (MAX_TAGS, ", ".join(keys)))
    lock = (options.object_lock_retain_days, options.object_lock_retain_until)
    if bool(options.object_lock_mode) != any(lock):
        raise UsageError("--object-lock-mode goes with --object-lock-retain-days or "
                         "--object-lock-retain-until (S3 takes both or neither)")
    if options.object_lock_retain_until and options.object_lock_retain_until <= \
            time.strftime(ISO_SECONDS, time.gmtime(now)):
        raise UsageError("--object-lock-retain-until %s is not in the future"
                         % options.object_lock_retain_until)


def object_headers(options, now):
    """The headers every object of the run carries, from the upload options; values may
    hold placeholders ({hostname}, {mtime_date}, ...), filled in for each file."""
    headers = {}
    for name, value in (("x-amz-storage-class", options.storage_class),
                        ("x-amz-server-side-encryption", options.sse),
                        ("x-amz-server-side-encryption-aws-kms-key-id",
                         options.sse_kms_key_id),
                        ("x-amz-acl", options.acl), ("cache-control", options.cache_control),
                        ("content-encoding", options.content_encoding),
                        ("content-disposition", options.content_disposition),
                        ("x-amz-object-lock-mode", options.object_lock_mode),
                        ("x-amz-object-lock-legal-hold", "ON" if options.legal_hold else None)):
        if value:
            headers[name] = value
    if options.object_lock_retain_days:
        headers["x-amz-object-lock-retain-until-date"] = time.strftime(ISO_SECONDS, time.gmtime(
            now + options.object_lock_retain_days * 86400))
    elif options.object_lock_retain_until:
        headers["x-amz-object-lock-retain-until-date"] = options.object_lock_retain_until
    for key, value in options.metadata:
        headers["x-amz-meta-" + key.lower()] = value
    return headers


class Template(object):
    """The destination (a prefix, or each file's whole key) and the object headers of a
    run, with their run-wide placeholders ({hostname}, the upload's {date}, ...) fixed
    once."""

    def __init__(self, prefix, headers=None, tags=(), whole_key=False):
        self.prefix, self.headers, self.tags = prefix, headers or {}, tags
        self.whole_key = whole_key
        texts = [prefix] + list(self.headers.values()) + [value for _, value in tags]
        self.hostname = socket.gethostname() if any("{hostname}" in t for t in texts) else ""
        self.upload_time = datetime.datetime.now(datetime.timezone.utc)

    def expand(self, text, mtime, fields=None):
        return expand_template(text, self.hostname, self.upload_time, mtime, fields)

    def key_for(self, found):
        """The key of a file (FileError for a name that cannot be one, see object_key):
        the prefix and its relative path, or the whole-key template filled in for it (S3's
        limit is the key's: a deep path may give a short one)."""
        mtime = found.info.st_mtime_ns // 10 ** 9   # whole seconds: a float rounds up
        if not self.whole_key:
            return object_key(self.expand(self.prefix, mtime), found.relative)
        key = self.expand(self.prefix, mtime, file_fields(key_text(found.relative),
                                                          found.info))
        return checked_key(re.sub("/{2,}", "/", key).lstrip("/"))

    def headers_for(self, mtime):
        """The object headers for a file of this mtime (metadata RFC 2047 if not ASCII)."""
        headers = {name: self.expand(value, mtime) for name, value in self.headers.items()}
        for name, value in headers.items():
            if name.startswith("x-amz-meta-"):
                headers[name] = metadata_value(value)
        if self.tags:
            headers["x-amz-tagging"] = tagging_header([(key, self.expand(value, mtime))
                                                       for key, value in self.tags])
        return headers


def internal_error(exc, credentials):
    """The one line for a bug: where in this file it happened (the deepest line of ours,
    not of the library that raised), and its text without any secret."""
    where, line = exc.__traceback__, ""
    while where is not None:
        if where.tb_frame.f_code.co_filename == __file__:
            line = " at line %d" % where.tb_lineno
        where = where.tb_next
    return S3PushError("internal error: %s%s: %s; no file was lost" % (
        exc.__class__.__name__, line, redact(one_line(exc), credentials)))


def format_duration(seconds):
    """'45s', '12m5s', '3h20m', '2d4h': the two largest units, as --min-age takes them."""
    parts, left = [], int(seconds)
    for unit, name in zip(DURATION_UNITS, "dhms"):
        if left >= unit or unit == 1 and not parts:
            parts.append("%d%s" % (left // unit, name))
            left %= unit
    return "".join(parts[:2])


class Tally(object):
    """What one run did, in numbers: moved, failed, left for later, queued; the exit status
    and the summaries that follow from them. While workers run, changed only through
    the Report, under its lock."""

    def __init__(self):
        self.started = time.monotonic()
        self.started_at = time.time()
        self.moved_count = 0
        self.moved_from = set()   # directories of moved files, for --delete-empty-dirs
        self.bytes = 0
        self.bytes_resumed = 0   # of multipart uploads resumed: not sent again
        self.failures = []     # exit codes of the failed files
        self.left = FilesLeft()   # files left for later: young, sized out, still written
        self.unremovable_count = 0   # files left alone: this account could not remove them
        self.fatal = None      # the error that stopped the run early
        self.queued_files = 0   # files and bytes the scan has queued so far
        self.queued_bytes = 0
        self.scan_done = False
        self.errors = []       # the first lines said on stderr, for --summary-json
        self.errors_total = 0
        self.versions = []     # the first objects' VersionIds (versioned buckets)
        self.skipped_for = None   # another run held the lock: its pid (0: not known)
        self.lock_held_seconds = None   # and for how long it had, when known

    def exit_status(self):
        if self.fatal is not None:
            return self.fatal.exit_code
        if EXIT_FILES_LEFT in self.failures or self.unremovable_count:
            return EXIT_FILES_LEFT
        return max(self.failures) if self.failures else EXIT_OK

    def status_line(self):
        """files and bytes done of those found, rate and (once the scan is done) ETA."""
        seconds = max(time.monotonic() - self.started, 1e-6)
        rate = self.bytes / seconds
        left = max(self.queued_bytes - self.bytes, 0)
        eta = " ETA %ds" % (left / rate) if self.scan_done and rate > 0 else ""
        more = "" if self.scan_done else "+"
        return "s3push: %d/%d%s files, %.1f/%.1f%s MB, %.1f MB/s%s" % (
            self.moved_count, self.queued_files, more, self.bytes / 1e6, self.queued_bytes / 1e6,
            more, rate / 1e6, eta)

    def summary_data(self, options, status):
        """The run for monitoring (--summary-json)."""
        return {"s3push": VERSION, "source": safe_name(options.source),
                "destination": options.destination, "started": time.strftime(
                    ISO_SECONDS, time.gmtime(self.started_at)),
                "seconds": round(time.monotonic() - self.started, 3), "exit_status": status,
                "files_moved": self.moved_count, "bytes_moved": self.bytes,
                "bytes_resumed": self.bytes_resumed,
                "files_failed": len(self.failures),
                "files_left_young": self.left.counts[YOUNG],
                "files_left_size": self.left.counts[SIZED_OUT],
                "files_left_writing": self.left.counts[WRITING],
                "files_left_oldest_seconds": self.left.oldest_seconds(time.time()),
                "files_left_unremovable": self.unremovable_count,
                "run_skipped": self.skipped_for is not None,
                "lock_holder_pid": self.skipped_for or None,
                "lock_held_seconds": self.lock_held_seconds,
                "errors_total": self.errors_total, "errors": self.errors,
                "versions": self.versions}

    def summary(self):
        seconds = max(time.monotonic() - self.started, 1e-6)
        kept = ", %d this account cannot remove" % self.unremovable_count \
            if self.unremovable_count else ""
        young, writing = self.left.counts[YOUNG], self.left.counts[WRITING]
        kept += ", %d outside --min-size/--max-size" % self.left.counts[SIZED_OUT] \
            if self.left.counts[SIZED_OUT] else ""
        return ("s3push: moved %d files, %d bytes in %.2f s (%.2f MB/s); %d failed, "
                "%d left for later (%d younger than --min-age, %d still being written)%s"
                % (self.moved_count, self.bytes, seconds, self.bytes / seconds / 1e6,
                   len(self.failures), young + writing, young, writing, kept))


class Report(object):
    """What the run says as it goes, shared by the workers: a line for each file moved
    (-v), failed or left (each through its Notices' line()), the live status line, and the
    Tally behind them, each line and its count changed together."""

    def __init__(self, notices=None):
        self.lock = threading.RLock()   # the notices' too: one writer of lines at a time
        self.tally = Tally()
        self.notices = notices or Notices()
        self.notices.lock, self.notices.before = self.lock, self.clear_status
        self.credentials = None   # once loaded: what error text must never show
        self.progress = False  # a live status line is on stderr

    def moved(self, path, url, size, directory, verbose, version_id, archived=None):
        tally = self.tally
        with self.lock:
            tally.moved_count += 1
            tally.moved_from.add(directory)
            tally.bytes += size
            if version_id and len(tally.versions) < MAX_SUMMARY_VERSIONS:
                tally.versions.append({"url": url, "version_id": version_id})
            self.clear_status()
            if verbose:
                self.notices.line(sys.stdout, "moved %s -> %s (%d bytes%s)%s" % (
                    safe_name(path), url, size,
                    ", version %s" % safe_name(version_id) if version_id else "",
                    ", archived as %s" % safe_name(archived) if archived else ""))

    def failed(self, path, url, exc):
        """One line on stderr naming the file, the key (when there is one) and the reason."""
        tally = self.tally
        with self.lock:
            self.clear_status()
            if isinstance(exc, UnremovableError):   # files left, one line a directory
                tally.unremovable_count += exc.files
            else:
                tally.failures.append(exc.exit_code)
            if exc.fatal and tally.fatal is not None:
                return   # the same cause hit the other workers: said once is enough
            if exc.fatal:
                tally.fatal = exc
            target = " -> " + url if url else ""
            line = "s3push: error: %s%s: %s" % (safe_name(path), target, exc)
            self.notices.line(sys.stderr, line)
            tally.errors_total += 1
            if len(tally.errors) < MAX_SUMMARY_ERRORS:
                tally.errors.append(line)

    def vanished(self, path, exc):
        """Not a failure, but the operator is told: one warning line."""
        self.notices.warning("%s: %s" % (safe_name(path), exc))

    def resumed(self, path, reused, parts, size, verbose):
        """A multipart upload goes on where an earlier run left it."""
        with self.lock:
            self.tally.bytes_resumed += size
            if verbose or self.progress:
                self.notices.line(sys.stdout if verbose else sys.stderr, "resuming %s: %d of "
                                  "%d parts already there" % (safe_name(path), reused, parts))

    def restarted(self, path, exc, reused, verbose):
        """A multipart upload started over (see multipart_upload), said under -v: reused,
        the bytes of a resumed one, are sent again after all."""
        with self.lock:
            self.tally.bytes_resumed -= reused
            if verbose:
                self.notices.line(sys.stdout, "%s: its multipart upload starts afresh (%s)"
                                  % (safe_name(path), exc))

    def queued(self, size):
        """The scan queued one more file of this size for the workers."""
        with self.lock:
            self.tally.queued_files += 1
            self.tally.queued_bytes += size

    def left_open(self, path, exc, verbose, since_ns, warn_after):
        """Left for a later run, like a file younger than --min-age: said under -v only,
        and in a warning once it has waited (since since_ns: see future_dated) more than
        warn_after seconds (--warn-waiting)."""
        waited = time.time() - since_ns / 1e9
        with self.lock:
            self.tally.left.add(WRITING, since_ns)
            if waited > warn_after:
                self.notices.warning("%s: %s, and last written %s ago (beyond "
                                     "--warn-waiting): see that its writer closes it"
                                     % (safe_name(path), exc, format_duration(waited)))
            if verbose:
                self.notices.line(sys.stdout, "left %s: %s" % (safe_name(path), exc))

    def out_of_time(self):
        """The deadline stopped the run: what was not sent waits for the next one."""
        with self.lock:
            self.tally.failures.append(EXIT_TEMPFAIL)
            self.notices.line(sys.stderr, "s3push: the --deadline was reached: files not "
                              "sent yet are left for the next run")

    def crashed(self, exc):
        with self.lock:
            self.tally.fatal = internal_error(exc, self.credentials)
            self.notices.line(sys.stderr, "s3push: %s" % self.tally.fatal)

    def clear_status(self):
        if self.progress:
            sys.stderr.write("\r\x1b[K")

    def show_status(self):
        with self.lock:
            sys.stderr.write("\r" + self.tally.status_line() + "\x1b[K")
            sys.stderr.flush()


def checksum_for(choice, endpoint):
    """What proves each upload: --checksum, else CRC32 where the endpoint is AWS S3's
    (which verifies x-amz-checksum-crc32 and echoes it; 5x cheaper per byte than MD5)
    and MD5 elsewhere: every S3 server checks Content-MD5 and answers its ETag, while
    some ignore CRC32 headers (rclone's, Ceph RGW 16) or echo them unchecked (moto)."""
    if not choice:
        host = endpoint.host.lower().rstrip(".")
        choice = "crc32" if host.endswith((".amazonaws.com", ".amazonaws.com.cn")) else "md5"
    return CHECKSUMS[choice]


def journals_for(options, pair, state, report, checksum):
    """Where this run keeps its resume journals (pair: the pair folder, None without a
    usable state folder); None when it keeps none (said under -v: no state folder of
    this account's alone, or under --checksum md5 no MD5 to check parts by: where FIPS
    forbids it, CRC32 uploads still resume)."""
    if not options.resume_days:
        return None
    if pair is None or checksum.new() is None:   # FIPS forbids MD5
        report.notices.note("no resume journals are kept (%s): an upload cut off part-way "
                            "will start over" % (state.problem or "MD5 is not available"))
        return None
    return Journals(pair, options.resume_days * 86400, report.notices.note)


class ObjectSettings(object):
    """How every file's object goes up this run, settled once from the options: where its
    key goes (destination, template, --if-exists), what its requests carry (headers,
    condition, checksum, signed payload or not), when it goes in parts, whether gzipped;
    and the keys this run took."""

    def __init__(self, options, session, destination):
        self.destination = destination
        self.template = Template(destination.prefix, object_headers(options, time.time()),
                                 options.tag, destination.whole_key)
        self.content_type = options.content_type
        self.if_exists = options.if_exists
        self.multipart_threshold = options.multipart_threshold
        self.part_size = options.part_size
        self.compress = options.compress   # the gzip level, or None
        self.verify_md5 = not (options.sse or "").startswith("aws:kms")
        self.checksum = checksum_for(options.checksum, session.endpoint)
        self.plain_http = session.endpoint.scheme == "http"   # see Sending
        self.sign_payload = options.sign_payload or \
            self.checksum.new() is None   # FIPS forbids MD5
        # Whole-key templates may give two files one key, and so may --compress (a.log
        # and a.log.gz): the keys this run took, so that the second is kept instead.
        self.keys_taken = set()
        self.keys_lock = threading.Lock()

    def take_key(self, key):
        """False when another file of this run has taken key (whole-key templates; under
        --compress, keys ending .gz: a path alone never repeats, key_text being
        one-to-one)."""
        if not (self.destination.whole_key or self.compress and key.endswith(".gz")):
            return True
        with self.keys_lock:
            if key in self.keys_taken:
                return False
            self.keys_taken.add(key)
            return True

    def sending(self, relative, info, gzipped):
        """The Sending of one file's object: the run's headers, its own type and mtime."""
        headers = self.template.headers_for(info.st_mtime_ns // 10 ** 9)
        headers["content-type"] = self.content_type or (
            "application/gzip" if gzipped else guess_content_type(relative))
        headers["x-amz-meta-mtime"] = mtime_text(info.st_mtime_ns)
        original = percent_bytes(relative)
        if original:   # its key holds the name escaped (key_text); here are its bytes
            headers[NAME_HEADER] = original
            size = sum(len(name) - len("x-amz-meta-") + len(value) for name, value in
                       headers.items() if name.startswith("x-amz-meta-"))   # all ASCII
            if size > MAX_METADATA_BYTES:
                raise FileError("its name's bytes, percent-encoded in %s, take the metadata "
                                "to %d bytes, over S3's limit of 2 KiB: shorten the path (or "
                                "send less --metadata); left in place" % (NAME_HEADER, size))
        if gzipped:   # the object's own size is the gzip's
            headers["x-amz-meta-s3push-size"] = str(info.st_size)
        condition = {"if-none-match": "*"} if self.if_exists != "overwrite" else {}
        return Sending(headers, condition, self.verify_md5, self.sign_payload,
                       self.checksum, self.plain_http)


# === One file on disk: its checks, its writers, its gzip ===
# What move_file (below) asks of the open file: that it is a regular file reached
# through its directory, not hard-linked elsewhere, removable at all, written by no
# process; and, under --compress, its gzip.


def open_regular_file(parent_fd, name):
    """Open a file for reading through its directory's descriptor, without following a
    symlink or blocking on a FIFO."""
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        raise Vanished("vanished before it was read (moved or deleted by another "
                       "process); nothing to do")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TreeChanged("replaced by a symlink during the run; not followed, "
                              "left alone")
        raise FileError("cannot read (%s); left in place" % exc.strerror)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise TreeChanged("no longer a regular file; left alone")
    return fd, info


def check_links(info, allowed, protected_path=PROTECTED_HARDLINKS):
    """Refuse a file with more than one hard link, unless --allow-hardlinks or the kernel
    keeps users from linking in files they cannot read (fs.protected_hardlinks = 1):
    otherwise a writer could link any file of the host into SOURCE_DIR to have it sent."""
    if info.st_nlink <= 1 or allowed:
        return
    try:
        with open(protected_path) as handle:
            if handle.read().strip() == "1":
                return
        setting = "fs.protected_hardlinks is not on"
    except OSError:   # not Linux (macOS, the BSDs), or no /proc: as unsafe as off
        setting = "the kernel does not say that users cannot link in others' files (no %s)" \
            % protected_path
    raise FileError("has %d hard links and %s, so it may be another user's file linked in; "
                    "left in place (--allow-hardlinks moves such files)"
                    % (info.st_nlink, setting))


# chattr +i or +a (Linux), chflags uchg, schg, uappnd or sappnd (macOS, the BSDs): no
# account, root included, may remove such a file; FS_IMMUTABLE_FL | FS_APPEND_FL.
LINUX_FIXED_FLAGS = 0x10 | 0x20
BSD_FIXED_FLAGS = stat.UF_IMMUTABLE | stat.UF_APPEND | stat.SF_IMMUTABLE | stat.SF_APPEND


def fixed_in_place(fd, info):
    """True when the file (open as fd, fstat'ed as info) is immutable or append-only. On
    Linux the flags come from the FS_IOC_GETFLAGS ioctl (a filesystem without them answers
    ENOTTY: False); elsewhere from st_flags, where the platform has it."""
    flags = getattr(info, "st_flags", None)
    if flags is not None:
        return bool(flags & BSD_FIXED_FLAGS)
    if not sys.platform.startswith("linux"):
        return False
    request = (2 << 30) | ((8 if sys.maxsize > 2 ** 32 else 4) << 16) | (ord("f") << 8) | 1
    try:
        answer = fcntl.ioctl(fd, request, bytes(8))
    except OSError:
        return False
    return bool(int.from_bytes(answer[:4], sys.byteorder) & LINUX_FIXED_FLAGS)


# A file that some process still has open for writing is left for a later run: moved now,
# what the writer adds later would go into a deleted file. The kernel tells exactly, for
# every process of every user, through a read lease, which cannot be taken while anyone has
# the file open for writing; it is taken and dropped at once (a lease break would send
# SIGIO, which guarded_run ignores). Where no lease can be taken (neither the file's owner nor
# root: EACCES; NFS or some FUSE: EINVAL), /proc tells for the processes this user may see.
TAKE_LEASES = True   # the tests turn it off to exercise the /proc fallback


def fd_facts(fdinfo_path):
    """(writable, mount id, inode number) of the descriptor a /proc fdinfo file tells of:
    writable when its 'flags:' give O_WRONLY or O_RDWR; each number None where the kernel
    does not give it ('mnt_id:' from Linux 3.15, 'ino:' from 5.14)."""
    writable, facts = None, {}
    with open(fdinfo_path, "rb") as handle:
        for line in handle:
            name, _, value = line.partition(b":")
            if name == b"flags":
                writable = int(value, 8) & os.O_ACCMODE != os.O_RDONLY
            elif name in (b"mnt_id", b"ino"):
                facts[name] = int(value)
    return bool(writable), facts.get(b"mnt_id"), facts.get(b"ino")


def mount_filesystems(mountinfo_path):
    """{mount id: b'major:minor' of its filesystem} from a /proc mountinfo file (read as
    bytes: a mount point's name need not decode)."""
    found = {}
    with open(mountinfo_path, "rb") as handle:
        for line in handle:
            fields = line.split(None, 3)
            if len(fields) > 2 and fields[0].isdigit():
                found[int(fields[0])] = fields[2]
    return found


class WriterView(object):
    """The descriptors open for writing in the processes under proc (those this user may
    see) at one moment: /proc/PID/fdinfo gives each one's access mode, mount and inode
    number, mountinfo each mount's filesystem (read once for each mount namespace). Which
    file a descriptor has open is asked (a stat() of /proc/PID/fd/N) only where it may be
    the file asked about: of a descriptor on that file's filesystem; of one on a mount no
    mountinfo shows (lazily unmounted; pipes, sockets), only where fdinfo gives the file's
    inode number or none. A stat() of every target would hang on one unrelated file of a
    dead NFS or FUSE mount. (Inode numbers alone are no proof: on overlayfs those of
    fdinfo need not be those stat() gives.)"""

    def __init__(self, proc):
        self.proc = proc
        self.places = []        # (mount id, inode number, /proc/PID/fd/N) of each
        self.filesystems = {}   # mount id: b'major:minor'
        self.files = {}         # b'major:minor': {(device, inode)} open for writing there
        mounts = {}   # pid: the mount ids of its descriptors
        for pid in os.listdir(proc):
            if not pid.isdigit():
                continue
            try:
                names = os.listdir(os.path.join(proc, pid, "fd"))
            except OSError:
                continue   # gone, or another user's
            for name in names:
                try:
                    writable, mount, inode = fd_facts(os.path.join(proc, pid, "fdinfo",
                                                                   name))
                except (OSError, ValueError):
                    continue   # closed meanwhile
                if writable:
                    self.places.append((mount, inode, os.path.join(proc, pid, "fd", name)))
                    mounts.setdefault(pid, set()).add(mount)
        namespaces = set()
        for pid in ["self"] + sorted(mounts):   # the mounts of other mount namespaces too
            if pid != "self" and (mounts[pid] - {None}).issubset(self.filesystems):
                continue
            try:
                namespace = os.readlink(os.path.join(proc, pid, "ns", "mnt"))
            except OSError:
                namespace = None   # read its mountinfo whatever namespace it is in
            if namespace is not None:
                if namespace in namespaces:
                    continue
                namespaces.add(namespace)
            try:
                self.filesystems.update(mount_filesystems(os.path.join(proc, pid,
                                                                       "mountinfo")))
            except (OSError, ValueError):
                pass   # gone: its descriptors are looked at as on mounts not shown

    def writes(self, fd, info):
        """Whether a descriptor of the view has the file of info (open as fd) open."""
        try:
            mount = fd_facts(os.path.join(self.proc, "self", "fdinfo", str(fd)))[1]
        except (OSError, ValueError):
            mount = None
        filesystem = self.filesystems.get(mount)
        if filesystem not in self.files:
            self.files[filesystem] = self.targets(
                link for place, inode, link in self.places
                if filesystem is not None and self.filesystems.get(place) == filesystem)
        return (info.st_dev, info.st_ino) in self.files[filesystem] or \
            (info.st_dev, info.st_ino) in self.targets(
                link for place, inode, link in self.places
                if (filesystem is None or self.filesystems.get(place) is None) and
                inode in (info.st_ino, None))

    @staticmethod
    def targets(links):
        """{(device, inode)} of the files the /proc/PID/fd/N links have open."""
        found = set()
        for link in links:
            try:
                target = os.stat(link)
            except OSError:
                continue   # closed meanwhile
            found.add((target.st_dev, target.st_ino))
        return found


class WriterIndex(object):
    """The files open for writing as /proc shows them: a WriterView built on first use (an
    idle tick never pays for it), and again only when a check needs a newer view."""

    def __init__(self, proc="/proc"):
        self.proc = proc
        self.lock = threading.Lock()
        self.built = None   # time.monotonic() when the last view was started
        self.view = None

    def has_writer(self, fd, info, since):
        """Whether the file of info (open as fd) is open for writing, in a view started
        after `since`; None when there is no /proc to tell."""
        with self.lock:
            if self.built is None or self.built < since:
                if not os.path.isdir(os.path.join(self.proc, "self", "fdinfo")):
                    return None
                started = time.monotonic()
                self.view = WriterView(self.proc)
                self.built = started
            return self.view.writes(fd, info)


# still_written's answer where the lease was refused (another account's file, and no
# CAP_LEASE) and /proc shows no writer among this account's processes: those of other
# accounts it does not show.
OTHERS_UNSEEN = "others unseen"


def still_written(fd, info, index, since):
    """True when some process has the file (open read-only as fd) open for writing, False
    when none has, None when neither a lease nor /proc can tell, OTHERS_UNSEEN when no
    process of this account has. A /proc view must have been started after `since`
    (time.monotonic())."""
    lease = getattr(fcntl, "F_SETLEASE", None) if TAKE_LEASES else None   # Linux only
    refused = False
    if lease is not None:
        try:
            fcntl.fcntl(fd, lease, fcntl.F_RDLCK)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return True
            refused = exc.errno == errno.EACCES   # neither its owner nor CAP_LEASE
        else:
            fcntl.fcntl(fd, lease, fcntl.F_UNLCK)
            return False
    seen = index.has_writer(fd, info, since)
    return OTHERS_UNSEEN if refused and seen is False else seen


# Tests run a writer, or kill the run, at each step of a file's move (as TAKE_LEASES).
MOVE_SEAM = None


def seam(step, name):
    if MOVE_SEAM is not None:
        MOVE_SEAM(step, name)


# --compress gzip: a file goes up as its gzip, spooled to an unnamed file of the private
# state folder (memory stays flat whatever its size; a retry or a part sent again reads
# the same bytes). Deterministic (no name, mtime 0, OS unknown), so a resumed upload's
# parts match what an earlier run sent. What is compressed already goes as it is.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
COMPRESSED_EXTENSIONS = frozenset(
    ".gz .tgz .zst .xz .bz2 .lz4 .zip .7z .jpg .jpeg .png .gif .webp .mp3 .mp4 .mkv .mov "
    ".avi .pdf .parquet".split())
COMPRESSED_MAGIC = (b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"\xfd7zXZ\x00", b"BZh",
                    b"\x04\x22\x4d\x18", b"PK\x03\x04", b"7z\xbc\xaf\x27\x1c", b"\xff\xd8\xff",
                    b"\x89PNG", b"GIF8", b"%PDF", b"PAR1", b"\x1a\x45\xdf\xa3", b"ID3")


def compressed_already(name):
    """By its name alone (what a dry run can tell): an extension of COMPRESSED_EXTENSIONS."""
    return os.path.splitext(os.fsdecode(name))[1].lower() in COMPRESSED_EXTENSIONS


def compressed_inside(fd):
    """By its first bytes: a compressed format's magic (RIFF..WEBP, ....ftyp: video)."""
    head = os.pread(fd, 12, 0)
    return head.startswith(COMPRESSED_MAGIC) or head[8:12] == b"WEBP" or \
        head[4:8] == b"ftyp"


def goes_gzipped(compress, name, fd=None):
    """Whether a file goes up as its gzip: under --compress, unless it is compressed
    already, by its name or (given its descriptor) its first bytes. Decided here only."""
    return compress is not None and not compressed_already(name) and \
        (fd is None or not compressed_inside(fd))


def gunzip_check(spool, crc, size):
    """Raise unless the spool decompresses to size bytes of CRC32 crc, the trailer saying
    the same: what goes up is the gzip of what was read, nothing else. Output is taken a
    block at a time, whatever the ratio."""
    head = os.pread(spool, len(GZIP_HEADER), 0)
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    got_crc, got_size = 0, 0
    total = os.fstat(spool).st_size
    rest = None   # what follows the deflate stream: the trailer, 8 bytes (9 kept: more)
    try:
        for block in FileRange(spool, len(GZIP_HEADER), total - len(GZIP_HEADER)).blocks():
            while rest is None and block:
                out = inflate.decompress(block, BLOCK_BYTES)
                got_crc, got_size = zlib.crc32(out, got_crc), got_size + len(out)
                block = inflate.unconsumed_tail
                if inflate.eof:   # with max_length, the rest is in both; taken once
                    rest, block = inflate.unused_data, b""
            if rest is not None:
                rest = (rest + block)[:9]
    except zlib.error:
        rest = None
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    if head != GZIP_HEADER or rest != trailer or (got_crc, got_size) != (crc, size):
        raise FileError("its gzip, read back from the state folder, is not the file as "
                        "read (a disk or memory fault?): kept, nothing sent")


def gzip_file(fd, info, name, folder_fd, level):
    """The file's gzip, in a new unnamed file of the state folder: (its descriptor, its
    fstat, the file's CRC32). ChangedError when the file is not in the state it had (info)
    by the end; a FileError when it cannot be read or the spool written (a full state
    folder)."""
    state = content_stamp(info)
    spool = None
    try:
        spool = unnamed_file(folder_fd, ".s3push-gzip-")
        deflate = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        crc, size = 0, 0
        with CPUS.wide(info.st_size), open(os.dup(spool), "wb") as out:
            out.write(GZIP_HEADER)
            for block in FileRange(fd, 0, info.st_size, state).blocks():
                crc, size = zlib.crc32(block, crc), size + len(block)
                out.write(deflate.compress(block))
                seam("compress", name)
            out.write(deflate.flush() + struct.pack("<II", crc, size & 0xFFFFFFFF))
        if content_stamp(os.fstat(fd)) != state:   # read across a change: not one state
            raise ChangedError()
        with CPUS.wide(size):
            gunzip_check(spool, crc, size)
        seam("compressed", name)
        return spool, os.fstat(spool), crc
    except BaseException as exc:
        if spool is not None:
            os.close(spool)
        if isinstance(exc, OSError):   # reading it, or writing the spool
            raise FileError("cannot compress it (%s): kept; if the state folder is full or "
                            "not writable, free space there or fix --state-dir"
                            % exc.strerror) from None
        raise


# === Sending one file: the job, the queue, the parts ===
# Workers (threads, one connection each) take tasks from one queue: parts of a started
# multipart upload first, then files. The scan feeds files in oldest first (see
# oldest_first), and the queue holds only a few per worker, so memory does not grow with
# the directory. The Job is what every worker and every move is handed.


NOT_NOW = object()   # WorkQueue.next_task: nothing to take without waiting


class WorkQueue(object):
    """Files and parts for the workers. Two conditions share one lock: a file added wakes
    one worker, and the scan, waiting while the queue is full, is woken once the workers
    took half of it (not at every file: each wake costs a switch of threads)."""

    def __init__(self, max_files):
        lock = threading.Lock()
        self.work = threading.Condition(lock)   # workers wait here for a task or the end
        self.room = threading.Condition(lock)   # the scan waits here while the queue is full
        self.files = collections.deque()
        self.parts = collections.deque()
        self.max_files = max_files
        self.producing = True   # the scan may still add files
        self.uploads = 0        # multipart uploads in progress
        self.moving = set()     # files taken, not yet performed: each may begin one
        self.stopped = False

    def add_file(self, task):
        """Queue a file, waiting while the queue is full; False once the run stopped."""
        with self.work:
            while len(self.files) >= self.max_files and not self.stopped:
                self.room.wait(1.0)
            if not self.stopped:
                self.files.append(task)
                self.work.notify()
            return not self.stopped

    def begin_upload(self, tasks):
        with self.work:
            self.uploads += 1
            if not self.stopped:
                self.parts.extend(tasks)
                self.work.notify_all()
                return
        for task in tasks:   # the run stopped while the upload was being created
            task.abandon()

    def end_upload(self):
        with self.work:
            self.uploads -= 1
            self.work.notify_all()

    def done_producing(self):
        with self.work:
            self.producing = False
            self.work.notify_all()

    def stop(self):
        """Take no new work: queued files stay on disk, queued parts are abandoned."""
        with self.work:
            self.stopped = True
            self.files.clear()
            abandoned, self.parts = list(self.parts), collections.deque()
            self.work.notify_all()
            self.room.notify_all()
        for part in abandoned:
            part.abandon()

    def next_task(self, wait=True):
        """The next part or file; None when there is nothing left to do; NOT_NOW when
        there is none yet and wait is False."""
        with self.work:
            while True:
                if self.parts:
                    return self.parts.popleft()
                if self.files and not self.stopped:
                    if len(self.files) == self.max_files // 2 + 1:
                        self.room.notify()   # half taken: the scan may fill it again
                    task = self.files.popleft()
                    self.moving.add(task)
                    return task
                # Not while a file taken may still begin a multipart upload: its parts
                # would go over fewer connections than --jobs (one, for a file alone).
                if self.stopped or not (self.producing or self.uploads or self.moving):
                    return None
                if not wait:
                    return NOT_NOW
                self.work.wait()

    def next_part(self):
        with self.work:
            return self.parts.popleft() if self.parts else None

    def performed(self, task):
        """A task taken by next_task was performed (a file: past its upload)."""
        with self.work:
            if task in self.moving:
                self.moving.discard(task)
                self.work.notify_all()


class Job(object):
    """What the workers share: where the files are, how their objects go up, the records
    kept of them (ledger, manifest, journals), the queue, the clients and the report."""

    def __init__(self, options, session, destination, report, root, asides, state,
                 archive):
        self.root = root   # SOURCE_DIR's descriptor: every file is reached through it
        self.archive = archive   # --archive-dir's Archive, or None
        self.source = options.source
        self.asides = asides
        self.writers = WriterIndex()
        self.allow_hardlinks = options.allow_hardlinks
        self.objects = ObjectSettings(options, session, destination)
        self.destination = destination
        self.run_id = new_run_id(report.tally.started_at)
        endpoint = session.endpoint   # as configured: what the ledger's records are for
        self.endpoint = "%s://%s%s" % (endpoint.scheme, endpoint.netloc(endpoint.host),
                                       endpoint.base_path)
        # The folder of this source and destination in the state folder, if usable.
        pair = pair_folder(state.path, options.source, destination) \
            if state.fd is not None else None
        self.pair = pair
        self.ledger = Ledger(pair, report.notices, state.problem)
        self.manifest = Manifest(options.manifest, options.source, self.run_id,
                                 report.notices) \
            if options.manifest else NoManifest()
        # None, or where resume journals are kept
        self.journals = journals_for(options, pair, state, report, self.objects.checksum)
        self.spool_folder = state.fd   # the state folder's descriptor (None: unusable)
        self.worker_count = options.jobs   # each with its own connection
        self.queue = WorkQueue(max_files=4 * options.jobs)
        self.deadline = Deadline(report.tally.started + options.deadline if options.deadline
                                 else None)
        rate_limit = RateLimit(options.bwlimit) if options.bwlimit else None
        self.watch = SilenceWatch(options.timeout)   # the endpoint's, for every client
        self.new_client = functools.partial(S3Client, session, options.retries,
                                            options.timeout, self.deadline, rate_limit,
                                            self.watch)
        self.report = report
        self.verbose = options.verbose
        self.warn_waiting = options.warn_waiting   # seconds: see Report.left_open

    def journal_for(self, found, info):
        if self.journals is None:
            return NoJournal(found)
        return self.journals.for_file(found, info)


class PartTracker(object):
    """The parts of one multipart upload: what each returned, and the first error."""

    def __init__(self, count):
        self.cond = threading.Condition()
        self.results = [None] * count
        self.left = count
        self.error = None

    def finish(self, index, result=None, error=None):
        with self.cond:
            self.results[index] = result
            if error is not None and self.error is None:
                self.error = error
            self.left -= 1
            self.cond.notify_all()

    def wait(self, seconds):
        with self.cond:
            if self.left:
                self.cond.wait(seconds)
            return self.left == 0


class PartTask(object):
    """One part to upload, runnable by any worker; once confirmed, it goes in the journal."""

    def __init__(self, job, tracker, journal, sending, index, key, upload_id, fd, offset,
                 length):
        self.job, self.tracker, self.journal, self.index = job, tracker, journal, index
        self.sending = sending
        self.key, self.upload_id = key, upload_id
        self.fd, self.offset, self.length = fd, offset, length

    @staticmethod
    def brief():
        return False

    def perform(self, client):
        """Whatever happens, the tracker hears of this part: its upload never waits forever."""
        result, error = None, None
        if self.tracker.error is not None:   # the upload failed: its other parts are not sent
            self.tracker.finish(self.index)
            return
        try:
            result = upload_part(client, self.key, self.upload_id, self.index + 1, self.fd,
                                 self.offset, self.length, self.sending)
            self.journal.confirmed(self.index + 1, self.offset, self.length, result)
        except S3PushError as exc:
            error = exc
        except OSError as exc:
            error = FileError("cannot read part %d (%s)" % (self.index + 1, exc.strerror))
        except BaseException:
            error = S3PushError("part %d stopped by an internal error" % (self.index + 1))
            raise
        finally:
            self.tracker.finish(self.index, result, error)
        if error is not None and error.fatal:   # after: the upload fails of this cause,
            self.job.queue.stop()               # not of a part the stop abandoned

    def abandon(self):
        # Stopped by a silent endpoint: the upload fails of that, said once for the run.
        self.tracker.finish(self.index, error=self.job.watch.error() or TemporaryError(
            "the run stopped before part %d was sent" % (self.index + 1)))


class MultipartPlan(collections.namedtuple("MultipartPlan",
                                           "part_size ranges headers checksum")):
    """How one file goes up in parts: the part size, [(number, offset, length)], the
    fingerprint of its headers and its check, Md5Check, Crc32Check or Sha256Check (a
    journal of other headers or another checksum is not resumed)."""
    __slots__ = ()


def send_parts(client, job, key, fd, plan, sending, journal, resumption, state,
               once_confirmed=False):
    """Create the upload (unless it is a Resumption), send the parts it lacks through the
    workers (helping them), then complete it, but only if the file is still in the
    content_stamp it was in before its first part (or reused part) was read: parts read
    before and after a rewrite in place would make an object that was never the file.
    once_confirmed: the journal stays as it is until a part of this upload is confirmed."""
    if resumption is None:
        resumption = Resumption(create_multipart_upload(client, key, sending), time.time(),
                                {})
    upload_id, reused = resumption.upload_id, resumption.parts
    journal.start(key, plan, resumption, once_confirmed)
    tracker = PartTracker(len(plan.ranges))
    for number, part in reused.items():
        tracker.finish(number - 1, Sent(part.etag, bytes.fromhex(part.check_hex)))
    job.queue.begin_upload([PartTask(job, tracker, journal, sending, number - 1, key,
                                     upload_id, fd, offset, length)
                            for number, offset, length in plan.ranges if number not in reused])
    try:
        while not tracker.wait(0):
            task = job.queue.next_part()
            if task is not None:
                task.perform(client)
            else:
                tracker.wait(0.5)
    finally:
        job.queue.end_upload()
    error = tracker.error
    if error is not None:
        if type(error) is TemporaryError and error.status == 500:
            raise PartFailedError(str(error))
        raise error
    if content_stamp(os.fstat(fd)) != state:   # left incomplete: a lifecycle rule removes it
        journal.remove()
        raise ChangedError("changed while it was uploading, between its parts: the "
                           "multipart upload was not completed (the key holds what it "
                           "held); kept for the next run")
    proof = complete_multipart_upload(client, key, upload_id, tracker.results, sending,
                                      [length for _, _, length in plan.ranges])
    journal.remove()
    return proof


def multipart_upload(client, job, key, fd, info, sending, journal):
    """A multipart upload, resumed where the journal says an earlier run left it.

    Started afresh (once) when the server will not go on with it: the upload is gone
    (aborted, expired, or completed by an attempt whose answer was lost), it failed a
    part every time (PartFailedError), or, resumed, it refuses a part sent again
    (rclone's server will not replace one) or its result. After a PartFailedError the
    journal stays the resumed upload's until the fresh one has a part: a server failing
    every upload for a while (not just that one) costs no parts already sent. Not
    started afresh once the run stops or its --deadline passed (a --deadline near may
    have cut a part's retries short: the fresh upload is still made, as a deadline that
    always cuts them would otherwise keep a broken upload resumed run after run).
    A KeyTakenError keeps the journal: the parts are there for a later run to complete;
    a ChangedError has dropped it (the parts hold bytes of more than one state).
    On failure nothing is aborted (AbortMultipartUpload is a DELETE): the journal lets
    the next run go on, and a bucket lifecycle rule removes an upload nobody completes.
    """
    state = content_stamp(info)
    part_size = part_size_for(info.st_size, job.objects.part_size)
    plan = MultipartPlan(part_size, part_ranges(info.st_size, part_size),
                         headers_fingerprint(multipart_headers(sending)), sending.checksum)
    resumption = reusable_parts(journal, key, fd, plan)
    if resumption is not None:
        reused = sum(part.length for part in resumption.parts.values())
        job.report.resumed(os.path.join(job.source, journal.found.relative),
                           len(resumption.parts), len(plan.ranges), reused, job.verbose)
    try:
        return send_parts(client, job, key, fd, plan, sending, journal, resumption, state)
    except (KeyTakenError, ChangedError):
        raise
    except (FileError, PartFailedError) as exc:
        failed = isinstance(exc, PartFailedError)
        if not failed:
            journal.remove()   # never resumed: the server holds something else
        if resumption is None and not (failed or isinstance(exc, UploadGoneError)) \
                or job.queue.stopped or job.deadline.passed():
            raise
        job.report.restarted(os.path.join(job.source, journal.found.relative), exc,
                             reused if resumption is not None else 0, job.verbose)
        return send_parts(client, job, key, fd, plan, sending, journal, None, state,
                          once_confirmed=failed and resumption is not None)
    finally:
        journal.close()


def send_file(client, job, key, body, found, info, sending):
    """One PUT, or a multipart upload above the threshold, of body: (descriptor, fstat)
    of the file itself or of its gzip (the journal is the file's, info). Returns the
    object's Proof."""
    fd, sent = body
    if sent.st_size > min(job.objects.multipart_threshold, MAX_PUT_BYTES):
        return multipart_upload(client, job, key, fd, sent, sending,
                                job.journal_for(found, info))
    return put_object(client, key, fd, sent, sending)


def upload_file(client, job, fd, info, found, key):
    """Send the open file (under --compress, its gzip) to its first candidate key, or
    under --if-exists number to the first free numbered one; returns (the key it went to,
    its Proof, what the ledger keeps of the body: its compression, the gzip's size, the
    file's CRC32 under it, the part size of an MD5 or SHA-256 of parts)."""
    try:
        if info.st_size > MAX_OBJECT_BYTES:
            raise FileError("larger than 5 TiB, S3's limit for one object; left in place")
        gzipped = goes_gzipped(job.objects.compress, found.name, fd)
        first = gzip_key(key) if gzipped else key
        if not job.objects.take_key(first):
            raise FileError("another file of this run went to that key%s: kept, not "
                            "overwriting it; add {mtime_epoch} or {inode} to the key template "
                            "to tell them apart" % (" plus .gz" if gzipped else ""))
        body, fields = (fd, info), {"compression": None, "compressed_size": None}
        if gzipped:
            spool, spooled, crc = gzip_file(fd, info, found.name, job.spool_folder,
                                            job.objects.compress)
            body = (spool, spooled)
            fields = {"compression": "gzip", "compressed_size": spooled.st_size,
                      "file_crc32": "%08x" % crc}
        try:
            sending = job.objects.sending(found.relative, info, gzipped)
            for key in candidate_keys(first, job.objects.if_exists):
                try:
                    proof = send_file(client, job, key, body, found, info, sending)
                    if proof.checksum in OF_PARTS:
                        fields["part_size"] = part_size_for(body[1].st_size, job.objects.part_size)
                    return key, proof, fields
                except KeyTakenError:
                    if job.objects.if_exists != "number":
                        raise
        finally:
            if gzipped:
                os.close(body[0])
    except OSError as exc:
        raise FileError("cannot read (%s); left in place" % exc.strerror)
    raise FileError("%s and the next %d numbered keys are all taken: left in place"
                    % (safe_name(first), MAX_NUMBERED_KEYS))


# === The move of one file ===
# move_file is the one path from a file's open to its unlink, in numbered steps; what
# stands here exists for it alone: the checks before the removal, the removal by an
# aside name (or its archive: --archive-dir), the ledger's record, and the task a worker
# runs.


def check_no_writer(job, fd, info, since, uploaded):
    """StillWritten when a process has the file open for writing. Where only /proc can
    tell, its view must have been started after since (time.monotonic(); -inf: any view,
    before the upload, since the removal takes a fresh one). uploaded: for the message."""
    writing = still_written(fd, info, job.writers, since)
    if writing is None:
        job.report.notices.note("cannot tell whether other processes still write files here "
                                "(no file lease, no /proc): relying on --min-age and "
                                "in-progress names")
    elif writing is OTHERS_UNSEEN:
        job.report.notices.warning(
            "cannot see whether processes of other accounts still write the files of other "
            "accounts here (a read lease needs the file's owner or CAP_LEASE, and /proc "
            "shows this account's processes only): relying on --min-age and in-progress "
            "names; run as the files' owner or with CAP_LEASE (README: systemd)",
            once="others unseen")
    elif writing:
        raise StillWritten("%sstill open for writing by another process; left for a "
                           "later run" % ("uploaded, but " if uploaded else ""))


def check_still_read(parent_fd, fd, name, uploaded):
    """Raise unless name (in the directory open as parent_fd) is still the very file
    read (uploaded: its fstat then), unchanged; False when it is gone (removed by
    another process: nothing to do)."""
    try:
        after = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(after.st_mode):
        raise TreeChanged("replaced by a symlink during the run; not followed, left "
                          "alone")
    if (after.st_dev, after.st_ino) != (uploaded.st_dev, uploaded.st_ino):
        raise StillWritten("replaced by a new version after its upload; the new one is "
                           "left for a later run")
    # The name holds the version read, and the open file did not change since it was read
    # (its ctime moves even when a writer sets the mtime back).
    if not same_version(uploaded, after) or \
            content_stamp(os.fstat(fd)) != content_stamp(uploaded):
        raise ChangedError()
    return True


def check_name_holds(parent_fd, name, uploaded):
    """StillWritten unless name holds the version uploaded: else a new version came to it
    just before the removal, and it is what a later run moves."""
    came = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if not (stat.S_ISREG(came.st_mode) and same_version(uploaded, came)):
        raise StillWritten("replaced by a new version just before its removal; the new one "
                           "is left for a later run")


# --archive-dir DIR: the last step of a removal links the file into DIR at its relative
# path instead of unlinking it alone. link() never replaces a name, so nothing in DIR is
# overwritten: a name taken there gets the first free numbered one (app.1.log), and one that
# holds this very file already (a run killed between the link and the unlink) is where it
# was archived. DIR's folders are made with mkdir and entered one name at a time from DIR's
# descriptor, never through a symlink (a writer of DIR cannot steer a file out of it).
# DIR and each folder in it are this account's alone (others_may_write): no other account
# can read a file there through a folder it could not pass in SOURCE_DIR, nor take it.
MAX_ARCHIVE_NUMBERS = 100   # a name, then at most this many numbered ones
NO_HARD_LINKS = frozenset([errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS])


def enter_archive_folder(fd, name, path, make):
    """The folder name in DIR's folder open as fd (path: its path, for the message), made
    if missing (make), opened without following a symlink; a FileError where other
    accounts may write in it (one made beforehand by another account)."""
    if make:
        try:   # 0700, not the source folder's mode: never more open than SOURCE_DIR was
            os.mkdir(name, 0o700, dir_fd=fd)
        except FileExistsError:
            pass   # made by an earlier file or run, or killed right after its mkdir
    child = os.open(name, DIRECTORY_FLAGS, dir_fd=fd)
    info = os.fstat(child)
    if others_may_write(info):
        os.close(child)
        raise FileError("uploaded, but the archive's folder %s is owned by uid %d, mode "
                        "%04o: other accounts may write in it (and take or read what is "
                        "archived there); left in place" % (
                            safe_name(path), info.st_uid, stat.S_IMODE(info.st_mode)))
    return child


def open_archive_folder(archive, relative, make=True):
    """A descriptor of DIR/relative (archive: the Archive; relative: '' or ending in '/'),
    each folder entered (and made, unless make is False) by enter_archive_folder."""
    fd, path = os.dup(archive.fd), archive.path
    try:
        for name in relative.split("/")[:-1]:
            path = os.path.join(path, name)
            child = enter_archive_folder(fd, name, path, make)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def archived_as(folder, own, info):
    """The name, own or a numbered one, under which DIR's folder (open as folder) holds
    the file of that stat already (a run killed between its link and its unlink), or
    None. Each is looked at: the expiry may have taken the ones before it."""
    for number in range(MAX_ARCHIVE_NUMBERS + 1):
        candidate = numbered_key(own, number) if number else own
        try:
            there = os.stat(candidate, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if (there.st_dev, there.st_ino) == (info.st_dev, info.st_ino):
            return candidate
    return None


def check_archived(folder, candidate, uploaded):
    """StillWritten, once candidate (just linked into DIR's folder open as folder) is
    unlinked again, unless it holds the file read: else a new version was renamed over
    a name unlinked by its own (too long for an aside name) in the meantime, and it is
    what a later run moves. That link is ours: no other account writes in DIR."""
    there = os.stat(candidate, dir_fd=folder, follow_symlinks=False)
    if (there.st_dev, there.st_ino) != (uploaded.st_dev, uploaded.st_ino):
        os.unlink(candidate, dir_fd=folder)
        raise StillWritten("replaced by a new version just before its archive; the new one "
                           "is left for a later run")


def rename_into_archive(job, parent_fd, name, folder, candidate, why):
    """Where no hard link can be made (why: vfat, exFAT, another account's file under
    fs.protected_hardlinks), the file is renamed to candidate in DIR right after link()
    found that name free (the kernel answers EEXIST before it asks the filesystem), said
    once a run."""
    job.report.notices.warning(
        "cannot hard-link files into the archive %s (%s): each is renamed into it right "
        "after its name there is found free, so a file put at that very name in that "
        "instant would be replaced" % (safe_name(job.archive.path), why), once="archive links")
    os.rename(name, candidate, src_dir_fd=parent_fd, dst_dir_fd=folder)


def link_into_archive(job, parent_fd, name, folder, found, uploaded):
    """Link name (checked to be the file read) into DIR's folder (open as folder) under
    its own name or the first free numbered one, check what that name holds, then unlink
    name. Returns the name it has in DIR."""
    own = key_name(found.name)   # an earlier run's aside name: the name it had
    for number in range(MAX_ARCHIVE_NUMBERS + 1):
        candidate = numbered_key(own, number) if number else own
        try:
            os.link(name, candidate, src_dir_fd=parent_fd, dst_dir_fd=folder,
                    follow_symlinks=False)
        except FileExistsError:
            continue   # another file's: never replaced
        except OSError as exc:
            if exc.errno not in NO_HARD_LINKS:
                raise
            rename_into_archive(job, parent_fd, name, folder, candidate, exc.strerror)
            return candidate
        check_archived(folder, candidate, uploaded)
        seam("archived", found.name)
        os.unlink(name, dir_fd=parent_fd)
        return candidate
    raise FileError("uploaded, but %s and the next %d numbered names are all taken in the "
                    "archive %s; left in place" % (
                        safe_name(own), MAX_ARCHIVE_NUMBERS,
                        safe_name(os.path.join(job.archive.path, found.directory.relative))))


def archive_file(job, parent_fd, name, found, uploaded):
    """Link the file at name (checked to be the one read) into DIR at its relative path
    (see link_into_archive), unless a killed run's link is there already; then unlink
    name. Returns the path it has in DIR, relative to DIR."""
    own = key_name(found.name)   # an earlier run's aside name: the name it had
    folder = open_archive_folder(job.archive, found.directory.relative)
    try:
        seam("archive", found.name)
        # A second link may be a killed run's, in DIR at own or a numbered name: only
        # then are they looked through.
        there = archived_as(folder, own, uploaded) if uploaded.st_nlink > 1 else None
        if there is None:
            there = link_into_archive(job, parent_fd, name, folder, found, uploaded)
        else:
            os.unlink(name, dir_fd=parent_fd)
        return found.directory.relative + there
    finally:
        os.close(folder)


def let_go(job, parent_fd, name, found, uploaded):
    """The last step of a removal, name checked to hold the file read: unlinked, or under
    --archive-dir archived (see archive_file). Returns its path in DIR, or None."""
    if job.archive is None:
        os.unlink(name, dir_fd=parent_fd)
        return None
    return archive_file(job, parent_fd, name, found, uploaded)


def unlink_by_name(job, parent_fd, fd, found, uploaded, why):
    """Where no aside name can be had (why: a full directory, a name too long for one),
    the name is unlinked right after its last checks, said once for the directory; an
    earlier run's aside name (why None) is unlinked as it is."""
    # A writer may have opened it during the upload (a /proc view taken from now on).
    check_no_writer(job, fd, uploaded, time.monotonic(), True)
    seam("unlink", found.name)
    check_name_holds(parent_fd, found.name, uploaded)   # the last instant
    archived = let_go(job, parent_fd, found.name, found, uploaded)
    if why is not None:
        job.report.notices.warning(
            "cannot rename a file aside before its removal in %s (%s): it is removed by its "
            "name right after its last check, so a new version renamed over that name at "
            "that very instant would be removed with it" % (
                safe_name(os.path.join(job.source, found.directory.relative) or "."), why),
            once=("aside", found.directory.steps))
    return archived


def unlink_aside(job, parent_fd, fd, found, uploaded, aside):
    """Unlink what the rename brought to the aside name once it is checked to be the
    version read; anything else is given back under its name, for a later run."""
    seam("check", found.name)
    try:
        check_name_holds(parent_fd, aside, uploaded)
        # A writer that opened it during the upload or until the rename, the last instant
        # a name reached it: a /proc view taken from now on.
        check_no_writer(job, fd, uploaded, time.monotonic(), True)
    except StillWritten:
        give_back(parent_fd, aside, found.name)
        raise
    seam("unlink", found.name)
    try:
        return let_go(job, parent_fd, aside, found, uploaded)
    except (OSError, FileError, StillWritten):   # not archived: left in place
        give_back(parent_fd, aside, found.name)
        raise


def remove_file(job, parent_fd, fd, found, uploaded, aside):
    """Unlink (or archive) the file only if it is still the one read, unchanged, no
    process writes it, and its directory is still where the scan saw it: renamed to its
    aside name within its directory, checked there, unlinked or archived (never whatever
    took the name meanwhile). Returns its path in DIR under --archive-dir, else None."""
    if not check_still_read(parent_fd, fd, found.name, uploaded):
        return
    check_directory_in_place(job.root, found.directory.steps)   # not moved away meanwhile
    if aside is None:   # an earlier run's aside name, or a name too long for one
        why = None if ASIDE.match(found.name) else "its name is too long for one"
        return unlink_by_name(job, parent_fd, fd, found, uploaded, why)
    seam("rename", found.name)
    try:
        os.rename(found.name, aside, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    except FileNotFoundError:
        return   # removed by another process meanwhile: nothing to do
    except OSError as exc:
        return unlink_by_name(job, parent_fd, fd, found, uploaded, exc.strerror)
    return unlink_aside(job, parent_fd, fd, found, uploaded, aside)


def aside_left_over(job, parent_fd, found, key):
    """An earlier run's aside name that the ledger does not vouch for (that run kept no
    ledger, or a new version came to it at the instant of a removal): given back under
    its name where that is free, for a later run to move (LeftAlone); else it goes to a
    key of its own (key, made from the aside name), never to its name's, which another
    file holds."""
    name = key_name(found.name)
    if give_back(parent_fd, found.name, name):
        raise StillWritten("an earlier run's aside name, given back as %s for a later run"
                           % safe_name(name))
    job.report.notices.warning(
        "%s was left under an aside name by an earlier run, and %s is taken (or this "
        "filesystem has no hard links to give it back): it goes to a key of its own, %s" % (
            safe_name(os.path.join(job.source, found.relative)), safe_name(name),
            job.destination.url(key)))


def in_archive(job, found, info):
    """Whether DIR holds the file of that stat at its relative path already (see
    archived_as), its folders entered as archive_file does, none made."""
    if job.archive is None:
        return False
    try:
        folder = open_archive_folder(job.archive, found.directory.relative, make=False)
    except (OSError, FileError):
        return False
    try:
        return archived_as(folder, key_name(found.name), info) is not None
    finally:
        os.close(folder)


def check_own_links(job, found, fd, info):
    """check_links; but a file of two links whose other one is its own in DIR (a run
    killed between the link into DIR and the unlink, where fs.protected_hardlinks is off:
    macOS, the BSDs) passes when the ledger vouches for it. Returns that record, or None."""
    if info.st_nlink == 2 and not job.allow_hardlinks and in_archive(job, found, info):
        record = job.ledger.vouching(found, fd, info, job.endpoint)
        if record is not None:
            return record
    check_links(info, job.allow_hardlinks)
    return None


def confirmation(job, found, info, key, proof, fields):
    """The ledger's record of an upload the server confirmed (see Ledger)."""
    ident, aside = job.asides.new(found.name)
    if ASIDE.match(found.name):   # an earlier run's aside name: unlinked as it is
        aside = None
    path = os.path.join(job.source, found.relative)
    record = dict(fields, **{
        "id": ident, "run": job.run_id, "time": time.strftime(ISO_SECONDS, time.gmtime()),
        "path": key_text(path), "endpoint": job.endpoint,
        "bucket": job.destination.bucket, "key": key, "size": info.st_size,
        "mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(
            info.st_mtime_ns // 10 ** 9)) + ".%09dZ" % (info.st_mtime_ns % 10 ** 9),
        "checksum": {proof.checksum: proof.value}, "etag": proof.etag,
        "version_id": proof.version_id or None,
        "file": ledger_identity(info), "dir": found.directory.relative,
        "name": found.name, "aside": aside})
    original = percent_bytes(path)
    if original:   # not UTF-8: path is escaped as its key is; these are its bytes
        record["path_bytes"] = original
    return record


def check_before_upload(job, found, fd, info):
    """Steps 2 to 4 of move_file for the file open as fd (info: its fstat): raise unless
    no process writes it, it is the version the scan saw, and it is ours to send and to
    remove. Returns its fstat after the writer check, and the ledger's record of it if
    check_own_links already asked the ledger (else None)."""
    # 2. No writer now: what one adds after the upload would go into a removed file, so
    # a file still written is not even sent (checked again before removal).
    check_no_writer(job, fd, info, float("-inf"), False)
    info = os.fstat(fd)   # after the check: a writer's last words count as a change
    # 3. The file the scan saw: its key was made from the scan's mtime.
    if not same_version(found.info, info):
        raise StillWritten("changed since the scan; left for a later run")
    # 4. Ours to send and to remove: no other account's file linked in, and not
    # immutable (that one each run would send again).
    record = check_own_links(job, found, fd, info)
    if fixed_in_place(fd, info):
        raise UnremovableError("is immutable or append-only (chattr +i, +a): no account "
                               "may remove it, so it is not uploaded; chattr -i -a it to "
                               "have it moved", 1)
    return info, record


def move_file(client, job, found, key):
    """One file from its open to its unlink: upload it to key (one PUT, or multipart
    above the threshold) unless the ledger vouches that the server holds it already,
    record that, then remove it (or archive it: --archive-dir). Returns its ledger record
    and its path in DIR (None: unlinked, or not reached).

    A generator: once the record of an upload is written it yields, its file open, and
    its worker sends its next file before it goes on (see worker). By then another
    worker's fsync most often made the record durable already: one fsync serves many
    files, and none waits for it with nothing to do."""
    try:
        parent = open_directory(job.root, found.directory.steps)
    except OSError as exc:
        raise FileError("cannot open its directory (%s); left in place" % exc.strerror)
    record = archived = None
    try:
        # 1. Open it through its directory: never through a symlink, never a FIFO.
        fd, info = open_regular_file(parent, found.name)
        try:
            # 2-4. No writer, the version the scan saw, ours to send and to remove.
            info, record = check_before_upload(job, found, fd, info)
            # 5. Uploaded and proven, unless an earlier run's were and it was killed then.
            if record is None:
                record = job.ledger.vouching(found, fd, info, job.endpoint)
            if record is None:
                if ASIDE.match(found.name):
                    aside_left_over(job, parent, found, key)
                key, proof, fields = upload_file(client, job, fd, info, found, key)
                seam("confirmed", found.name)
                # 6. Recorded durably before anything is renamed or removed.
                record = confirmation(job, found, info, key, proof, fields)
                line = job.ledger.write(record)
                seam("written", found.name)
                yield   # the worker's next file goes up meanwhile
                job.ledger.sync(line)
            # 7. Its line in the manifest: part of the move, so a line that fails keeps it.
            if not record.get("line_written") and job.manifest.write(record):
                job.ledger.exported(record)
            seam("recorded", found.name)
            # 8. Removed: still the file read, unchanged, unwritten; set aside, checked;
            # unlinked, or linked into --archive-dir first.
            archived = remove_file(job, parent, fd, found, info, record["aside"])
            seam("removed", found.name)
            job.ledger.resolved(record)
        finally:
            os.close(fd)
    except OSError as exc:   # reading it is upload_file's to report
        raise FileError("cannot %s (%s); left in place" % (
            "check it before its upload" if record is None else "%s it once uploaded" % (
                "archive" if job.archive else "remove"), exc.strerror))
    finally:
        os.close(parent)
    return record, archived


class FileTask(object):
    """One file to move: upload, verify, delete; the outcome goes to the run's report.
    perform() takes it to its upload's record; when that is left to finish (see
    move_file), it returns itself, and finish() takes it to its end."""

    def __init__(self, job, found):
        self.job, self.found = job, found
        self.url = None
        self.steps = None

    def brief(self):
        """Small: a file stopped at its record may wait through this one's upload."""
        return self.found.info.st_size < WIDE_BODY_BYTES

    def perform(self, client):
        self.steps = self.move(client)
        return self if self.advance() else None

    def finish(self):
        if self.advance():
            raise RuntimeError("the move of a file stopped twice")   # see move_file

    def move(self, client):
        key = self.job.objects.template.key_for(self.found)   # from the scan's mtime: a
        self.url = self.job.destination.url(key)               # file changed since is left
        return (yield from move_file(client, self.job, self.found, key))

    def advance(self):
        """Run the move on: True when it stopped part-way, else its outcome is reported."""
        job, found = self.job, self.found
        path = os.path.join(job.source, found.relative)
        try:
            next(self.steps)
            return True
        except StopIteration as done:
            record, archived = done.value
        except StillWritten as exc:
            job.report.left_open(path, exc, job.verbose, found.info.since_ns,
                                 job.warn_waiting)
            return False
        except Vanished as exc:
            job.report.vanished(path, exc)
            return False
        except S3PushError as exc:
            job.report.failed(path, self.url, exc)
            if exc.fatal:
                job.queue.stop()
            return False
        job.report.moved(path, job.destination.url(record["key"]), record["size"],
                         found.directory, job.verbose, record["version_id"],
                         archived and os.path.join(job.archive.path, archived))
        return False


def finish_waiting(waiting, keep=0):
    """Finish the FileTasks stopped at their records (see worker), oldest first, but the
    last keep of them."""
    while len(waiting) > keep:
        waiting.pop(0).finish()


def worker(job):
    """Run tasks until the queue is done, over this worker's own connection. A file whose
    move stopped at its record (see move_file) is finished once the next task is done if
    that is a small file's, else before it, and at once when there is no task to take
    without waiting."""
    client = job.new_client()
    waiting = []   # the FileTask stopped at its record (for a moment, the next one too)
    try:
        while True:
            task = job.queue.next_task(wait=not waiting)
            if task is NOT_NOW or task is None or not task.brief():
                finish_waiting(waiting)
                if task is None:
                    return
                if task is NOT_NOW:
                    continue
            try:
                stopped = task.perform(client)
            finally:
                job.queue.performed(task)
            if stopped is not None:
                waiting.append(stopped)
            finish_waiting(waiting, keep=1 if stopped is not None else 0)
    except Exception as exc:   # a bug: stop the run, keep the files, say where
        job.queue.stop()
        job.report.crashed(exc)
        try:   # the files uploaded and recorded before it: removed, and reported
            finish_waiting(waiting)
        except Exception:
            pass   # the same bug again: said once, and the file stays, recorded
    finally:
        for task in waiting:   # never finished: closed, its file kept
            task.steps.close()
        client.close()


# === The run ===


def show_progress(report, done):
    """The live status line on stderr, until done is set."""
    while not done.wait(PROGRESS_INTERVAL):
        report.show_status()
    with report.lock:
        report.clear_status()
        report.progress = False


def move_all(job, files):
    """Feed the scan's files to the workers and wait for them; SIGTERM stops the feed."""
    CPUS.narrow()   # this thread (the scan's) and the workers: see CpuPlacement
    workers = [threading.Thread(target=worker, args=(job,), daemon=True)
               for _ in range(job.worker_count)]
    for thread in workers:
        thread.start()
    done = threading.Event()
    status_line = threading.Thread(target=show_progress, args=(job.report, done), daemon=True)
    if job.report.progress:
        status_line.start()
    try:
        for found in files:
            if job.deadline.passed() or not job.queue.add_file(FileTask(job, found)):
                break
            job.report.queued(found.info.st_size)
        job.report.tally.scan_done = True
        job.queue.done_producing()
        for thread in workers:
            while thread.is_alive():
                thread.join(0.5)   # a timed join lets signals through on every Python
                if job.deadline.passed() and not job.queue.stopped:
                    job.queue.stop()   # no new file or part; requests in flight finish
        if job.deadline.passed():
            job.report.out_of_time()
    except BaseException:
        job.queue.stop()   # in-flight uploads are abandoned; nothing unconfirmed is deleted
        raise
    finally:
        done.set()
        if status_line.is_alive():
            status_line.join(1)


def print_plan(source, files, destination, report, compress, archive_dir):
    """Print where each file would go (and under --archive-dir, the folder of DIR it would
    be archived in); names that cannot be keys are reported. The lines go out a thousand
    at a time (a plan may have millions). Under --compress, by the name alone: a file
    whose first bytes show it compressed goes as it is after all."""
    template = Template(destination.prefix, whole_key=destination.whole_key)
    base, lines = os.path.join(source, ""), []
    for found in files:
        try:
            key = template.key_for(found)
            if goes_gzipped(compress, found.name):   # by the name alone
                key = gzip_key(key)
        except FileError as exc:
            report.failed(base + found.relative, None, exc)
            continue
        lines.append("would move %s -> %s (%d bytes)%s" % (
            safe_name(base + found.relative), destination.url(key), found.info.st_size,
            ", then archive it in %s" % safe_name(os.path.join(
                archive_dir, found.directory.relative)) if archive_dir else ""))
        if len(lines) == 1000:
            report.notices.line(sys.stdout, "\n".join(lines), flush=False)
            lines = []
    if lines:
        report.notices.line(sys.stdout, "\n".join(lines))
    sys.stdout.flush()


def first_and_rest(iterator):
    """(first item, iterator over all items) or (None, None) when it is empty."""
    first = next(iterator, None)
    if first is None:
        return None, None
    return first, itertools.chain([first], iterator)


def manifest_key(template, run, started):
    """--manifest-key filled in for a run: {run_id}, and the time placeholders of its
    start (so a later run sending its object sends it where it would have gone)."""
    when = datetime.datetime.fromtimestamp(started, datetime.timezone.utc)
    hostname = socket.gethostname() if "{hostname}" in template else ""
    return expand_template(template, hostname, when, started, {"run_id": run})


def pending_objects(options, state, destination):
    """The PendingObjects of this source and destination (in a usable state folder)."""
    return PendingObjects(pair_folder(state.path, options.source, destination))


def objects_waiting(options, state, destination, notices):
    """Whether a run that found no file has earlier runs' manifest objects to send: only
    under --manifest-key does it pay for the deferred modules (hashlib names the folder)."""
    if not options.manifest_key or options.dry_run or state.fd is None:
        return False
    load_deferred_modules()
    return bool(pending_objects(options, state, destination).earlier("", notices))


def begin_manifest(job, options, state):
    """Open the manifest before the first file and, under --manifest-key, record this
    run's object as pending (before its first line): (this run's ManifestObject, the
    PendingObjects or None)."""
    try:
        job.manifest.open()
    except OSError as exc:
        raise FileError("cannot write the manifest %s (%s): no file moved, every file kept"
                        % (safe_name(options.manifest), exc.strerror or exc))
    if not options.manifest_key:
        return None, None
    run = job.manifest.run
    own = ManifestObject(run, manifest_key(options.manifest_key, run, job.report.tally.started_at),
                         job.manifest.place)
    if state.fd is None:   # a lasting state of the host, as for resume journals
        job.report.notices.note("no usable state folder: should a --manifest-key upload "
                                "fail, no later run sends its object")
        return own, None
    pending = pending_objects(options, state, job.destination)
    try:
        pending.add(own)
    except OSError as exc:
        job.report.notices.warning("cannot keep a record of this run's --manifest-key object "
                                   "in %s (%s): should its upload fail, no later run sends "
                                   "it" % (safe_name(pending.folder), exc.strerror or exc),
                                   once="pending-object")
    return own, pending


def upload_manifest(job, item):
    """One run's manifest object: its lines, sent with their MD5 and checked like any
    file's; none, no PUT. True when nothing is left to send: sent, none, or its lines are
    gone (a warning); False after a failure (one error line)."""
    path = safe_name(item.place.path)
    try:
        lines = run_lines(item.place, item.run, job.report.notices)
    except FileNotFoundError:
        lines = None
    except OSError as exc:
        job.report.failed(path, None, FileError("cannot read the manifest back (%s)"
                                                % (exc.strerror or exc)))
        return False
    if lines is None:
        job.report.notices.warning("the lines of run %s are gone from the manifest %s "
                                   "(rotated or cut): its object %s was never sent" % (
                                      item.run, path, job.destination.url(item.key)))
        return True
    if item.run == job.run_id and len(lines) < job.manifest.written:
        job.report.notices.warning(
            "the manifest %s holds %d of the %d lines this run wrote (cut by a rotation, "
            "e.g. logrotate's copytruncate?): its object %s lists only those" % (
                path, len(lines), job.manifest.written, job.destination.url(item.key)))
    if not lines:
        return True
    body = b"".join(lines)
    digest = digest_bytes(body, MD5)
    sending = Sending({}, {}, job.objects.verify_md5, True)   # its SHA-256 signed too
    client = job.new_client()
    try:
        headers = body_headers(digest, MD5, "application/x-ndjson")
        response = client.request("PUT", item.key, headers, body, digest.payload_hash,
                                  validate=lambda answer:
                                  MD5.confirm(answer, digest.value, sending))
        check_answer(response, "")
    except S3PushError as exc:
        job.report.failed(path, job.destination.url(item.key), exc)
        return False
    finally:
        client.close()
    return True


def send_manifest_objects(job, own, pending):
    """--manifest-key: the objects of earlier runs not yet confirmed (an upload that
    failed, a run killed), the oldest first, then this run's; each record removed once
    its object is sent. The first failure stops: the rest wait for the next run."""
    earlier = pending.earlier(own.run, job.report.notices) if pending is not None else []
    for item in earlier + [own]:
        if not upload_manifest(job, item):
            return
        if pending is not None:
            pending.remove(item.run)


def move_or_plan(options, environ, settings, destination, report, files, root, asides,
                 state, archive):
    """Dry run, or move the files, then remove the directories they left empty."""
    if options.dry_run:
        print_plan(options.source, files, destination, report, options.compress,
                   options.archive_dir)
        return
    if options.compress is not None and state.fd is None:
        raise ConfigError("--compress spools each gzip in the private state folder, and "
                          "there is none usable (see the warning above, or no HOME): fix "
                          "--state-dir")
    session = Session(settings, destination.bucket, report.notices,
                      lambda: load_settings(options, environ).credentials)
    session.debug = options.debug
    report.progress = sys.stderr.isatty() if options.progress is None else options.progress
    job = Job(options, session, destination, report, root, asides, state, archive)
    job.ledger.open()
    if job.pair is not None:
        mark_host(job.pair, options.source, report.notices)
    try:
        own, pending = begin_manifest(job, options, state)
        move_all(job, files)
    finally:   # a kill -9 leaves the ledger to the next run as it is
        job.ledger.close(root)
        job.manifest.close()
    if own is not None:
        send_manifest_objects(job, own, pending)
    if job.journals is not None:
        job.journals.sweep(root, time.time())
    if job.pair is not None:
        remove_torn_writes(job.pair, time.time())
    if options.delete_empty_dirs:
        remove_empty_dirs(root, report.tally.moved_from)


def read_globs(path, option):
    """The globs of a pattern file (--exclude-from, --include-from): one a line; blank
    lines and lines starting with '#' are skipped."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError("cannot read %s %s (%s): fix the path" % (
            option, safe_name(path), getattr(exc, "strerror", None) or "not UTF-8 text"))
    return tuple(line for line in lines if line.strip() and not line.startswith("#"))


def filters(options):
    """(exclude globs, include globs) from --exclude, --exclude-from, --include,
    --include-from; the default excludes always."""
    excludes = DEFAULT_EXCLUDES + tuple(options.exclude)
    includes = tuple(options.include)
    for path in options.exclude_from:
        excludes += read_globs(path, "--exclude-from")
    for path in options.include_from:
        includes += read_globs(path, "--include-from")
    return excludes, includes


def take_run_lock(state, root, notices):
    """(held, the holder's LockHolder or None): the run lock (see run_lock) in the state folder;
    where that folder cannot keep it, a flock on SOURCE_DIR itself, said on stderr: a
    lock any reader of SOURCE_DIR could hold, but a run that runs."""
    problem = state.problem
    if state.fd is not None:
        try:   # the lock's descriptor stays open (and the lock held) until the process ends
            fd, holder = run_lock(state.fd, source_lock_name(root))
            return fd is not None, holder
        except OSError as exc:
            problem = "%s: %s" % (safe_name(state.path), exc.strerror or exc)
    notices.warning("cannot keep the run lock (%s): locking SOURCE_DIR itself, which any "
                    "account that may read it can hold; fix --state-dir or HOME" % problem)
    try:
        return try_lock(root), None
    except OSError as exc:   # e.g. ENOLCK: SOURCE_DIR on NFS without a lock manager
        raise ConfigError("cannot lock SOURCE_DIR either (%s): nothing moved; give s3push a "
                          "state folder of this account's alone with --state-dir"
                          % (exc.strerror or exc))


def take_path_lock(state_dir, source):
    """(held, the holder's LockHolder or None): the lock of SOURCE_DIR's path (see
    path_lock_name) in the state folder, taken before anything looks at SOURCE_DIR. A run
    hung in that look (a dead network mount) so keeps the later ones out, said by
    kept_out, instead of their piling up behind it, each hung in turn. Held, and not
    taken, where the state folder is not there yet (it is made once SOURCE_DIR is found),
    is spelt inside SOURCE_DIR (it would hang as well), or cannot keep it (take_run_lock
    says so). The descriptor stays open (the lock held) until the process ends."""
    try:   # (abspath: the working directory may be gone; check_source then says so)
        inside = os.path.relpath(os.path.abspath(state_dir), os.path.abspath(source)) \
            if state_dir else os.curdir
    except OSError:
        return True, None
    if inside != os.pardir and not inside.startswith(os.pardir + os.sep):
        return True, None
    state = open_state_folder(state_dir, make=False)
    if state.fd is None:
        return True, None
    try:
        fd, holder = run_lock(state.fd, path_lock_name(source))
    except OSError:
        return True, None
    finally:
        os.close(state.fd)
    return fd is not None, holder


def warn_future_dated(selection, source, notices):
    """One warning naming the first future-dated files the scan met, and counting them."""
    if not selection.future_count:
        return
    names = ", ".join(safe_name(os.path.join(source, relative))
                      for relative in selection.future)
    more = selection.future_count - len(selection.future)
    notices.warning(
        "%d file%s dated more than %ds ahead of this host's clock (a writer's clock ahead, "
        "tar, touch): %s%s; their age is judged by their ctime, which the kernel sets at "
        "every change, and their keys keep the mtime as it is" % (
            selection.future_count, "" if selection.future_count == 1 else "s",
            FUTURE_SLACK, names, " and %d more" % more if more else ""))


def kept_out(options, report, holder, now):
    """Another run holds the lock (holder: its LockHolder): this one exits, saying so in a
    line, or in a warning once the holder has held it for --lock-warn-after, since a
    stopped or hung run (SIGSTOP, a dead NFS mount) keeps every later one out."""
    tally = report.tally
    tally.skipped_for = holder.pid or 0
    if holder.since is not None:
        tally.lock_held_seconds = round(max(now - holder.since, 0), 3)
    if tally.lock_held_seconds is None or tally.lock_held_seconds < options.lock_warn_after:
        report.notices.line(sys.stderr, "s3push: another run (pid %s) is moving %s; this "
                            "one exits" % (holder.pid or "unknown", safe_name(options.source)))
        return
    report.notices.warning(
        "another run (pid %d) has held the lock of %s since %s (%d s, over "
        "--lock-warn-after %ds): no run moves files until it ends; is it stopped or hung? "
        "(ps -o pid,stat,etime,wchan -p %d); this one exits" % (
            holder.pid, safe_name(options.source), time.strftime(
                ISO_SECONDS, time.gmtime(holder.since)), tally.lock_held_seconds,
            options.lock_warn_after, holder.pid))


def push_locked(options, environ, report, destination, root, state, archive, patterns):
    """Lock SOURCE_DIR (open as root), scan it with patterns (see filters), move what the
    scan finds (archive: --archive-dir's Archive, or None)."""
    if not options.dry_run:
        held, holder = take_run_lock(state, root, report.notices)
        if not held:
            kept_out(options, report, holder or LockHolder(None, None), time.time())
            return EXIT_OK
    errors = []
    excludes, includes = patterns
    now = time.time_ns() if hasattr(time, "time_ns") else int(time.time() * 1e9)
    selection = Selection(excludes, includes, now - int(options.min_age * 1e9),
                          options.min_size, options.max_size, now)
    asides = AsideNames(recover=not options.dry_run)
    ordered = oldest_first(scan(root, selection, errors, asides), ORDER_WINDOW,
                           Spill(state), report.notices)
    try:
        first, files = first_and_rest(ordered)
        if first is not None or objects_waiting(options, state, destination,
                                                report.notices):
            load_deferred_modules()
            settings = load_settings(options, environ)
            if options.splay and not options.dry_run:   # a fleet's cron ticks spread out
                time.sleep(random.uniform(0, options.splay))
            warn_if_exposed(settings.credentials, report.notices)
            report.credentials = settings.credentials
            move_or_plan(options, environ, settings, destination, report, files or (),
                         root, asides, state, archive)
    finally:
        ordered.close()   # the scan's descriptors and the spilled runs, now
        # Whole once the first file came, unless the order gave way (see oldest_first)
        # and the run stopped before the scan's end.
        report.tally.left.add_all(selection.left)
        warn_future_dated(selection, options.source, report.notices)
    for relative, exc in errors:   # a FileError, or TreeChanged
        path = os.path.join(options.source, relative)
        if isinstance(exc, Vanished):
            report.vanished(path, exc)
        else:
            report.failed(path, None, exc)
    if options.verbose:
        report.notices.line(sys.stdout, report.tally.summary())
    return report.tally.exit_status()


def check_platform():
    """ConfigError where this Python cannot reach files through a directory's descriptor
    (the *at() calls of POSIX.1-2008; every Linux, macOS 10.10+, the BSDs): the walk needs
    them to stay inside SOURCE_DIR whatever a writer does."""
    missing = [call.__name__ for call in (os.open, os.stat, os.mkdir, os.rename, os.unlink,
                                          os.rmdir, os.link) if call not in os.supports_dir_fd]
    if os.listdir not in os.supports_fd:
        missing.append("listdir")
    if missing:
        raise ConfigError("this Python cannot use os.%s through a directory's descriptor, "
                          "which s3push needs to stay inside SOURCE_DIR: run it with a "
                          "Python built for this system (3.6+)" % ", os.".join(missing))


def check_source(source):
    if not os.path.isdir(source):
        what = "does not exist" if not os.path.exists(source) else "is not a directory"
        raise NoInputError("SOURCE_DIR %s %s: check the path" % (safe_name(source), what))
    if not os.access(source, os.R_OK | os.X_OK):
        raise NoInputError("SOURCE_DIR %s is not readable by this user: fix its permissions"
                           % safe_name(source))


OUTPUT_FILES = (("log_file", "--log-file"), ("manifest", "--manifest"),
                ("summary_json", "--summary-json"), ("metrics_file", "--metrics-file"))


def check_outside_scan(options, selection, state_dir, setting="--state-dir"):
    """A UsageError for a path of the run's own that the scan would meet in SOURCE_DIR
    (see scan_reaches; a hidden name never is): the state folder (named by setting),
    whose ledger and journals would be moved like any file, or a file the run writes
    (OUTPUT_FILES), which a run would leave as still written, or move away."""
    source = os.path.realpath(options.source)
    named = [(state_dir, setting, True)] + [(getattr(options, attribute), option, False)
                                            for attribute, option in OUTPUT_FILES]
    for path, setting, folder in named:
        inside = path and os.path.relpath(os.path.realpath(path), source)
        if not inside or inside == os.pardir or inside.startswith(os.pardir + os.sep):
            continue
        if inside != os.curdir and not scan_reaches(inside.replace(os.sep, "/"), selection,
                                                    folder):
            continue
        if folder:
            raise UsageError("the state folder %s (%s) is inside SOURCE_DIR: its ledger and "
                             "journals would be moved like any file; choose a folder outside "
                             "it" % (safe_name(path), setting))
        raise UsageError("the file %s (%s) is inside SOURCE_DIR, where the run would meet "
                         "its own output as a file to move: write it outside SOURCE_DIR, "
                         "or --exclude it" % (safe_name(path), setting))


class Archive(collections.namedtuple("Archive", "path fd")):
    """--archive-dir: DIR as given, and the descriptor every file is archived through."""
    __slots__ = ()


def ancestry(fd):
    """(device, inode) of the directory open as fd and of each one above it, up to the
    root: its place as the kernel walks "..", whatever symlinks or bind mounts named it."""
    seen, fd = [], os.dup(fd)
    try:
        while True:
            info = os.fstat(fd)
            if seen and seen[-1] == (info.st_dev, info.st_ino):
                return set(seen)
            seen.append((info.st_dev, info.st_ino))
            parent = os.open(os.pardir, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent
    finally:
        os.close(fd)


def across_mounts(root_fd, fd):
    """Whether the kernel refuses links from the directory open as root_fd into the one
    open as fd (EXDEV): a bind mount of the same filesystem (the same st_dev). Probed
    with a rename of ".", which POSIX has always fail (Linux: EBUSY, after the mounts are
    compared): a name that does not exist could be made by a writer meanwhile, and moved."""
    try:
        os.rename(os.curdir, os.curdir, src_dir_fd=root_fd, dst_dir_fd=fd)
    except OSError as exc:
        return exc.errno == errno.EXDEV
    return False


def open_archive(path, root_fd):
    """--archive-dir DIR opened once, before anything moves; a UsageError where it is no
    directory, lies on another filesystem or mount than SOURCE_DIR (open as root_fd: a
    file is linked into DIR, never copied), is inside SOURCE_DIR (the scan would move its
    files again), holds it (a file's relative path in DIR could lead back into
    SOURCE_DIR), or other accounts may write in it (they could take or read its files)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise UsageError("--archive-dir %s: %s; make it on SOURCE_DIR's filesystem" % (
            safe_name(path), exc.strerror))
    try:
        source, archive = os.fstat(root_fd), os.fstat(fd)
        if source.st_dev != archive.st_dev:
            why = "is on another filesystem than SOURCE_DIR (files are linked into it, " \
                "never copied)"
        elif across_mounts(root_fd, fd):
            why = "is on another mount than SOURCE_DIR (a bind mount: the kernel links " \
                "no file across mounts)"
        elif (source.st_dev, source.st_ino) in ancestry(fd):
            why = "is inside SOURCE_DIR (its files would be moved again)"
        elif (archive.st_dev, archive.st_ino) in ancestry(root_fd):
            why = "holds SOURCE_DIR (a file's path in it could lead back into SOURCE_DIR)"
        elif others_may_write(archive):
            why = "is owned by uid %d, mode %04o: other accounts may write in it (and take " \
                "or read the files archived there)" % (
                    archive.st_uid, stat.S_IMODE(archive.st_mode))
        else:
            return Archive(path, fd)
        raise UsageError("--archive-dir %s %s: choose a folder beside SOURCE_DIR, on its "
                         "mount, that only this account may write in" % (safe_name(path), why))
    except BaseException:
        os.close(fd)
        raise


def push_source(options, environ, report, destination, state, patterns):
    """Open SOURCE_DIR and --archive-dir, and move (push_locked)."""
    try:
        root = open_source(options.source)
    except OSError as exc:
        raise NoInputError("cannot open SOURCE_DIR %s (%s): check the path"
                           % (safe_name(options.source), exc.strerror))
    try:
        archive = open_archive(options.archive_dir, root) if options.archive_dir else None
    except BaseException:
        os.close(root)
        raise
    try:
        return push_locked(options, environ, report, destination, root, state, archive,
                           patterns)
    finally:
        os.close(root)
        if archive is not None:
            os.close(archive.fd)


def push(options, environ, report):
    """The whole run after argument parsing; returns the exit status.

    Nothing looks at SOURCE_DIR before the lock of its path is held (see take_path_lock).
    Nothing beyond the scan happens until it finds a file: an idle tick reads no
    settings and loads no network code.
    """
    destination = parse_destination(options.destination)
    check_upload_options(options, time.time())
    check_platform()
    state_dir = options.state_dir or default_state_dir(environ)
    if not options.dry_run:
        held, holder = take_path_lock(state_dir, options.source)
        if not held:
            kept_out(options, report, holder or LockHolder(None, None), time.time())
            return EXIT_OK
    check_source(options.source)
    patterns = filters(options)
    check_outside_scan(options, Selection(*patterns), state_dir,
                       "--state-dir" if options.state_dir else "XDG_STATE_HOME or HOME")
    state = open_state_folder(state_dir)
    try:
        return push_source(options, environ, report, destination, state, patterns)
    finally:
        if state.fd is not None:
            os.close(state.fd)


def replace_file(path, text, what, notices):
    """Replace path with text atomically (a monitor never reads half); a warning if not."""
    try:
        write_atomically(path, text.encode("utf-8"), 0o666)
    except OSError as exc:
        notices.warning("cannot write the %s to %s (%s)" % (what, path, exc.strerror or exc))


def write_summary(path, data, notices):
    """--summary-json: the run's summary as JSON."""
    import json
    replace_file(path, json.dumps(data, indent=1, sort_keys=True) + "\n", "summary",
                 notices)


# The kinds of failure the metrics count, by exit status.
FAILURE_KINDS = {EXIT_FILES_LEFT: "file", EXIT_TEMPFAIL: "temporary",
                 EXIT_NO_PERMISSION: "permission", EXIT_CONFIG: "config",
                 EXIT_SOFTWARE: "internal"}
LAST_SUCCESS = "s3push_last_success_timestamp_seconds"


def prometheus_labels(labels):
    """{name="value",...} with backslash, quote and newline escaped as the format wants."""
    return "{%s}" % ",".join('%s="%s"' % (name, value.replace("\\", "\\\\").replace(
        '"', '\\"').replace("\n", "\\n")) for name, value in labels)


def previous_success(path):
    """The last success time a metrics file written before holds, or None."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(LAST_SUCCESS + "{"):
                    return float(line.rsplit(None, 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def metrics_text(data, failures, now, last_success):
    """The run (summary_data) in the Prometheus text format, for node_exporter's textfile
    collector: one gauge per figure, labelled with the source and the destination."""
    base = (("source", data["source"]), ("destination", data["destination"]))
    rows = [("s3push_files_moved", "files moved by the last run", (), data["files_moved"]),
            ("s3push_bytes_moved", "bytes moved by the last run", (), data["bytes_moved"])]
    for code, kind in sorted(FAILURE_KINDS.items()):
        rows.append(("s3push_files_failed", "files the last run failed to move, by kind",
                     (("kind", kind),), failures.get(code, 0)))
    for reason, seconds in sorted(data["files_left_oldest_seconds"].items()):
        rows.append(("s3push_files_left_oldest_seconds", "the age of the oldest file left for "
                     "a later run, by reason (0: none)", (("reason", reason),), seconds))
    rows += [("s3push_files_left", "files left for a later run, by reason",
              (("reason", "young"),), data["files_left_young"]),
             ("s3push_files_left", "files left for a later run, by reason",
              (("reason", "size"),), data["files_left_size"]),
             ("s3push_files_left", "files left for a later run, by reason",
              (("reason", "writing"),), data["files_left_writing"]),
             ("s3push_files_left", "files left for a later run, by reason",
              (("reason", "unremovable"),), data["files_left_unremovable"]),
             ("s3push_run_seconds", "how long the last run took", (), data["seconds"]),
             ("s3push_run_skipped", "1 when the last run exited at once: another run of "
              "this account was moving SOURCE_DIR", (), int(data["run_skipped"])),
             ("s3push_lock_held_seconds", "how long another run had held the run lock when "
              "the last run found it held (0: none held it, or not known)", (),
              data["lock_held_seconds"] or 0),
             ("s3push_exit_status", "the exit status of the last run", (),
              data["exit_status"]),
             ("s3push_last_run_timestamp_seconds", "when the last run ended", (), now)]
    if last_success is not None:
        rows.append((LAST_SUCCESS, "when a run last ended with exit status 0", (),
                     last_success))
    lines, said = [], set()
    for name, text, labels, value in rows:
        if name not in said:
            said.add(name)
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s gauge" % name]
        lines.append("%s%s %s" % (name, prometheus_labels(base + labels), value))
    return "\n".join(lines) + "\n"


def write_metrics(path, data, failures, notices):
    """--metrics-file: the run's figures, and the last success carried over from before
    (a run that found another one moving SOURCE_DIR is no success: a run stuck for hours
    shows as the success getting old)."""
    now = round(time.time(), 3)
    success = data["exit_status"] == EXIT_OK and not data["run_skipped"]
    last_success = now if success else previous_success(path)
    replace_file(path, metrics_text(data, failures, now, last_success), "metrics", notices)


# === Command line ===


def account_id(text):
    if not ACCOUNT_ID.match(text):
        raise argparse.ArgumentTypeError("%r is not a 12-digit AWS account id" % text)
    return text


CANNED_ACLS = ("private", "public-read", "public-read-write", "authenticated-read",
               "aws-exec-read", "bucket-owner-read", "bucket-owner-full-control")


def upper_word(text):
    if not re.match(r"^[A-Z][A-Z0-9_]*$", text):
        raise argparse.ArgumentTypeError("%r is not a storage class such as STANDARD_IA" % text)
    return text


def compress_argument(text):
    """--compress gzip or gzip:LEVEL: the zlib level, 1 to 9 (6 by default, as gzip's)."""
    if text == "gzip":
        return 6
    if text[:-1] == "gzip:" and text[-1] in "123456789":
        return int(text[-1])
    raise argparse.ArgumentTypeError("%r: give gzip, or gzip:LEVEL with LEVEL 1 to 9"
                                     % text)


def add_upload_options(group):
    group.add_argument("--storage-class", type=upper_word, metavar="CLASS",
                       help="e.g. STANDARD_IA, INTELLIGENT_TIERING, GLACIER_IR")
    group.add_argument("--sse", choices=("AES256", "aws:kms", "aws:kms:dsse"),
                       help="server-side encryption; under aws:kms the ETag is no MD5, and "
                       "the signed Content-MD5 the server checks vouches for the bytes")
    group.add_argument("--sse-kms-key-id", metavar="KEY", help="the KMS key for --sse aws:kms")
    group.add_argument("--acl", choices=CANNED_ACLS, help="a canned ACL, e.g. "
                       "bucket-owner-full-control (needs s3:PutObjectAcl)")
    group.add_argument("--content-type", metavar="TYPE",
                       help="Content-Type of every object (default: guessed from the name)")
    group.add_argument("--compress", type=compress_argument, metavar="gzip[:LEVEL]",
                       help="send each file gzip-compressed (level 1-9, default 6) to its "
                       "key plus .gz, Content-Type application/gzip, its own size in "
                       "x-amz-meta-s3push-size; files compressed already (by extension or "
                       "first bytes: .gz .zst .zip .jpg .mp4 ...) go as they are. Spooled "
                       "in the state folder; checked to gunzip to the file before it is sent")
    group.add_argument("--sign-payload", action="store_true",
                       help="sign each body's SHA-256 too (for bucket policies that demand "
                       "s3:x-amz-content-sha256); by default bodies go UNSIGNED-PAYLOAD under "
                       "their signed Content-MD5, which the server checks: one hash, not two")


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("%r is not a whole number >= 0" % text)
    return value


def positive_int(text):
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


def size_argument(text):
    """Bytes from '8388608', '8M', '8MiB', '1.5G' (binary units)."""
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError("%r is not a size such as 64MiB or 1G" % text)
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def part_size_argument(text):
    value = size_argument(text)
    if value < MIN_PART_BYTES:
        raise argparse.ArgumentTypeError("%r is below S3's minimum part size of 5MiB" % text)
    return value


def rate_argument(text):
    rate = size_argument(text)
    if rate < 1024:
        raise argparse.ArgumentTypeError("%r is below 1K a second" % text)
    return rate


def duration_argument(text):
    """Seconds from '90' or a duration of whole numbers with units, largest first, each at
    most once: '90s', '10m', '1h', '2d', '1h30m'."""
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    match = re.fullmatch(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?", text)
    if not text or not match:
        raise argparse.ArgumentTypeError(
            "%r is not a duration: give seconds (90) or whole numbers with the units d, h, "
            "m, s, largest first (90s, 10m, 1h30m, 2d)" % text)
    return sum(int(count) * unit for count, unit in zip(match.groups(), DURATION_UNITS)
               if count)


def positive_duration(text):
    seconds = duration_argument(text)
    if seconds == 0:
        raise argparse.ArgumentTypeError("must be at least 1 second")
    return seconds


def format_size(size):
    return "%dMiB" % (size // MIB) if size % MIB == 0 else "%d bytes" % size


def add_selection_options(group):
    group.add_argument("source", metavar="SOURCE_DIR", help="directory whose files to move")
    group.add_argument("--min-age", type=duration_argument, default=DEFAULT_MIN_AGE,
                       metavar="DURATION", help="leave files modified more recently than "
                       "this for a later run (default %ds); a file dated more than %ds "
                       "ahead of the clock is judged by its ctime, and named in a warning"
                       % (DEFAULT_MIN_AGE, FUTURE_SLACK))
    group.add_argument("--warn-waiting", type=duration_argument, default=DEFAULT_WARN_WAITING,
                       metavar="DURATION", help="warn, each run, of a file left as still "
                       "written (open for writing by another process) whose mtime is older "
                       "than this (default %s); the metrics and the summary give the oldest "
                       "file's age for each reason a file waits"
                       % format_duration(DEFAULT_WARN_WAITING))
    group.add_argument("--min-size", type=size_argument, default=0, metavar="SIZE",
                       help="leave (and count) files smaller than SIZE")
    group.add_argument("--max-size", type=size_argument, default=None, metavar="SIZE",
                       help="leave (and count) files larger than SIZE")
    group.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                       help="skip names or relative paths matching GLOB (repeatable); always "
                       "skipped: " + " ".join(DEFAULT_EXCLUDES))
    group.add_argument("--exclude-from", action="append", default=[], metavar="FILE",
                       help="--exclude each glob of FILE: one a line, '#' starts a comment "
                       "line (repeatable)")
    group.add_argument("--include", action="append", default=[], metavar="GLOB",
                       help="move only files whose name or relative path matches GLOB "
                       "(repeatable; the excludes still win)")
    group.add_argument("--include-from", action="append", default=[], metavar="FILE",
                       help="--include each glob of FILE, as --exclude-from reads it")
    group.add_argument("--archive-dir", metavar="DIR",
                       help="move each file, once the server confirmed it, into DIR at its "
                       "relative path instead of removing it (DIR: an existing folder on "
                       "SOURCE_DIR's filesystem, outside it; folders made as needed; a name "
                       "taken there gets a number, app.1.log: nothing there is overwritten); "
                       "expire it with find (README)")
    group.add_argument("--delete-empty-dirs", action="store_true",
                       help="remove subdirectories the run emptied (never SOURCE_DIR)")


def add_destination_options(group):
    group.add_argument("destination", metavar="s3://BUCKET[/PREFIX]",
                       help="where the files go; keys are PREFIX/relative/path (a byte of "
                       "a name that is not UTF-8 as U+201B and its two hex digits, the name's "
                       "bytes in x-amz-meta-s3push-name; a U+201B of the name itself doubled, "
                       "so a key reads back left to right: U+201B twice is one U+201B, U+201B "
                       "and two hex digits is that byte)")
    group.add_argument("--if-exists", choices=("overwrite", "keep", "number"),
                       default="overwrite",
                       help="when an object is already at the key: overwrite it (the "
                       "default); keep it, and the file too, as a conflict to resolve; or "
                       "number: send the file to the first free key of name.1.ext, "
                       "name.2.ext, ... (keep and number send If-None-Match: *)")
    group.add_argument("--no-overwrite", dest="if_exists", action="store_const",
                       const="keep", help="the same as --if-exists keep")
    group.add_argument("--endpoint-url", metavar="URL",
                       help="S3-compatible server, e.g. http://127.0.0.1:9000")
    group.add_argument("--region", help="signing region (default: from the environment or "
                       "profile, else us-east-1)")
    group.add_argument("--profile", help="profile in ~/.aws/credentials and ~/.aws/config "
                       "(credentials: below)")
    group.add_argument("--ca-bundle", metavar="FILE",
                       help="trust the CAs in FILE (PEM) instead of the system's for TLS; "
                       "also AWS_CA_BUNDLE or ca_bundle in the profile")


def add_transfer_options(group):
    group.add_argument("--deadline", type=duration_argument, default=0, metavar="DURATION",
                       help="start no upload and no retry after this long, so that a cron "
                       "run ends before the next one starts; what is left waits for the "
                       "next run (default 0: none)")
    group.add_argument("--splay", type=duration_argument, default=0, metavar="DURATION",
                       help="once there is something to send, first wait a random time "
                       "below DURATION, so that many hosts whose cron fires at once do not "
                       "reach S3 at once; a run with nothing to send never waits "
                       "(default 0)")
    group.add_argument("--bwlimit", type=rate_argument, metavar="RATE",
                       help="keep the whole run's upload at or under RATE bytes per second, "
                       "all --jobs and parts together (binary units: 500K, 2M, 1G; "
                       "default: no limit)")
    group.add_argument("--timeout", type=positive_duration, default=DEFAULT_TIMEOUT,
                       metavar="DURATION", help="give up on a connection that makes no "
                       "progress for this long, then retry (default %ds); when requests time "
                       "out (or get a gateway's 502 or 504) one after another for twice this "
                       "long with no answer between, the endpoint is silent: the run stops "
                       "(exit 75), files kept"
                       % DEFAULT_TIMEOUT)
    group.add_argument("--retries", type=non_negative_int, default=DEFAULT_RETRIES,
                       metavar="N", help="retry a request that failed for a transient reason "
                       "(5xx, throttling, a broken connection) up to N times, with "
                       "exponential backoff (default %(default)s)")
    group.add_argument("--jobs", type=positive_int, default=DEFAULT_JOBS, metavar="N",
                       help="files and parts sent at once, each over its own kept-alive "
                       "connection (default %(default)s)")
    group.add_argument("--multipart-threshold", type=size_argument, metavar="SIZE",
                       default=DEFAULT_MULTIPART_THRESHOLD,
                       help="files larger than this go up in parts (default %s)"
                       % format_size(DEFAULT_MULTIPART_THRESHOLD))
    group.add_argument("--part-size", type=part_size_argument, metavar="SIZE",
                       default=DEFAULT_PART_SIZE,
                       help="size of each part, at least 5MiB; grown by itself so that any "
                       "file fits in 10,000 parts (default %s)" % format_size(DEFAULT_PART_SIZE))
    group.add_argument("--resume-days", type=non_negative_int, default=DEFAULT_RESUME_DAYS,
                       metavar="DAYS", help="forget a journal once its upload is this many "
                       "days old: keep it at or below the bucket's "
                       "AbortIncompleteMultipartUpload days; 0 keeps no journals "
                       "(default %(default)s)")


def add_safety_options(group):
    group.add_argument("--dry-run", action="store_true",
                       help="print what would move where, change nothing")
    group.add_argument("--checksum", choices=("md5", "crc32", "sha256"),
                       help="what proves each upload: md5 (a signed Content-MD5, and the "
                       "ETag must be that MD5: every S3 server), crc32 (a signed "
                       "x-amz-checksum-crc32 the server verifies and must echo: AWS S3, "
                       "MinIO; cheaper per byte) or sha256 (likewise x-amz-checksum-sha256: "
                       "AWS S3; the object keeps a SHA-256 the server verified, of the parts' "
                       "SHA-256s for a multipart upload). Default: crc32 on AWS endpoints, "
                       "md5 elsewhere")
    group.add_argument("--expected-bucket-owner", type=account_id, metavar="ACCOUNT_ID",
                       help="send x-amz-expected-bucket-owner on every request: S3 refuses "
                       "(403) if another account owns the bucket; also "
                       "S3PUSH_EXPECTED_BUCKET_OWNER or s3push_expected_bucket_owner in the "
                       "profile")
    group.add_argument("--allow-hardlinks", action="store_true",
                       help="move files with more than one hard link even where the kernel "
                       "lets users link in files they cannot read (fs.protected_hardlinks "
                       "off); by default such files are left in place and reported")
    group.add_argument("--state-dir", metavar="DIR",
                       help="the state folder, outside SOURCE_DIR: the run lock, the ledger "
                       "of confirmed uploads and the journals that let a multipart upload cut "
                       "off part-way resume (default $XDG_STATE_HOME/s3push, else "
                       "~/.local/state/s3push)")
    group.add_argument("--lock-warn-after", type=duration_argument, metavar="DURATION",
                       default=DEFAULT_LOCK_WARN_AFTER,
                       help="a run that finds another one holding the run lock exits 0 "
                       "with a line; once that one has held it this long, a warning naming "
                       "its pid and since when, as a stopped or hung run keeps every later "
                       "one out (default 1h; 0: always)")


def add_output_options(group):
    group.add_argument("-v", "--verbose", action="store_true",
                       help="print one line per moved file and a summary")
    group.add_argument("--debug", action="store_true",
                       help="also print each request's canonical request, string to sign "
                       "and answer on stderr (the secret, the token and signatures are "
                       "left out)")
    group.add_argument("--progress", action="store_true", default=None,
                       help="a live status line on stderr (files and bytes done of those "
                       "found, rate, ETA); the default on a terminal, never under cron")
    group.add_argument("--no-progress", dest="progress", action="store_false")
    group.add_argument("--summary-json", metavar="FILE",
                       help="write a summary of the run (counts, bytes, seconds, exit "
                       "status, first errors) to FILE as JSON, for monitoring; also for a "
                       "command line refused (exit 2), unless the error is in "
                       "--summary-json, --metrics-file or --log-file itself")
    group.add_argument("--metrics-file", metavar="FILE",
                       help="write the run's figures to FILE in the Prometheus text format, "
                       "for node_exporter's textfile collector (files and bytes moved, "
                       "failures by kind, files left, seconds, exit status, last success); "
                       "for a command line refused, as --summary-json")
    group.add_argument("--log-file", metavar="FILE",
                       help="also append each line the run prints (on stderr; on stdout "
                       "under -v; not the live status line) to FILE, after its time in UTC "
                       "(2026-12-03T14:30:43+00:00), in one write, so that runs may share "
                       "FILE. Made 0600; opened anew each run (rotate it by renaming); never "
                       "followed through a symlink; a regular file only. One that cannot be "
                       "written is a warning, not a reason to keep files; for a command line "
                       "refused, as --summary-json")
    group.add_argument("--manifest", metavar="FILE",
                       help="append a JSON line per moved file to FILE (time, run, path, "
                       "bucket, key, size, mtime, the checksum that proved it, ETag, "
                       "VersionId), fsync'ed before the file is removed; a line that cannot "
                       "be written whole is cut off and keeps the file. Runs may share FILE "
                       "(flock); never followed through a symlink")
    group.add_argument("--manifest-key", metavar="TEMPLATE",
                       help="at the end of the run, upload its --manifest lines as one "
                       "object at this key (one more PUT), e.g. "
                       "manifests/{hostname}/{date}/{hour}-{run_id}.jsonl; {run_id} and the "
                       "time placeholders are of the run's start. An object not sent (a "
                       "failure, a kill) is sent by the next run of SOURCE_DIR to this "
                       "destination")
    group.add_argument("-h", "--help", action="help", help="show this help and exit")
    group.add_argument("--version", action="version", version="s3push " + VERSION)


def argument_text(text):
    """An argument as the UTF-8 text it is (under a C locale Python 3.6 decodes argv as
    ASCII, the rest as surrogates)."""
    try:
        return name_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise argparse.ArgumentTypeError("%s is not UTF-8" % safe_name(text))


def metadata_item(text):
    """--metadata KEY=VALUE: a key of letters, digits, '-', '_', '.'; a value without
    control characters (not ASCII is sent RFC 2047-encoded)."""
    key, equals, value = argument_text(text).partition("=")
    if not equals or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", key):
        raise argparse.ArgumentTypeError("%r is not KEY=VALUE with a KEY of letters, digits, "
                                         "'-', '_' and '.'" % text)
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise argparse.ArgumentTypeError("%r: the value holds a control character" % text)
    return key, value


def tag_item(text):
    """--tag KEY=VALUE as S3 takes tags: a key of 1-128 and a value of up to 256 letters,
    digits, spaces and + - = . _ : / @; no key beginning with aws:."""
    key, equals, value = argument_text(text).partition("=")
    allowed = r"^[\w\s+\-=.:/@]*$"
    if not equals or not 1 <= len(key) <= 128 or len(value) > 256 or \
            not re.match(allowed, key) or not re.match(allowed, value.replace("{", "").replace(
                "}", "")) or key.lower().startswith("aws:"):
        raise argparse.ArgumentTypeError(
            "%r is not a tag S3 takes: KEY=VALUE, a key of 1-128 and a value of up to 256 "
            "letters, digits, spaces and + - = . _ : / @, no key beginning with aws:" % text)
    return key, value


def header_value(text):
    if not text or not re.match(r"^[\x20-\x7e]+$", text):
        raise argparse.ArgumentTypeError("%s: printable ASCII only" % safe_name(text))
    return text


def retain_until(text):
    """--object-lock-retain-until: YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC), normalized to
    the second."""
    for shape, suffix in (("%Y-%m-%d", "T00:00:00Z"), (ISO_SECONDS, "")):
        try:
            time.strptime(text, shape)
        except ValueError:
            continue
        return text + suffix
    raise argparse.ArgumentTypeError("%r is not a date: YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ "
                                     "(UTC)" % text)


def add_object_options(group):
    group.add_argument("--metadata", type=metadata_item, action="append", default=[],
                       metavar="KEY=VALUE", help="user metadata (x-amz-meta-KEY), repeatable; "
                       "the value may hold the key placeholders ({hostname}, {mtime_date}, "
                       "...); at most 2 KiB in all")
    group.add_argument("--tag", type=tag_item, action="append", default=[],
                       metavar="KEY=VALUE", help="an object tag (x-amz-tagging), repeatable, "
                       "at most 10; placeholders as --metadata (needs s3:PutObjectTagging)")
    for name, example in (("cache-control", "max-age=86400"),
                          ("content-encoding", "gzip"),
                          ("content-disposition", "attachment")):
        group.add_argument("--" + name, type=header_value, metavar="VALUE",
                           help="the %s header of every object, e.g. %s" % (
                               name.title(), example))
    group.add_argument("--object-lock-mode", choices=("GOVERNANCE", "COMPLIANCE"),
                       help="retention for buckets with Object Lock, with a retention period "
                       "(needs s3:PutObjectRetention)")
    period = group.add_mutually_exclusive_group()
    period.add_argument("--object-lock-retain-days", type=positive_int, metavar="DAYS",
                        help="retain each object this many days from its upload")
    period.add_argument("--object-lock-retain-until", type=retain_until, metavar="DATE",
                        help="retain each object until DATE (YYYY-MM-DD, UTC)")
    group.add_argument("--legal-hold", action="store_true",
                       help="put a legal hold on each object (needs s3:PutObjectLegalHold)")


USAGE = "s3push.py [options] SOURCE_DIR s3://BUCKET[/PREFIX]"
DESCRIPTION = """\
Move the files under SOURCE_DIR into S3, verified: each file is deleted only
after the server confirmed its exact bytes."""
EPILOG = """\
examples:
  see what would go where, then move it (-v: a line per file, and a summary):
    s3push.py --dry-run /var/spool/outbox s3://my-bucket/web01/
    s3push.py -v /var/spool/outbox s3://my-bucket/web01/
  from cron every 5 minutes, files 10 minutes old or older (crontab -e):
    */5 * * * * /usr/local/bin/s3push.py --min-age 10m /var/spool/outbox \
s3://my-bucket/web01/
  from a systemd timer: a Type=oneshot service running that command and a timer
  with OnUnitActiveSec=5min (both units: the README, "Running it from a systemd
  timer").

durations: 90 (seconds), 90s, 10m, 1h, 2d, 1h30m. sizes: 64K, 8M, 1G, 64MiB
(binary units), or bytes.

credentials, as the AWS CLI finds them: AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY (with AWS_SESSION_TOKEN), passed over when --profile is
given; else the profile (--profile, AWS_PROFILE, else default) in
~/.aws/credentials and ~/.aws/config (keys, role_arn, credential_process);
else a container's role (AWS_CONTAINER_CREDENTIALS_*), else the EC2 instance
profile (IMDSv2). No option takes a secret.

exit status: 0 all moved, nothing to do or another run active; 2 usage;
65 some files failed and were left; 66 SOURCE_DIR unusable; 70 internal error;
75 temporary failure, try again; 77 S3 refused the credentials or permission;
78 configuration or credentials problem; 130/143 interrupted."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is raised (UsageError), not said with an exit,
    so that main writes the summary and the metrics of a refused command line too."""

    def error(self, message):
        raise UsageError(message)


def build_parser():
    parser = Parser(prog="s3push.py", usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False,
                    allow_abbrev=False)   # a cron line names whole options
    add_selection_options(parser.add_argument_group("what is moved"))
    add_destination_options(parser.add_argument_group("where it goes"))
    written = parser.add_argument_group("how objects are written")
    add_upload_options(written)
    add_object_options(written)
    add_transfer_options(parser.add_argument_group("transfer"))
    add_safety_options(parser.add_argument_group("safety"))
    add_output_options(parser.add_argument_group("output"))
    return parser


SHORT_FLAGS = "hv"   # -h and -v: the options of one letter, neither takes a value


def split_short_flags(argv):
    """-vv as -v -v: argparse of Python 3.6 and 3.7 refuses one-letter flags given together
    once abbreviations are (allow_abbrev=False, bpo-26967). Nothing after '--' is touched."""
    split = []
    for number, arg in enumerate(argv):
        if arg == "--":
            return split + argv[number:]
        together = re.fullmatch("-[%s]{2,}" % SHORT_FLAGS, arg)
        split += ["-" + letter for letter in arg[1:]] if together else [arg]
    return split


def report_options(argv):
    """--summary-json, --metrics-file and --log-file of a command line the parser refused,
    read apart from every other argument: wherever the error is, but in one of these
    three, their paths are known. Nothing else of the run is: no source, no destination."""
    parser = Parser(add_help=False, allow_abbrev=False)
    for option in ("--summary-json", "--metrics-file", "--log-file"):
        parser.add_argument(option)
    try:
        found = parser.parse_known_args(argv)[0]
    except UsageError:   # one of them without its FILE
        found = argparse.Namespace(summary_json=None, metrics_file=None, log_file=None)
    return argparse.Namespace(source="", destination="", verbose=False,
                              summary_json=found.summary_json, metrics_file=found.metrics_file,
                              log_file=found.log_file)


def parse_options(argv):
    """(options, None) for a command line to run; else (what the run's reports can be
    given of it, the UsageError that refuses it)."""
    parser = build_parser()
    try:
        options = parser.parse_args(split_short_flags(argv))
    except UsageError as exc:
        exc.usage = parser.format_usage().rstrip("\n")
        return report_options(argv), exc
    if options.source.lower().startswith("s3://") and \
            not options.destination.lower().startswith("s3://"):
        return options, UsageError("arguments in the wrong order, the directory comes first: "
                                   + USAGE)
    return options, None


def on_sigterm(signum, frame):
    raise Interrupted(signum)


def say_error(report, message):
    """The error that ends a run: one line on stderr, kept for --summary-json."""
    line = "s3push: error: %s" % message
    report.notices.line(sys.stderr, line)
    report.tally.errors_total += 1
    if len(report.tally.errors) < MAX_SUMMARY_ERRORS:
        report.tally.errors.append(line)


def guarded_run(options, report):
    """Run, mapping every way a run can end to its exit status and one line."""
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGIO, signal.SIG_IGN)   # a lease break (see TAKE_LEASES): no harm
    try:
        return push(options, os.environ, report)
    except KeyboardInterrupt:
        report.notices.line(sys.stderr, "s3push: interrupted; files not yet confirmed were "
                            "left in place")
        return EXIT_SIGNAL_BASE + signal.SIGINT
    except Interrupted as exc:
        report.notices.line(sys.stderr, "s3push: terminated; files not yet confirmed were "
                            "left in place")
        return EXIT_SIGNAL_BASE + exc.signum
    except S3PushError as exc:
        say_error(report, exc)
        return exc.exit_code
    except BrokenPipeError:   # stdout closed early (a --dry-run | head): nothing to mend
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return report.tally.exit_status()
    except Exception as exc:   # a bug: one line, no secret, every unconfirmed file kept
        say_error(report, internal_error(exc, report.credentials))
        return EXIT_SOFTWARE


def open_standard_streams():
    """Descriptors 0, 1 and 2 that cron or a wrapper closed (2>&-) are opened on /dev/null
    first: else the first file the run opens would take that number, and a line meant for
    stderr would go into it. Python left such a stream None; it writes to /dev/null."""
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(number)
        except OSError:
            os.open(os.devnull, os.O_RDWR)   # the lowest free number: this one
        if getattr(sys, name) is None:
            setattr(sys, name, open(number, "r" if number == 0 else "w", closefd=False))


def main(argv=None):
    open_standard_streams()
    options, refused = parse_options(sys.argv[1:] if argv is None else list(argv))
    notices = Notices(options.verbose)
    if options.log_file:   # first: every line of the run goes to it, a refusal's too
        notices.open_log(options.log_file)
    report = Report(notices)
    if refused is None:
        status = guarded_run(options, report)
    else:   # no run; its reports all the same, wherever their paths could be read
        if refused.usage:
            notices.line(sys.stderr, refused.usage)
        say_error(report, refused)
        status = refused.exit_code
    data = report.tally.summary_data(options, status)
    if options.summary_json:
        write_summary(options.summary_json, data, report.notices)
    if options.metrics_file:
        write_metrics(options.metrics_file, data, collections.Counter(report.tally.failures),
                      report.notices)
    return status


if __name__ == "__main__":
    sys.exit(main())

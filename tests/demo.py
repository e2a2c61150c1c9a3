"""make demo: a throwaway local S3 server, a sample directory, one s3push run, what moved.

Starts rclone's S3 server on a free port (as the tests do), fills a temporary directory
with a few files (one still being written, one too young), runs s3push.py -v on it and
shows what is on the server and what stayed behind. Everything is removed afterwards.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3server  # noqa: E402

SAMPLE = {
    "app/2026-11-24/access.log": b"GET / 200\n" * 50,
    "app/2026-11-24/error log with spaces.txt": b"nothing bad happened\n",
    "metrics/cpu+mem=%.csv": b"ts,cpu,mem\n1,2,3\n",
    "reports/résumé.pdf": b"%PDF-1.4 not really\n",
    "incoming.part": b"a writer is still busy with this one\n",
}


def main():
    server = s3server.start_server()
    work = tempfile.mkdtemp(prefix="s3push-demo-")
    try:
        source = os.path.join(work, "outbox")
        old = time.time() - 3600
        for relative, data in SAMPLE.items():
            path = os.path.join(source, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)
            os.utime(path, (old, old))
        with open(os.path.join(source, "just-arrived.json"), "wb") as handle:
            handle.write(b"{}\n")   # younger than --min-age: left for the next run
        env = dict(os.environ, AWS_ACCESS_KEY_ID=server.access_key,
                   AWS_SECRET_ACCESS_KEY=server.secret_key)
        command = [sys.executable, s3server.S3PUSH, "-v", "--endpoint-url", server.endpoint,
                   "--delete-empty-dirs", source, "s3://%s/demo/" % server.bucket]
        print("$ AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\\n  "
              + " ".join(command[1:]).replace(work, "$DEMO"))
        status = subprocess.call(command, env=env, timeout=120)
        print("\nexit status: %d" % status)
        print("\non the server (s3://%s/demo/):" % server.bucket)
        for key in sorted(server.keys("demo/")):
            print("  %-45s %5d bytes" % (key, len(server.object_bytes(key))))
        print("\nleft in %s:" % source.replace(work, "$DEMO"))
        for directory, _, names in os.walk(source):
            for name in sorted(names):
                print("  " + os.path.relpath(os.path.join(directory, name), source))
        return status
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

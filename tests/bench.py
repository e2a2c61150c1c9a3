"""make bench: s3push against `aws s3 mv` and `rclone move`, one local rclone server, one run.

A benchmark, not a test: it prints figures and ratios and never fails on a target.
Workloads: an empty directory; 1,000 files of 4 KiB in 10 folders; one 1 GiB file; the
last two again over HTTPS (a second rclone server with a throwaway CA, each client given
the CA bundle).
Then resume: s3push moving the 1 GiB file is killed (SIGKILL) once the server has
confirmed about 60 % of it, and the bytes the next run sends are counted by a proxy,
with the journal (the default) and without (--resume-days 0: restart from zero).
Then --bwlimit: the 1 GiB file at --bwlimit 20M, its rate against 20 MiB/s (BENCH_BWLIMIT
sets another rate; 0 leaves this out).
Then checksums: the 1 GiB file to LocalStack's S3 (which verifies x-amz-checksum-crc32)
by s3push --checksum md5, s3push --checksum crc32 and `aws s3 mv`: the CRC32 path's
client CPU against the MD5 path's (BENCH_CHECKSUMS=0 leaves this out).
Then compression: 40 text logs of 4 MiB with and without --compress gzip (and gzip:1):
MiB sent and client CPU (BENCH_COMPRESS=0 leaves this out).
Then growth: planning 20,000 and 200,000 files, a tick over 100,000 young ones and a move
of 20,000 x 1 KiB, against rclone (BENCH_GROWTH=0 leaves this out; see growth_bench).
For each tool: wall seconds, client CPU-seconds (user + system of the tool's process and
its children), files/s, MB/s and peak RSS (of the tool's process). A tool's run counts
only if every file landed byte-identical and the source was emptied; otherwise its row
says FAILED and why.

Environment: BENCH_PYTHON (the interpreter for s3push; default /usr/bin/python3, what a
locked-down host runs, else this one), BENCH_BIG_MIB (size of the big file, default 1024),
BENCH_REPEAT (rounds of the small workloads, best kept; default 3), BENCH_BIG_REPEAT
(rounds of the big one; default BENCH_REPEAT), AWS_BIN, RCLONE_BIN.
"""

import gzip
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3server  # noqa: E402

REPO = s3server.REPO
BIG_MIB = int(os.environ.get("BENCH_BIG_MIB", "1024"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
BIG_REPEAT = int(os.environ.get("BENCH_BIG_REPEAT", str(REPEAT)))
TARGET_RSS_MIB = {False: 40, True: 28}   # peak RSS by path, from bytecode
LOG_FILES, LOG_MIB = 40, 4   # the compression corpus: 160 MiB of text logs


def find_python():
    chosen = os.environ.get("BENCH_PYTHON")
    if chosen:
        return chosen
    if os.access("/usr/bin/python3", os.X_OK):
        return "/usr/bin/python3"
    return sys.executable


def find_aws():
    """The AWS CLI's real script (a pyenv shim would add its own start-up time)."""
    if os.environ.get("AWS_BIN"):
        return os.environ["AWS_BIN"]
    own = os.path.join(REPO, ".testenv", "awscli", "bin", "aws")
    if os.access(own, os.X_OK):
        return own
    found = shutil.which("aws")
    if found and "/shims/" in found:
        try:
            found = subprocess.check_output(["pyenv", "which", "aws"]).decode().strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return found


GNU_TIME = "/usr/bin/time"


def measure(argv, env):
    """(wall seconds, peak RSS in MiB, CPU seconds, exit status, stderr tail) of one process.

    Peak RSS comes from GNU time, a small parent: a child forked from this (larger)
    process would carry this process's high-water mark across exec into ru_maxrss.
    Without GNU time, wait4's figure is used and is an upper bound.
    """
    with tempfile.NamedTemporaryFile() as rss_file, tempfile.TemporaryFile() as err:
        prefix = [GNU_TIME, "-f", "%M %U %S", "-o", rss_file.name] \
            if os.access(GNU_TIME, os.X_OK) else []
        started = time.monotonic()
        process = subprocess.Popen(prefix + argv, env=env, stdout=subprocess.DEVNULL,
                                   stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        rss_kib, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
        if prefix:
            with open(rss_file.name) as handle:
                fields = handle.read().split()[-3:]
            rss_kib, cpu = int(fields[0]), float(fields[1]) + float(fields[2])
        err.seek(0)
        tail = err.read().decode("utf-8", "replace").strip().splitlines()[-3:]
    return wall, rss_kib / 1024.0, cpu, code, " | ".join(tail)


class Tools(object):
    """The command line of each tool for moving SOURCE to the bucket under PREFIX."""

    def __init__(self, server, python, aws, rclone, ca=None, variants=None):
        """ca: the CA bundle that vouches for an https server's certificate; variants:
        {name: how s3push is started, options included} to run it several ways."""
        self.server, self.aws, self.rclone, self.ca = server, aws, rclone, ca
        self.variants = variants or {"s3push": [python, s3server.S3PUSH]}
        self.env = dict(os.environ, AWS_ACCESS_KEY_ID=server.access_key,
                        AWS_SECRET_ACCESS_KEY=server.secret_key, AWS_DEFAULT_REGION="us-east-1",
                        AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
                        RCLONE_CONFIG="/dev/null", RCLONE_S3_PROVIDER="Other",
                        RCLONE_S3_ACCESS_KEY_ID=server.access_key,
                        RCLONE_S3_SECRET_ACCESS_KEY=server.secret_key,
                        RCLONE_S3_ENDPOINT=server.endpoint, RCLONE_S3_REGION="us-east-1")

    def names(self):
        return sorted(self.variants) + (["aws s3 mv"] if self.aws else []) + \
            (["rclone move"] if self.rclone else [])

    def argv(self, name, source, prefix):
        url = "s3://%s/%s" % (self.server.bucket, prefix)
        ca = (["--ca-cert", self.ca] if name == "rclone move" else ["--ca-bundle", self.ca]) \
            if self.ca else []
        if name in self.variants:
            return self.variants[name] + ["--endpoint-url", self.server.endpoint,
                                          "--min-age", "0"] + ca + [source, url]
        if name == "aws s3 mv":
            return [self.aws, "s3", "mv", "--recursive", "--only-show-errors", "--endpoint-url",
                    self.server.endpoint] + ca + [source, url]
        # Write-only credentials: no bucket check, no listing of the destination, no HEAD.
        return [self.rclone, "move", source, ":s3:%s/%s" % (self.server.bucket, prefix),
                "--s3-no-check-bucket", "--no-check-dest", "--s3-no-head"] + ca


def make_small(source):
    """1,000 files of 4 KiB in 10 folders; returns {relative path: bytes}."""
    files = {}
    for i in range(1000):
        relative = "folder%02d/file%04d.dat" % (i % 10, i)
        files[relative] = hashlib.sha256(b"%d" % i).digest() * 128
        path = os.path.join(source, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(files[relative])
    return files


def make_big(path, mib):
    """A file of random bytes; returns its SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for _ in range(mib):
            block = os.urandom(1024 * 1024)
            digest.update(block)
            handle.write(block)
    return digest.hexdigest()


def leftover_files(source):
    return sum(len(names) for _, _, names in os.walk(source))


def check_landed(server, prefix, expected):
    """None if each key holds the expected bytes (or SHA-256), else what is wrong (read as
    the server's test class reads objects: rclone's from its data folder)."""
    for relative, want in expected.items():
        got = server.object_bytes("%s/%s" % (prefix, relative))
        if got is None:
            return "missing: " + relative
        if isinstance(want, str):
            got = hashlib.sha256(got).hexdigest()
        if got != want:
            return "bytes differ: " + relative
    return None


def remove_landed(server, prefix, keys):
    """Delete what a run landed: rclone's folder, or (another server) each key."""
    if isinstance(server, s3server.RcloneServer):
        shutil.rmtree(os.path.join(server.data, server.bucket, prefix), ignore_errors=True)
        return
    for key in keys:
        server.signed_request("DELETE", "/%s/%s/%s" % (server.bucket, prefix, key))


class Bench(object):
    def __init__(self, tools, work):
        self.tools, self.work, self.rows = tools, work, []
        self.server = tools.server

    def run_once(self, name, workload, setup):
        """Set the source up, move it with one tool, check, clean; returns a result dict."""
        tag = "%s-%s-%d" % (name.split()[0], workload, int(time.monotonic() * 1e6))
        source = os.path.join(self.work, tag)
        os.makedirs(source)
        expected, size = setup(source)
        wall, rss, cpu, status, err = measure(self.tools.argv(name, source, tag + "/"),
                                              self.tools.env)
        problem = None
        if status != 0:
            problem = "exit %d: %s" % (status, err)
        elif leftover_files(source):
            problem = "%d files left in the source" % leftover_files(source)
        else:
            problem = check_landed(self.server, tag, expected)
        shutil.rmtree(source, ignore_errors=True)
        remove_landed(self.server, tag, expected)
        return {"wall": wall, "rss": rss, "cpu": cpu, "files": len(expected), "bytes": size,
                "problem": problem}

    def run(self, workload, setup, repeat, warm_up=False):
        """Each tool `repeat` times, round-robin so that no tool always meets the server
        cold or warm; the fastest good run of each is kept. A warm-up round, if asked
        for, is run first and not counted (rclone's server is slower on its first runs).
        """
        names = self.tools.names()
        if warm_up:
            for name in names:
                self.run_once(name, workload, setup)
        results = {name: [] for name in names}
        for _ in range(repeat):
            for name in names:
                results[name].append(self.run_once(name, workload, setup))
        for name in names:
            good = [r for r in results[name] if r["problem"] is None]
            best = min(good, key=lambda r: r["wall"]) if good else results[name][0]
            best["rss"] = max(r["rss"] for r in results[name])
            best["cpu"] = min(r["cpu"] for r in good) if good else best["cpu"]
            best.update(tool=name, workload=workload,
                        walls=" ".join("%.2f" % r["wall"] for r in results[name]))
            self.rows.append(best)
            print_row(best)


def print_row(row):
    wall = row["wall"]
    files_s = row["files"] / wall if row["files"] else 0
    mb_s = row["bytes"] / wall / 1e6 if row["bytes"] else 0
    status = "ok" if row["problem"] is None else "FAILED: " + row["problem"]
    print("%-11s %-13s %8.3f %7.2f %10.0f %9.1f %9.1f  %-4s %s" % (
        row["workload"], row["tool"], wall, row["cpu"], files_s, mb_s, row["rss"], status,
        "(runs: %s s)" % row["walls"] if row["walls"].count(" ") else ""), flush=True)


def find(rows, workload, tool):
    for row in rows:
        if row["workload"] == workload and row["tool"] == tool and row["problem"] is None:
            return row
    return None


def figure(rows, workload, tool, key):
    row = find(rows, workload, tool)
    return None if row is None else row[key]


def ratio_line(label, mine, theirs, target, higher_is_better):
    if mine is None or theirs is None or not theirs:
        print("%-52s   n/a" % label)
        return
    value = mine / theirs
    met = value >= target if higher_is_better else value <= target
    print("%-52s %6.2f  (target %s %g: %s)" % (
        label, value, ">=" if higher_is_better else "<=", target, "met" if met else "MISSED"))


def print_ratios(rows):
    def rate(workload, tool, key):
        row = find(rows, workload, tool)
        return None if row is None else row[key] / row["wall"]

    print("\nratios (s3push / peer)")
    for peer, target in (("aws s3 mv", 0.1), ("rclone move", 1.0)):
        ratio_line("empty dir: wall time vs %s" % peer, figure(rows, "empty", "s3push", "wall"),
                   figure(rows, "empty", peer, "wall"), target, False)
    ratio_line("empty dir, bytecode (-I -c): wall vs rclone move",
               figure(rows, "empty", "s3push -I -c", "wall"),
               figure(rows, "empty", "rclone move", "wall"), 1.0, False)
    for peer, target in (("rclone move", 1.1), ("aws s3 mv", 4.0)):
        ratio_line("1,000 x 4 KiB: files/s vs %s" % peer, rate("small", "s3push", "files"),
                   rate("small", peer, "files"), target, True)
    ratio_line("1,000 x 4 KiB: client CPU vs rclone move",
               figure(rows, "small", "s3push", "cpu"),
               figure(rows, "small", "rclone move", "cpu"), 0.8, False)
    peers = [rate("big", p, "bytes") for p in ("aws s3 mv", "rclone move")]
    peers = [p for p in peers if p]
    ratio_line("%d MiB: MB/s vs the faster peer" % BIG_MIB, rate("big", "s3push", "bytes"),
               max(peers) if peers else None, 1.0, True)
    ratio_line("%d MiB: client CPU vs aws s3 mv (HTTP)" % BIG_MIB,
               figure(rows, "big", "s3push", "cpu"), figure(rows, "big", "aws s3 mv", "cpu"),
               0.85, False)
    ratio_line("%d MiB: client CPU vs rclone move (HTTPS)" % BIG_MIB,
               figure(rows, "big/https", "s3push", "cpu"),
               figure(rows, "big/https", "rclone move", "cpu"), 0.5, False)
    for label, bytecode in (("by path", False), ("from bytecode", True)):
        worst = max(r["rss"] for r in rows if r["tool"].startswith("s3push") and
                    r["tool"].endswith("-I -c") == bytecode)
        print("%-52s %6.1f MiB  (target <= %d: %s)" % (
            "s3push peak RSS, all workloads, " + label, worst, TARGET_RSS_MIB[bytecode],
            "met" if worst <= TARGET_RSS_MIB[bytecode] else "MISSED"))


class KillAtProxy(s3server.FaultProxy):
    """Counts the part bytes sent and those the server confirmed; once `kill_at` bytes
    are confirmed, kills `process` (SIGKILL)."""

    def __init__(self, upstream, kill_at=None):
        self.kill_at, self.process, self.sent, self.confirmed = kill_at, None, 0, 0
        s3server.FaultProxy.__init__(self, upstream)

    def act(self, client, request, action, upstream):
        part = request.method == "PUT" and "partNumber=" in request.target
        if part:
            with self.lock:
                self.sent += len(request.body)
        going_on = s3server.FaultProxy.act(self, client, request, action, upstream)
        if part:
            with self.lock:
                self.confirmed += len(request.body)
                if self.kill_at and self.confirmed >= self.kill_at and self.process:
                    self.process.send_signal(signal.SIGKILL)
                    self.process = None
        return going_on


def resume_run(tools, source, prefix, extra, kill_at=None):
    """One s3push run through a KillAtProxy: (wall seconds, proxy, exit status)."""
    proxy = KillAtProxy(tools.server.endpoint, kill_at)
    argv = tools.argv("s3push", source, prefix) + extra
    argv[argv.index(tools.server.endpoint)] = proxy.endpoint
    try:
        started = time.monotonic()
        proxy.process = subprocess.Popen(argv, env=tools.env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        process = proxy.process
        status = process.wait()
        return time.monotonic() - started, proxy, status
    finally:
        proxy.close()


def resume_bench(tools, work, big, big_sha):
    """Kill at about 60 % confirmed, run again; with journals and without."""
    size = BIG_MIB * 1024 * 1024
    print("\nresume: %d MiB, s3push killed once the server confirmed about 60 %%, then run "
          "again" % BIG_MIB)
    print("%-34s %10s %12s %8s" % ("", "confirmed", "next run sent", "wall s"))
    figures = {}
    for label, extra in (("resume (journal)", []), ("restart from zero", ["--resume-days",
                                                                          "0"])):
        tag = "resume-%s-%d" % (label.split()[0], int(time.monotonic() * 1e6))
        source = os.path.join(work, tag)
        os.makedirs(source)
        os.link(big, os.path.join(source, "big.bin"))
        # One part at a time: rclone's server streams an upload's parts in order into one
        # object, and a client killed while later parts wait for an earlier one fails the
        # whole upload there ("a part was rejected after it had been streamed to the
        # backend, so the upload must be started again"): the next run starts it afresh,
        # as it must, and that would measure the server, not the journal.
        extra = extra + ["--jobs", "1", "--state-dir", os.path.join(work, "state")]
        _, first, _ = resume_run(tools, source, tag + "/", extra, kill_at=int(size * 0.6))
        wall, second, status = resume_run(tools, source, tag + "/", extra)
        problem = "exit %d" % status if status else \
            check_landed(tools.server, tag, {"big.bin": big_sha})
        figures[label] = second.sent / size
        print("%-34s %9.0f%% %11.0f%% %8.2f  %s" % (
            label, 100.0 * first.confirmed / size, 100.0 * second.sent / size, wall,
            problem or "ok"))
        shutil.rmtree(source, ignore_errors=True)
        remove_landed(tools.server, tag, ["big.bin"])
    met = figures["resume (journal)"] <= 0.45
    print("%-52s %6.2f  (target <= 0.45 of the file: %s)" % (
        "killed at ~60 %: share sent again by the next run", figures["resume (journal)"],
        "met" if met else "MISSED"))


BWLIMIT = os.environ.get("BENCH_BWLIMIT", "20M")


def bwlimit_bench(tools, work, big, big_sha):
    """The big file at --bwlimit: wall time and rate against the limit."""
    limit = s3server.s3push.size_argument(BWLIMIT)   # the script's own reading of RATE
    size = BIG_MIB * 1024 * 1024
    tag = "bwlimit-%d" % int(time.monotonic() * 1e6)
    source = os.path.join(work, tag)
    os.makedirs(source)
    os.link(big, os.path.join(source, "big.bin"))
    argv = tools.argv("s3push", source, tag + "/")
    wall, rss, _, status, err = measure(argv[:2] + ["--bwlimit", BWLIMIT] + argv[2:],
                                        tools.env)
    problem = "exit %d: %s" % (status, err) if status else check_landed(
        tools.server, tag, {"big.bin": big_sha})
    shutil.rmtree(source, ignore_errors=True)
    remove_landed(tools.server, tag, ["big.bin"])
    rate = size / wall
    print("\nbwlimit: %d MiB at --bwlimit %s: %.1f s, %.2f MiB/s, RSS %.1f MiB  %s"
          % (BIG_MIB, BWLIMIT, wall, rate / 1048576, rss, problem or "ok"))
    print("%-52s %6.3f  (target 0.95-1.05: %s)" % (
        "--bwlimit %s: rate / limit (whole run, start-up included)" % BWLIMIT, rate / limit,
        "met" if 0.95 <= rate / limit <= 1.05 else "MISSED"))


def https_rows(python, aws, rclone, work, setup_big):
    """The small and big workloads again over HTTPS: a second rclone server with a
    certificate from a throwaway CA, every client given the CA bundle."""
    pki = os.path.join(work, "pki")
    os.makedirs(pki)
    ca, cert, key = s3server.make_ca(pki)
    server = s3server.RcloneServer(tls=(cert, key))
    try:
        bench = Bench(Tools(server, python, aws, rclone, ca=ca), work)
        bench.run("small/https", lambda source: (make_small(source), 1000 * 4096), REPEAT,
                  warm_up=True)
        bench.run("big/https", setup_big, BIG_REPEAT)
        return bench.rows
    finally:
        server.stop()


def checksum_rows(python, aws, work, setup_big):
    """The big file to LocalStack's S3 (it verifies CRC32): s3push's MD5 and CRC32 paths,
    and `aws s3 mv`."""
    server = s3server.LocalStackServer()
    try:
        variants = {"s3push " + name: [python, s3server.S3PUSH, "--checksum", name]
                    for name in ("md5", "crc32")}
        bench = Bench(Tools(server, python, aws, None, variants=variants), work)
        print("\nchecksums: LocalStack's S3 on %s (verifies CRC32 and Content-MD5); over "
              "plain http s3push signs each body's SHA-256 and, on the CRC32 path, sends its "
              "MD5 too (a CRC32 can be forged on the way)" % server.endpoint)
        bench.run("big/ls", setup_big, BIG_REPEAT)
        ratio_line("%d MiB: client CPU, CRC32 path vs MD5 path" % BIG_MIB,
                   figure(bench.rows, "big/ls", "s3push crc32", "cpu"),
                   figure(bench.rows, "big/ls", "s3push md5", "cpu"), 0.6, False)
        ratio_line("%d MiB: client CPU, CRC32 path vs aws s3 mv" % BIG_MIB,
                   figure(bench.rows, "big/ls", "s3push crc32", "cpu"),
                   figure(bench.rows, "big/ls", "aws s3 mv", "cpu"), 1.0, False)
    finally:
        server.stop()


def make_logs(source, count, size):
    """count text logs of about size bytes each, as web servers write them; returns
    {relative path: bytes}."""
    files = {}
    for n in range(count):
        lines, i, length = [], 0, 0
        while length < size:
            lines.append(b'10.%d.%d.%d - - [02/Dec/2026:11:%02d:%02d +0000] "GET /api/v1/item/%d '
                         b'HTTP/1.1" %d %d "-" "client/%d.%d"\n' % (
                             n, i % 250, i * 7 % 250, i // 60 % 60, i % 60, i * 7919 % 100003,
                             (200, 200, 200, 404, 304)[i % 5], i * 31 % 50000, i % 9, i % 4))
            length += len(lines[-1])
            i += 1
        files["logs/access-%03d.log" % n] = b"".join(lines)
        path = os.path.join(source, "logs", "access-%03d.log" % n)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(files["logs/access-%03d.log" % n])
    return files


def compress_bench(tools, work, python):
    """A text-log corpus (40 files of 4 MiB) moved with and without --compress gzip (the
    default level 6, and 1): bytes that went over the wire (the objects' sizes: headers
    aside, the bodies sent) and client CPU, the least of BENCH_REPEAT rounds."""
    server = tools.server
    print("\ncompression: %d text logs of %d MiB (each object checked: gunzipped equals "
          "the file)" % (LOG_FILES, LOG_MIB))
    print("%-30s %9s %9s %7s %9s  %s" % ("tool", "MiB sent", "ratio", "CPU s", "RSS MiB",
                                         "status"))
    sent_plain = cpu_plain = None
    for label, extra in (("s3push", []), ("s3push --compress gzip", ["--compress", "gzip"]),
                         ("s3push --compress gzip:1", ["--compress", "gzip:1"])):
        best = None
        for _ in range(REPEAT):
            tag = "logs-%d" % int(time.monotonic() * 1e6)
            source = os.path.join(work, tag)
            files = make_logs(source, LOG_FILES, LOG_MIB * 1024 * 1024)
            argv = [python, s3server.S3PUSH] + extra + [
                "--endpoint-url", server.endpoint, "--min-age", "0", "--state-dir",
                os.path.join(work, "state"), source, "s3://%s/%s/" % (server.bucket, tag)]
            _, rss, cpu, status, err = measure(argv, tools.env)
            sent, problem = 0, "exit %d: %s" % (status, err) if status else None
            for relative, data in files.items():
                key = "%s/%s%s" % (tag, relative, ".gz" if extra else "")
                got = server.object_bytes(key)
                if got is None or (gzip.decompress(got) if extra else got) != data:
                    problem = problem or "wrong or missing: " + key
                    continue
                sent += len(got)
            shutil.rmtree(source, ignore_errors=True)
            remove_landed(server, tag, [k + (".gz" if extra else "") for k in files])
            if best is None or cpu < best[1]:
                best = (sent, cpu, rss, problem)
        sent, cpu, rss, problem = best
        if not extra:
            sent_plain, cpu_plain = sent, cpu
        print("%-30s %9.1f %9.2f %7.2f %9.1f  %s" % (
            label, sent / 1048576.0, sent / float(sent_plain or 1), cpu, rss,
            problem or "ok"), flush=True)
        if extra and cpu_plain:
            print("%-30s %9s %9s %7.2f x the CPU of the plain move" % ("", "", "",
                                                                      cpu / cpu_plain))


def make_tree(root, count, size, age):
    """count files of size bytes, 1,000 a folder, modified `age` seconds ago and within
    the second before (older files first); returns {relative path: bytes} when size."""
    files, now = {}, time.time() - age - 1
    for i in range(count):
        relative = "d%03d/f%07d.log" % (i // 1000, i)
        data = (b"%07d" % i) * (size // 7) + b"\n" * (size % 7)
        path = os.path.join(root, relative)
        if i % 1000 == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
        os.utime(path, (now + i / count, now + i / count))
        if size:
            files[relative] = data
    return files


def growth_bench(tools, work, python):
    """How the cost grows with the backlog: the plan of 20,000 and 200,000 old files
    (--dry-run: the scan and the oldest-first order of a real run, each file printed)
    against `rclone lsf -R` of the same tree; a tick over 100,000 files all younger than
    --min-age against `rclone move --min-age`; a real move of 20,000 x 1 KiB against
    rclone move (once: it is long). The others BENCH_REPEAT times, tools in turn, the least
    CPU and the most RSS kept (the last lines of the figures)."""
    print("\ngrowth: 1,000 files a folder; plans and ticks %d times in turn, the move once"
          % REPEAT)
    print("%-30s %-16s %7s %9s  %s" % ("workload", "tool", "CPU s", "RSS MiB", "status"))
    figures = {}

    def row(workload, tool, argv):   # kept: the least CPU and the most RSS of its rounds
        wall, rss, cpu, status, err = measure(argv, tools.env)
        before = figures.get((workload, tool))
        figures[workload, tool] = (min(cpu, before[0]), max(rss, before[1])) if before \
            else (cpu, rss)
        print("%-30s %-16s %7.2f %9.1f  %s" % (workload, tool, cpu, rss, "ok" if status == 0
                                              else "FAILED: exit %d: %s" % (status, err)),
              flush=True)
    url = "s3://%s/growth-%d/" % (tools.server.bucket, int(time.monotonic() * 1e6))
    def settle(tree):   # written back and in the cache: no tool pays for the writes
        os.sync()
        subprocess.run([tools.rclone, "lsf", "-R", tree], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    for count in (20000, 200000):
        tree = os.path.join(work, "old%d" % count)
        make_tree(tree, count, 0, 86400)
        settle(tree)
        label = "plan of %d old files" % count
        for _ in range(REPEAT):   # in turn, as the other workloads
            row(label, "s3push --dry-run", [python, s3server.S3PUSH, "--dry-run", tree, url])
            row(label, "rclone lsf -R", [tools.rclone, "lsf", "-R", tree])
        shutil.rmtree(tree, ignore_errors=True)
    tree = os.path.join(work, "young")
    make_tree(tree, 100000, 0, 0)
    settle(tree)
    label = "tick over 100,000 young files"
    for tool in ("s3push", "rclone move") * REPEAT:
        argv = tools.argv(tool, tree, "young/")
        if tool == "s3push":
            argv[argv.index("--min-age") + 1] = "3600"
        else:
            argv += ["--min-age", "1h"]
        row(label, tool, argv)
    shutil.rmtree(tree, ignore_errors=True)
    label = "move of 20,000 x 1 KiB"
    for tool in ("s3push", "rclone move"):
        tree = os.path.join(work, "small20k-" + tool.split()[0])
        expected = make_tree(tree, 20000, 1024, 3600)
        settle(tree)
        prefix = "small20k-%s-%d" % (tool.split()[0], int(time.monotonic() * 1e6))
        row(label, tool, tools.argv(tool, tree, prefix + "/"))
        problem = check_landed(tools.server, prefix, expected) or (
            leftover_files(tree) and "files left in the source")
        if problem:
            print("  %s: FAILED: %s" % (tool, problem))
        shutil.rmtree(tree, ignore_errors=True)
        remove_landed(tools.server, prefix, expected)

    def cpu(workload, tool):
        return figures.get((workload, tool), (None,))[0]
    plan = "plan of 200000 old files"
    ratio_line("200,000 planned: CPU vs rclone lsf -R", cpu(plan, "s3push --dry-run"),
               cpu(plan, "rclone lsf -R"), 2.0, False)
    ratio_line("planning 20,000 -> 200,000: CPU growth", cpu(plan, "s3push --dry-run"),
               cpu("plan of 20000 old files", "s3push --dry-run"), 12.0, False)
    young = "tick over 100,000 young files"
    ratio_line("100,000 young: tick CPU vs rclone move", cpu(young, "s3push"),
               cpu(young, "rclone move"), 1.0, False)
    ratio_line("20,000 x 1 KiB: client CPU vs rclone move", cpu(label, "s3push"),
               cpu(label, "rclone move"), 0.8, False)
    worst = max(rss for (_, tool), (_, rss) in figures.items() if tool.startswith("s3push"))
    print("%-52s %6.1f MiB  (target <= %d: %s)" % (
        "s3push peak RSS, growth workloads, by path", worst, TARGET_RSS_MIB[False],
        "met" if worst <= TARGET_RSS_MIB[False] else "MISSED"))


def main():
    python, aws = find_python(), find_aws()
    server = s3server.RcloneServer()
    rclone = os.environ.get("RCLONE_BIN") or s3server.RCLONE
    work = tempfile.mkdtemp(prefix="s3push-bench-")
    try:
        # s3push started by path (the plain cron line) and from its bytecode (the README's
        # Starting faster): CPython keeps a script's syntax tree for as long as the script
        # runs when it is started by path, not when it is imported (Benchmark, Peak RSS).
        subprocess.check_call([python, "-m", "py_compile", s3server.S3PUSH])
        launcher = ("import sys; sys.path[:0] = [%r]; import s3push; sys.exit(s3push.main())"
                    % REPO)
        variants = {"s3push": [python, s3server.S3PUSH],
                    "s3push -I -c": [python, "-I", "-c", launcher]}
        tools = Tools(server, python, aws, rclone, variants=variants)
        print("s3push on %s; aws: %s; rclone: %s; server: rclone serve s3 on %s"
              % (python, aws or "not found (skipped)", rclone, server.endpoint))
        print("%d rounds of the small workloads (after a warm-up round) and %d of the big one, "
              "tools in turn, the fastest kept\n" % (REPEAT, BIG_REPEAT))
        print("%-11s %-13s %8s %7s %10s %9s %9s" % ("workload", "tool", "wall s", "CPU s",
                                                     "files/s", "MB/s", "RSS MiB"))
        empty = Bench(tools, work)
        empty.run("empty", lambda source: ({}, 0), REPEAT, warm_up=True)
        bench = Bench(tools, work)
        bench.run("small", lambda source: (make_small(source), 1000 * 4096), REPEAT,
                  warm_up=True)
        big = os.path.join(work, "big.template")
        big_sha = make_big(big, BIG_MIB)

        def setup_big(source):
            os.link(big, os.path.join(source, "big.bin"))   # instant, same bytes each time
            return {"big.bin": big_sha}, BIG_MIB * 1024 * 1024
        bench.run("big", setup_big, BIG_REPEAT)
        rows = empty.rows + bench.rows + https_rows(python, aws, rclone, work, setup_big)
        print_ratios(rows)
        resume_bench(tools, work, big, big_sha)
        if BWLIMIT != "0":
            bwlimit_bench(tools, work, big, big_sha)
        if os.environ.get("BENCH_CHECKSUMS") != "0":
            checksum_rows(python, aws, work, setup_big)
        if os.environ.get("BENCH_COMPRESS") != "0":
            compress_bench(tools, work, python)
        if os.environ.get("BENCH_GROWTH") != "0":
            growth_bench(tools, work, python)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

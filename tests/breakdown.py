"""make breakdown: where a small file's CPU goes, step by step (the README's Benchmark table).

3,000 files of 4 KiB in 20 folders go to one local rclone server, once, with the default
jobs. s3push runs in this child process, loaded from its path, with each step of a file's
move wrapped so that the CPU its thread spends in it (time.thread_time) is counted; a
step called inside another is counted apart from it (the outer one pauses). The figures
are each thread's own CPU, summed over the workers, per file: in the run, every step costs
several times what it costs alone in a loop (between two of them the thread waited on the
network or the GIL, and its caches went cold). Then 200 more files under `strace -f -c`
(where strace exists) give the syscalls a file costs, the GIL's futex calls apart, and 200
under `perf stat` (where it exists) the futex calls and context switches.

A measurement, not a test: it prints a table and never fails on a figure.
Environment: BREAKDOWN_FILES (default 3000), BREAKDOWN_SIZE (default 4096),
BENCH_PYTHON (the interpreter for s3push; default /usr/bin/python3).
"""

import collections
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3server  # noqa: E402

FILES = int(os.environ.get("BREAKDOWN_FILES", "3000"))
SIZE = int(os.environ.get("BREAKDOWN_SIZE", "4096"))

# (what is wrapped, the step it counts to), in the order of a file's move.
STEPS = [
    ("open_directory", "open and checks"), ("open_regular_file", "open and checks"),
    ("check_links", "open and checks"), ("fixed_in_place", "open and checks"),
    ("Ledger.vouching", "open and checks"),
    ("check_no_writer", "writer checks (2)"),
    ("digest_range", "hashing"),
    ("sign_request", "signing"),
    ("request_head", "request"), ("Connection.send", "request"),
    ("read_answer", "answer"),
    ("Md5Check.confirm", "proof"),
    ("confirmation", "record: built"), ("Ledger.write", "record: written"),
    ("Ledger.sync", "record: fsync"),
    ("remove_file", "removal"), ("Ledger.resolved", "removal"),
    ("upload_file", "the rest: upload"), ("ObjectSettings.sending", "the rest: upload"),
    ("FileTask.advance", "the rest: move"),
]


def measure(script, out, argv):
    """In this process: run s3push's main with the steps wrapped; write the figures."""
    spec = importlib.util.spec_from_file_location("s3push", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["s3push"] = module
    spec.loader.exec_module(module)
    spent, calls, local = collections.Counter(), collections.Counter(), threading.local()

    def wrap(owner, name, step):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            stack = local.__dict__.setdefault("stack", [])
            now = time.thread_time()
            if stack:   # the outer step pauses
                spent[stack[-1][0]] += now - stack[-1][1]
            stack.append([step, now])
            calls[step] += 1
            try:
                return original(*args, **kwargs)
            finally:
                now = time.thread_time()
                done = stack.pop()
                spent[done[0]] += now - done[1]
                if stack:
                    stack[-1][1] = now
        if isinstance(owner, type) and isinstance(owner.__dict__.get(name), staticmethod):
            wrapper = staticmethod(wrapper)
        setattr(owner, name, wrapper)

    for path, step in STEPS:
        owner, _, name = path.rpartition(".")
        wrap(getattr(module, owner) if owner else module, name, step)
    workers = []
    worker = module.worker

    def counted_worker(job):
        started = time.thread_time()
        try:
            return worker(job)
        finally:
            workers.append(time.thread_time() - started)
    module.worker = counted_worker
    started = time.thread_time()
    status = module.main(argv)
    with open(out, "w") as handle:
        json.dump({"spent": spent, "calls": calls, "workers": sum(workers),
                   "main": time.thread_time() - started, "status": status}, handle)


def make_files(source, count):
    for number in range(count):
        folder = os.path.join(source, "d%02d" % (number % 20))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "f%05d" % number), "wb") as handle:
            handle.write(os.urandom(SIZE))
    os.sync()   # written back: the run pays for no writeback of the test's files


def per_file(python, server, env, work, tool):
    """What 200 files cost under tool ('strace': syscalls a file, the futex calls of the
    GIL apart; 'perf': futex calls and context switches a file, counted by the kernel
    with the threads at full speed: strace slows them, and they contend more), or None
    where the tool is missing or refused."""
    found = shutil.which(tool)
    if found is None:
        return None
    counted = []
    for count in (0, 200):   # the difference: what the files cost, not the start
        source = tempfile.mkdtemp(dir=work)
        make_files(source, count)
        report = os.path.join(work, "%s-%d" % (tool, count))
        prefix = [found, "-f", "-c", "-o", report] if tool == "strace" else \
            [found, "stat", "-x,", "-o", report, "-e",
             "syscalls:sys_enter_futex,context-switches", "--"]
        if subprocess.call(prefix + [python, s3server.S3PUSH, "--endpoint-url",
                                     server.endpoint, "--min-age", "0", source,
                                     "s3://%s/%s%d/" % (server.bucket, tool, count)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
            return None
        with open(report) as handle:
            lines = [line.split(",") if tool == "perf" else line.split() for line in handle]
        if tool == "perf":
            counted.append([float(line[0]) for line in lines if len(line) > 2 and
                            line[0].replace(".", "").isdigit()])
        else:
            rows = [(fields[-1], int(fields[3])) for fields in lines
                    if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total"]
            counted.append([sum(n for name, n in rows if name != "futex")])
    if len(counted[0]) != len(counted[1]) or not counted[0]:
        return None
    return [(after - before) / 200.0 for before, after in zip(*counted)]


def main():
    if sys.argv[1:2] == ["--measure"]:
        return measure(sys.argv[2], sys.argv[3], sys.argv[4:])
    python = os.environ.get("BENCH_PYTHON") or (
        "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable)
    work = tempfile.mkdtemp(prefix="s3push-breakdown-")
    server = s3server.RcloneServer()
    try:
        env = dict(os.environ, AWS_ACCESS_KEY_ID=server.access_key,
                   AWS_SECRET_ACCESS_KEY=server.secret_key, AWS_DEFAULT_REGION="us-east-1",
                   AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
                   XDG_STATE_HOME=os.path.join(work, "state"))
        source = tempfile.mkdtemp(dir=work)
        make_files(source, FILES)
        out = os.path.join(work, "steps.json")
        subprocess.check_call([python, os.path.abspath(__file__), "--measure", s3server.S3PUSH,
                               out, "--endpoint-url", server.endpoint, "--min-age", "0",
                               source, "s3://%s/steps/" % server.bucket], env=env)
        with open(out) as handle:
            data = json.load(handle)
        left = sum(len(names) for _, _, names in os.walk(source))
        if data["status"] != 0 or left:
            sys.exit("breakdown: the run failed (exit %s, %d files left)"
                     % (data["status"], left))
        scale = 1e6 / FILES
        print("%d files of %d bytes, default jobs: CPU microseconds a file, by step"
              % (FILES, SIZE))
        print("| step | CPU us | calls |")
        print("| --- | --- | --- |")
        order = []
        for _, step in STEPS:
            if step not in order:
                order.append(step)
        for step in order:
            spent, calls = data["spent"].get(step, 0), data["calls"].get(step, 0)
            print("| %s | %.0f | %.1f |" % (step, spent * scale, calls / float(FILES)))
        rest = data["workers"] - sum(data["spent"].values())
        print("| the rest: worker loop, report | %.0f | |" % (rest * scale))
        print("| workers in all | %.0f | |" % (data["workers"] * scale))
        print("| scan, order and queue (main thread, start-up included) | %.0f | |"
              % (data["main"] * scale))
        syscalls = per_file(python, server, env, work, "strace")
        if syscalls:
            print("syscalls a file (strace): %.1f, futex calls apart" % tuple(syscalls))
        switches = per_file(python, server, env, work, "perf")
        if switches:
            print("a file also costs (perf stat): %.1f futex calls and %.1f context switches "
                  "(the GIL passed between threads)" % tuple(switches))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

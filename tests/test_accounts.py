"""Other accounts on a shared host: none can keep a run from running (the run lock is in
this account's private state folder), and files this account could not remove once
uploaded are never uploaded (one line a directory, exit 65). The real script against
the test server; the other account is nobody, so most tests need root."""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import filesystems  # noqa: E402
import s3server  # noqa: E402
from helpers import RUN_TIMEOUT, IntegrationCase, files_under, skip_if_foreign  # noqa: E402
from helpers import write_file  # noqa: E402

NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups"]
# The interpreter nobody runs: root's pyenv is out of nobody's reach.
NOBODY_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
HOLD_FLOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def needs_root(test):
    return unittest.skipUnless(os.geteuid() == 0, "becomes nobody, which needs root")(test)


class RunLock(IntegrationCase):
    @needs_root
    def test_a_reader_holding_a_flock_on_source_dir_stalls_nothing(self):
        os.chmod(self.tmp, 0o755)
        files = {"f%d" % i: b"data %d" % i for i in range(5)}
        for name, data in files.items():
            write_file(self.source, name, data)
        holder = subprocess.Popen(AS_NOBODY + [NOBODY_PYTHON, "-c", HOLD_FLOCK, self.source],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(holder.communicate)
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline(), b"held\n")
        result = self.run_s3push()
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(result.stderr, "")
        self.assertEqual(files_under(self.source), [])
        self.assert_landed(files)

    def test_runs_of_this_account_exclude_each_other_by_any_spelling(self):
        write_file(self.source, "a", b"a")
        gate, process = self.gated_run()
        alias = os.path.join(self.tmp, "alias")
        os.symlink(self.source, alias)
        summary, metrics = (os.path.join(self.tmp, name) for name in ("s.json", "m.prom"))
        for spelling in (alias, self.source + "/./", os.path.join(self.tmp, "..",
                                                                  os.path.basename(self.tmp),
                                                                  "src")):
            second = self.run_s3push("--summary-json", summary, "--metrics-file", metrics,
                                     source=spelling)
            self.assertEqual(second.status, 0, second.stderr)
            self.assertIn("another run (pid %d) is moving" % process.pid, second.stderr)
        with open(summary) as handle:
            data = json.load(handle)
        self.assertEqual((data["run_skipped"], data["lock_holder_pid"]), (True, process.pid))
        with open(metrics) as handle:
            text = handle.read()
        self.assertRegex(text, r"\ns3push_run_skipped\{[^}]*\} 1\n")
        self.assertNotIn("s3push_last_success_timestamp_seconds{", text)
        gate.release.set()
        process.communicate(timeout=RUN_TIMEOUT)
        self.assertEqual(process.returncode, 0)
        self.assert_landed({"a": b"a"})

    def lock_file(self):
        """The run lock's file of SOURCE_DIR in the state folder (see run_lock)."""
        source = os.stat(self.source)
        return os.path.join(self.home, ".local", "state", "s3push",
                            "run-%x-%x.lock" % (source.st_dev, source.st_ino))

    def date_locks(self, when, source=None):
        """Date the path's lock (see take_path_lock) and, if there is one, the run lock as
        taken at when."""
        folder = os.path.dirname(self.lock_file())
        for lock in (s3server.s3push.path_lock_name(source or self.source),
                     os.path.basename(self.lock_file())):
            if os.path.exists(os.path.join(folder, lock)):
                os.utime(os.path.join(folder, lock), (when, when))

    def kept_out(self, *args):
        """A run the lock keeps out: (its stderr, its summary, its metrics text)."""
        summary, metrics = (os.path.join(self.tmp, name) for name in ("s.json", "m.prom"))
        result = self.run_s3push("--summary-json", summary, "--metrics-file", metrics, *args)
        self.assertEqual(result.status, 0, result.stderr)
        with open(summary) as summary_file, open(metrics) as metrics_file:
            return result.stderr, json.load(summary_file), metrics_file.read()

    def held_seconds(self, metrics):
        return float(re.search(r"\ns3push_lock_held_seconds\{[^}]*\} (\S+)\n",
                               metrics).group(1))

    def test_a_run_holding_the_lock_for_long_is_named_in_a_warning(self):
        write_file(self.source, "a", b"a")
        self.assertEqual(self.run_s3push().status, 0)   # leaves the lock's file behind
        self.date_locks(time.time() - 3600)
        write_file(self.source, "b", b"b")
        gate, process = self.gated_run()
        process.send_signal(signal.SIGSTOP)   # a stopped run, mid-upload
        self.addCleanup(process.send_signal, signal.SIGCONT)
        # Held since it began (its lock time, not the file's): said as usual.
        err, data, metrics = self.kept_out()
        self.assertEqual(err, "s3push: another run (pid %d) is moving %s; this one exits\n"
                         % (process.pid, self.source))
        self.assertLess(data["lock_held_seconds"], 60)
        self.assertLess(self.held_seconds(metrics), 60)
        # Held for two hours: a warning naming the pid and since when (UTC).
        since = time.time() - 7200
        self.date_locks(since)
        err, data, metrics = self.kept_out()
        self.assertRegex(err, r"^s3push: warning: another run \(pid %d\) has held the lock "
                         r"of %s since %s \(720\d s, over --lock-warn-after 3600s\).*\n$" % (
                             process.pid, re.escape(self.source),
                             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))))
        self.assertEqual((data["lock_holder_pid"], data["run_skipped"]), (process.pid, True))
        self.assertGreaterEqual(data["lock_held_seconds"], 7200)
        self.assertGreaterEqual(self.held_seconds(metrics), 7200)
        err, _, _ = self.kept_out("--lock-warn-after", "3h")   # not yet that long
        self.assertIn("another run (pid %d) is moving" % process.pid, err)
        process.send_signal(signal.SIGCONT)
        gate.release.set()
        process.communicate(timeout=RUN_TIMEOUT)
        self.assertEqual(process.returncode, 0)
        self.assert_landed({"a": b"a", "b": b"b"})

    def test_a_run_hung_on_a_dead_mount_keeps_the_later_ones_out(self):
        """A run hangs at its first look at SOURCE_DIR (a FUSE mount whose daemon is
        stopped, as an NFS mount whose server is gone): the next one does not hang behind
        it, but names it and exits, since the lock of the path comes before any look."""
        with filesystems.stoppable_bindfs(self) as (mount, daemon):
            source = os.path.join(mount, "src")
            write_file(source, "a", b"a")
            os.makedirs(os.path.dirname(self.lock_file()), mode=0o700)   # as runs left it
            daemon.send_signal(signal.SIGSTOP)
            time.sleep(1.5)   # past FUSE's attribute cache (1 s): every look now hangs
            hung = subprocess.Popen(self.command(source=source), env=self.env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL)
            self.addCleanup(hung.kill)
            path_lock = os.path.join(os.path.dirname(self.lock_file()),
                                     s3server.s3push.path_lock_name(source))
            deadline = time.monotonic() + RUN_TIMEOUT
            while not os.path.exists(path_lock) or \
                    open(path_lock).read() != "%d\n" % hung.pid:
                self.assertLess(time.monotonic(), deadline, "the first run took no lock")
                time.sleep(0.05)
            self.date_locks(time.time() - 7200, source)
            second = self.run_s3push(source=source)
            self.assertEqual(second.status, 0, second.stderr)
            self.assertRegex(second.stderr, r"^s3push: warning: another run \(pid %d\) has "
                             r"held the lock of %s since .*is it stopped or hung\?" % (
                                 hung.pid, re.escape(source)))
            self.assertIsNone(hung.poll(), "the first run did not hang")
            daemon.send_signal(signal.SIGCONT)
            _, err = hung.communicate(timeout=RUN_TIMEOUT)
            self.assertEqual(hung.returncode, 0, err)
            self.assertEqual(files_under(source), [])
        self.assert_landed({"a": b"a"})

    def test_a_pid_that_no_longer_runs_is_not_named(self):
        # The instant between a run's lock taken and its pid written over the last one's.
        write_file(self.source, "a", b"a")
        gone = subprocess.Popen(["true"])
        gone.wait()
        os.makedirs(os.path.dirname(self.lock_file()), mode=0o700)
        fd = os.open(self.lock_file(), os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"%d\n" % gone.pid)
        os.utime(self.lock_file(), (0, 0))
        err, data, metrics = self.kept_out()
        self.assertEqual(err, "s3push: another run (pid unknown) is moving %s; this one "
                         "exits\n" % self.source)
        self.assertEqual((data["lock_holder_pid"], data["lock_held_seconds"]), (None, None))
        self.assertEqual(self.held_seconds(metrics), 0)

    def test_a_state_folder_that_cannot_keep_the_lock_falls_back(self):
        not_a_folder = write_file(self.tmp, "plain", b"")
        cases = [(os.path.join(os.fsdecode(not_a_folder), "state"), "Not a directory")]
        if os.geteuid() == 0:
            shared = os.path.join(self.tmp, "shared-state")
            os.makedirs(shared)
            os.chown(shared, NOBODY, NOBODY)
            cases.append((shared, "owned by uid %d" % NOBODY))
        for n, (state_dir, reason) in enumerate(cases):
            write_file(self.source, "f%d" % n, b"x")
            result = self.run_s3push("--state-dir", state_dir)
            self.assertEqual(result.status, 0, result.stderr)
            self.assertIn("cannot keep the run lock (%s: %s" % (state_dir, reason),
                          result.stderr)
            self.assertEqual(files_under(self.source), [])
        self.assertEqual(os.listdir(cases[-1][0]), [])


@needs_root
class Unremovable(IntegrationCase):
    """Run as nobody: a directory nobody cannot write, a sticky directory holding root's
    file beside nobody's own, and a directory of nobody's: only the last two move."""

    def setUp(self):
        IntegrationCase.setUp(self)
        os.chmod(self.tmp, 0o755)
        for path in (self.source, self.home):
            os.chown(path, NOBODY, NOBODY)
        self.kept = {"readonly/a": b"a", "readonly/b": b"b", "sticky/roots": b"r"}
        self.moving = {"sticky/mine": b"m", "own/c": b"c", "top": b"t"}
        for relative, data in sorted(self.kept.items()) + sorted(self.moving.items()):
            path = write_file(self.source, relative, data)
            if relative in self.moving:
                os.chown(path, NOBODY, NOBODY)
        os.chown(os.path.join(self.source, "own"), NOBODY, NOBODY)
        os.chmod(os.path.join(self.source, "sticky"), 0o1777)

    def run_as_nobody(self, *args):
        argv = AS_NOBODY + [NOBODY_PYTHON] + self.command(*args)[1:]
        done = subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    def assert_one_line_a_directory(self, err):
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 2, err)
        self.assertIn("%s/readonly/: this account (uid %d) cannot remove 2 files here (no "
                      "write permission on the directory)" % (self.source, NOBODY), lines[0])
        self.assertIn("%s/sticky/: this account (uid %d) cannot remove 1 file here (a "
                      "sticky directory" % (self.source, NOBODY), lines[1])

    def test_files_that_cannot_be_removed_are_never_uploaded(self):
        summary = os.path.join(self.home, "summary.json")
        status, out, err = self.run_as_nobody("--dry-run")
        self.assertEqual(status, 65, err)
        self.assert_one_line_a_directory(err)
        self.assertEqual(self.recorder.requests, [])
        for run in range(3):
            status, out, err = self.run_as_nobody("--summary-json", summary)
            self.assertEqual(status, 65, err)
            self.assert_one_line_a_directory(err)
            with open(summary) as handle:
                data = json.load(handle)
            self.assertEqual((data["files_left_unremovable"], data["files_failed"],
                              data["files_moved"]), (3, 0, 0 if run else 3))
        put = sorted(target.split(self.prefix, 1)[1] for method, target
                     in self.recorder.requests if method == "PUT")
        self.assertEqual(put, sorted(self.moving))
        self.assertEqual(files_under(self.source), sorted(k.encode() for k in self.kept))
        self.assert_landed(self.moving)


class OtherAccountsWriters(IntegrationCase):
    """Run as nobody, without CAP_LEASE, over root's file in nobody's directory: the kernel
    refuses nobody a lease on it, and /proc shows nobody none of root's processes, so
    root's writer is unseen. The run says so in a warning (with --min-age 0 the file then
    moves, as it must where nothing can tell); nobody's own files give no warning."""

    def setUp(self):
        IntegrationCase.setUp(self)
        os.chmod(self.tmp, 0o755)
        for path in (self.source, self.home):
            os.chown(path, NOBODY, NOBODY)

    def run_as_nobody(self):
        argv = AS_NOBODY + [NOBODY_PYTHON] + self.command()[1:]
        return subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)

    @needs_root
    @skip_if_foreign("no lease is refused where there are none (a note under -v says so)")
    def test_writers_of_other_accounts_unseen_are_said(self):
        path = write_file(self.source, "roots", b"r")   # root's, held open for writing
        writer = open(path, "ab")
        self.addCleanup(writer.close)
        done = self.run_as_nobody()
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(b"warning: cannot see whether processes of other accounts still write",
                      done.stderr)
        self.assertEqual(done.stderr.count(b"warning:"), 1, done.stderr)

    @needs_root
    def test_an_account_s_own_files_give_no_warning(self):
        path = write_file(self.source, "mine", b"m")
        os.chown(path, NOBODY, NOBODY)
        done = self.run_as_nobody()
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr, b"")
        self.assert_landed({"mine": b"m"})


class Immutable(IntegrationCase):
    def chattr(self, flag, path):
        try:
            done = subprocess.run(["chattr", flag, path], stderr=subprocess.PIPE)
        except OSError:
            self.skipTest("no chattr here")
        if done.returncode != 0:
            self.skipTest("chattr %s failed: %s" % (flag, done.stderr.decode().strip()))

    def test_an_immutable_or_append_only_file_is_not_uploaded(self):
        write_file(self.source, "plain", b"p")
        fixed = [write_file(self.source, name, b"x") for name in ("frozen", "log")]
        self.chattr("+i", fixed[0])
        try:
            self.chattr("+a", fixed[1])
            for run in range(2):
                result = self.run_s3push()
                self.assertEqual(result.status, 65, result.stderr)
                self.assertEqual(result.stderr.count("is immutable or append-only"), 2,
                                 result.stderr)
        finally:
            for path in fixed:
                subprocess.run(["chattr", "-i", "-a", path])
        self.assertEqual(files_under(self.source), [b"frozen", b"log"])
        self.assertEqual([t for _, t in self.recorder.requests],
                         ["/%s/%splain" % (self.server.bucket, self.prefix)])
        self.assert_landed({"plain": b"p"})


if __name__ == "__main__":
    unittest.main()

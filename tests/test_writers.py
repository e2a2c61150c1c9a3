"""Writer detection: a file that another process still has open for writing is left for a
later run. On Linux a read lease tells (it cannot be taken while anyone has the file open
for writing); where none can be taken, /proc/*/fdinfo tells; where neither exists (macOS,
the BSDs: the foreign-platform run) writers go unseen, -v says so once, and --min-age is
all there is.

OpenWritersUnit checks the detection in this process (s3push.still_written, WriterIndex,
WriterView); OpenWriters runs the real script against writer processes (helpers.WRITER),
each case with the lease and again with the lease off (TAKE_LEASES, see helpers), so that
/proc answers; WritersUnseen runs only in the foreign-platform run.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import filesystems  # noqa: E402
import s3server  # noqa: E402
from helpers import (FOREIGN, RUN_TIMEOUT, WRITER, files_under,  # noqa: E402
                     skip_if_foreign, write_file, written)
from test_faults import MIB, MULTIPART, FaultCase  # noqa: E402

sys.path.insert(0, s3server.REPO)
import s3push  # noqa: E402
s3push.load_deferred_modules()   # what a run loads once it has a file to send

# The script with file leases off (an internal seam): the /proc fallback answers.
NO_LEASES = ("import sys; sys.path.insert(0, %r); import s3push; s3push.TAKE_LEASES = False; "
             "sys.argv[0] = s3push.__file__; sys.exit(s3push.main())" % s3server.REPO)

# A writer pauses this long between bursts, --min-age 1: each pause leaves a window of
# 1.5 s in which the file is old enough but still open, for the runs (one every 0.2 s
# plus its own time) to meet. At 1.5 s the window was 0.5 s, which a loaded machine's
# runs could step over twice (seen once: the writer was never caught).
PAUSE = 2.5


@skip_if_foreign("no lease and no /proc: writers are not seen (WritersUnseen stands in)")
class OpenWriters(FaultCase):
    """Writers as separate processes: a file still open for writing is never moved; after
    every run what left the source is on the server, and in the end every byte written."""

    def writer(self, path, mode, bursts, size, pause, user=None):
        argv = [sys.executable, "-c", WRITER, path, mode, str(bursts), str(size), str(pause)]
        if user is not None:
            argv = ["setpriv", "--reuid=%d" % user, "--regid=%d" % user, "--clear-groups",
                    "/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                    else sys.executable] + argv[1:]
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(process.kill)
        return process

    def runs_while(self, process, leases, *args):
        """Run the script (-v) again and again while the process lives, then once more."""
        said = ""
        while True:
            alive = process.poll() is None
            argv = self.command("-v", *args)
            if not leases:
                argv[1:3] = ["-c", NO_LEASES]
            done = subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
            # 0, or 65 when the file changed during its upload (kept): never a loss, which
            # the end of check_writer proves byte for byte.
            self.assertIn(done.returncode, (0, 65), done.stderr)
            said += done.stdout.decode()
            if not alive:
                return said
            time.sleep(0.2)

    def check_writer(self, mode, bursts, size, pause, args, leases=True, user=None):
        path = os.path.join(self.source, "rec.bin")
        process = self.writer(path, mode, bursts, size, pause, user)
        said = self.runs_while(process, leases, *args)
        self.assertEqual(process.wait(RUN_TIMEOUT), 0)
        if files_under(self.source):   # the last burst was younger than --min-age
            time.sleep(1.1)
            said += self.run_s3push("-v", *args).stdout
        self.assertEqual(files_under(self.source), [])
        self.assert_landed({"rec.bin": written(bursts, size)})
        # A writer caught at the open or the unlink, or (on a busy machine) between the
        # scan and the open: either way the file was left while it was being written.
        self.assertRegex(said, "rec.bin: (still open for writing by another process|"
                               "changed since the scan)")

    def test_a_writer_that_pauses_past_min_age(self):
        for leases in (True, False):
            with self.subTest(leases=leases):
                self.prefix = self.prefix.rstrip("/") + "-%s/" % leases
                self.check_writer("hold", 3, 1000, PAUSE, ("--min-age", "1"), leases)

    def test_a_slow_copy_of_several_mib(self):
        self.check_writer("hold", 8, MIB, 0.3, ("--min-age", "0") + MULTIPART)

    def test_a_writer_of_another_user(self):
        if os.geteuid() != 0:
            self.skipTest("runs the writer as nobody, which needs root")
        os.chmod(self.tmp, 0o755)
        os.chmod(self.source, 0o777)
        for leases in (True, False):
            with self.subTest(leases=leases):
                self.prefix = self.prefix.rstrip("/") + "-%s/" % leases
                self.check_writer("hold", 3, 1000, PAUSE, ("--min-age", "1"), leases, 65534)

    def test_a_writer_that_opens_the_file_during_the_upload(self):
        # By the lease, and by /proc where no lease can be taken: the view that clears the
        # file for removal is taken after its upload, never one from before.
        for leases in (True, False):
            with self.subTest(leases=leases):
                path = write_file(self.source, "rec.bin", b"first\n")
                gate = s3server.GateProxy(self.recorder.endpoint)
                self.addCleanup(gate.close)
                argv = self.command("-v", endpoint=gate.endpoint)
                if not leases:
                    argv[1:3] = ["-c", NO_LEASES]
                process = subprocess.Popen(argv, env=self.env(), stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE)
                self.addCleanup(process.kill)
                self.assertTrue(gate.arrived.wait(RUN_TIMEOUT))
                writer = self.writer(path, "wait", 1, 10, 0)
                self.assertEqual(writer.stdout.readline(), b"open\n")
                gate.release.set()
                out, err = process.communicate(timeout=RUN_TIMEOUT)
                self.assertEqual(process.returncode, 0, err)
                self.assertIn(b"uploaded, but still open for writing", out)
                self.assertIn(b"1 still being written", out)
                self.assertEqual(files_under(self.source), [b"rec.bin"])
                writer.communicate(b"go\n", timeout=RUN_TIMEOUT)
                result = self.run_s3push("--min-age", "0")
                self.assertEqual(result.status, 0, result.stderr)
                self.assert_landed({"rec.bin": b"first\n" + b"A" * 10})
                self.assertEqual(files_under(self.source), [])

    def test_a_file_held_open_longer_than_warn_waiting_is_named_each_run(self):
        import json
        path = write_file(self.source, "rec.bin", b"first\n")
        writer = self.writer(path, "wait", 1, 10, 0)
        self.assertEqual(writer.stdout.readline(), b"open\n")
        os.utime(path, (time.time() - 2 * 86400 - 600,) * 2)   # not written for 2 days
        summary = os.path.join(self.tmp, "summary.json")
        for _ in range(2):   # each run
            result = self.run_s3push("--min-age", "0", "--summary-json", summary)
            self.assertEqual(result.status, 0, result.stderr)
            self.assertIn("s3push: warning: %s: still open for writing by another process; "
                          "left for a later run, and last written 2d10m ago (beyond "
                          "--warn-waiting)" % path.decode(), result.stderr)
            with open(summary) as handle:
                data = json.load(handle)
            self.assertEqual(data["files_left_writing"], 1)
            self.assertAlmostEqual(data["files_left_oldest_seconds"]["writing"],
                                   2 * 86400 + 600, delta=60)
        result = self.run_s3push("--min-age", "0", "--warn-waiting", "3d")
        self.assertEqual((result.status, result.stderr), (0, ""))
        self.assertEqual(files_under(self.source), [b"rec.bin"])
        writer.communicate(b"go\n", timeout=RUN_TIMEOUT)
        self.assertEqual(self.run_s3push("--min-age", "0").status, 0)
        self.assert_landed({"rec.bin": b"first\n" + b"A" * 10})


@unittest.skipUnless(FOREIGN, "runs in the foreign-platform run only (no lease, no /proc)")
class WritersUnseen(FaultCase):
    """Where neither a lease nor /proc can tell (macOS, the BSDs), writer detection degrades
    as the README says: said once under -v, and --min-age is all there is."""
    NOTE = "cannot tell whether other processes still write files here (no file lease, " \
           "no /proc): relying on --min-age and in-progress names"
    writer = OpenWriters.writer

    def test_a_writer_holding_its_file_open_is_not_seen(self):
        path = write_file(self.source, "rec.bin", b"first\n")
        writer = self.writer(path, "wait", 1, 10, 0)
        self.assertEqual(writer.stdout.readline(), b"open\n")
        result = self.run_s3push("-v", "--min-age", "0")
        writer.communicate(b"go\n", timeout=RUN_TIMEOUT)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(result.stderr.count(self.NOTE), 1, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed({"rec.bin": b"first\n"})

    def test_min_age_still_keeps_a_writer_s_file_until_it_is_quiet(self):
        path = os.path.join(self.source, "rec.bin")
        writer = self.writer(path, "hold", 3, 1000, 1.0)
        while writer.poll() is None:
            result = self.run_s3push("-v", "--min-age", "3")
            self.assertEqual(result.status, 0, result.stderr)
            self.assertEqual(files_under(self.source), [b"rec.bin"])
            time.sleep(0.3)
        time.sleep(3.1)
        result = self.run_s3push("-v", "--min-age", "3")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn(self.NOTE, result.stderr)
        self.assert_landed({"rec.bin": written(3, 1000)})


class OpenWritersUnit(unittest.TestCase):
    """still_written, WriterIndex and WriterView in this process: the lease, the /proc
    view and their absence (was test_units.OpenWriters; the runs are OpenWriters)."""

    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        self.path = os.path.join(self.root, "f")
        with open(self.path, "wb") as handle:
            handle.write(b"x")
        self.fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, self.fd)
        self.info = os.fstat(self.fd)
        self.addCleanup(setattr, s3push, "TAKE_LEASES", s3push.TAKE_LEASES)

    def test_by_lease_and_by_proc(self):
        for leases in (True, False):
            s3push.TAKE_LEASES = leases
            index = s3push.WriterIndex()
            self.assertIs(s3push.still_written(self.fd, self.info, index, 0), False)
            for mode in ("ab", "r+b"):
                with open(self.path, mode):
                    self.assertIs(s3push.still_written(self.fd, self.info, index,
                                                          time.monotonic()), True, mode)
            with open(self.path, "rb"):   # a reader is no writer
                self.assertIs(s3push.still_written(self.fd, self.info, index,
                                                      time.monotonic()), False)
            self.assertEqual(index.built is None, leases)   # /proc only when no lease

    def test_the_proc_view_is_built_again_only_when_too_old(self):
        s3push.TAKE_LEASES = False
        index = s3push.WriterIndex()
        self.assertIs(s3push.still_written(self.fd, self.info, index, 0), False)
        built = index.built
        with open(self.path, "ab"):
            # An older view will do for `since` before it: the writer is not seen yet.
            self.assertIs(s3push.still_written(self.fd, self.info, index, built), False)
            self.assertIs(s3push.still_written(self.fd, self.info, index,
                                                  time.monotonic()), True)
        self.assertGreater(index.built, built)

    def test_without_the_lease_call_proc_answers(self):
        """As on macOS and the BSDs: fcntl has no F_SETLEASE at all (TAKE_LEASES still on)."""
        import fcntl
        lease = getattr(fcntl, "F_SETLEASE", None)
        if lease is not None:
            del fcntl.F_SETLEASE
            self.addCleanup(setattr, fcntl, "F_SETLEASE", lease)
        index = s3push.WriterIndex()
        self.assertIs(s3push.still_written(self.fd, self.info, index, 0), False)
        self.assertIsNotNone(index.built, "the /proc view answered")
        index = s3push.WriterIndex(proc=os.path.join(self.root, "no-proc"))
        self.assertIsNone(s3push.still_written(self.fd, self.info, index, 0))

    def test_neither_lease_nor_proc_says_none(self):
        s3push.TAKE_LEASES = False
        index = s3push.WriterIndex(proc=os.path.join(self.root, "no-proc"))
        self.assertIsNone(s3push.still_written(self.fd, self.info, index, 0))

    def test_fdinfo_flags(self):
        for text, facts in (("flags:\t0100000\nmnt_id:\t25\n", (False, 25, None)),
                            ("flags:\t02\nmnt_id:\t7\nino:\t12\n", (True, 7, 12)),
                            ("pos:\t0\nflags:\t0100001\n", (True, None, None)),
                            ("flags:\t0102002\n", (True, None, None)),
                            ("flags:\t02100000\nmnt_id:\t3\n", (False, 3, None))):
            path = os.path.join(self.root, "fdinfo")
            with open(path, "w") as handle:
                handle.write("pos:\t0\n" + text)
            self.assertEqual(s3push.fd_facts(path), facts, text)

    def fake_proc(self, fdinfo, mountinfo):
        """A /proc of one other process (pid 100) whose descriptor 5 is this file, its
        fdinfo the text fdinfo, and of this one, whose fd is on mount 7 (0:50)."""
        proc = os.path.join(self.root, "proc")
        for folder in ("self/fdinfo", "100/fd", "100/fdinfo"):
            os.makedirs(os.path.join(proc, folder))
        with open(os.path.join(proc, "self", "fdinfo", str(self.fd)), "w") as handle:
            handle.write("pos:\t0\nflags:\t0100000\nmnt_id:\t7\n")
        with open(os.path.join(proc, "self", "mountinfo"), "wb") as handle:
            handle.write(b"7 1 0:50 / / rw - ext4 /dev/x rw\n" + mountinfo)
        os.symlink(self.path, os.path.join(proc, "100", "fd", "5"))
        with open(os.path.join(proc, "100", "fdinfo", "5"), "w") as handle:
            handle.write("pos:\t0\n" + fdinfo)
        return s3push.WriterIndex(proc)

    def test_only_descriptors_on_the_file_s_filesystem_are_looked_at(self):
        """The view asks which file a descriptor has open (a stat() of its /proc link)
        where its mount is of the file's filesystem; where no mountinfo shows its mount
        (lazily unmounted) or none was given (an old kernel), only if fdinfo gives the
        file's inode number or none; never where its mount is of another filesystem."""
        s3push.TAKE_LEASES = False
        ino = self.info.st_ino
        for fdinfo, mountinfo, seen in (
                ("flags:\t01\nmnt_id:\t7\n", b"", True),
                ("flags:\t01\nmnt_id:\t8\nino:\t%d\n" % (ino + 1),   # a mount elsewhere
                 b"8 1 0:50 /sub /mnt rw - ext4 /dev/x rw\n", True),
                ("flags:\t01\n", b"", True),
                ("flags:\t01\nmnt_id:\t9\n", b"", True),
                ("flags:\t01\nmnt_id:\t9\nino:\t%d\n" % ino, b"", True),
                ("flags:\t01\nmnt_id:\t9\nino:\t%d\n" % (ino + 1), b"", False),
                ("flags:\t01\nmnt_id:\t9\n", b"9 1 0:51 / /caf\xe9 rw - nfs4 h:/ rw\n", False),
                ("flags:\t0\nmnt_id:\t7\n", b"", False)):
            shutil.rmtree(os.path.join(self.root, "proc"), ignore_errors=True)
            index = self.fake_proc(fdinfo, mountinfo)
            self.assertIs(s3push.still_written(self.fd, self.info, index, time.monotonic()),
                          seen, (fdinfo, mountinfo))

    def test_a_writer_through_a_bind_mount_is_seen(self):
        """The same file through another mount of its filesystem: another mount id, the
        same filesystem, so looked at."""
        filesystems.need_root(self, "a bind mount")
        other = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, other)
        subprocess.run(["mount", "--bind", self.root, other], check=True)
        self.addCleanup(filesystems.unmount, other)
        for leases in (True, False):
            s3push.TAKE_LEASES = leases
            with open(os.path.join(other, "f"), "ab"):
                self.assertIs(s3push.still_written(self.fd, self.info, s3push.WriterIndex(),
                                                   time.monotonic()), True, leases)

    def assert_answers(self, message):
        """still_written (the /proc view) answers, and says no writer."""
        answers = []
        check = threading.Thread(target=lambda: answers.append(
            s3push.still_written(self.fd, self.info, s3push.WriterIndex(),
                                 time.monotonic())), daemon=True)
        check.start()
        check.join(RUN_TIMEOUT)
        self.assertEqual(answers, [False], message)

    def test_a_writer_on_a_dead_mount_holds_up_no_check(self):
        """A process writes a file of a dead mount (a FUSE daemon stopped, as an NFS mount
        whose server is gone): the /proc view of a file elsewhere still answers."""
        s3push.TAKE_LEASES = False
        with filesystems.stoppable_bindfs(self) as (mount, daemon):
            writer = subprocess.Popen(
                [sys.executable, "-c", "import sys, time; log = open(sys.argv[1], 'ab'); "
                 "print(flush=True); time.sleep(600)", os.path.join(mount, "log")],
                stdout=subprocess.PIPE)
            try:
                writer.stdout.readline()   # the log is open
                daemon.send_signal(signal.SIGSTOP)
                try:
                    time.sleep(1.5)   # past FUSE's attribute cache (1 s): every look hangs
                    self.assert_answers("the check hung on the dead mount")
                    # As an operator clears a hung NFS mount: no mountinfo shows it now.
                    subprocess.run(["umount", "-l", mount], check=True)
                    self.assert_answers("the check hung on the dead mount, lazily unmounted")
                finally:
                    daemon.send_signal(signal.SIGCONT)
            finally:
                writer.kill()
                writer.wait()


if __name__ == "__main__":
    unittest.main()

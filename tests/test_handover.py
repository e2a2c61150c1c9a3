"""The last steps of a move against writers as real ones behave: a file rewritten in
place while its parts are sent, a new version renamed over the name at every step from
the server's confirmation to the unlink, and runs killed at every one of those steps.

After every run: the key holds nothing new, or one whole state of the file, never a mix;
every version that existed is on the server or still local, byte for byte; once a later
run is done, no aside name is left; and a file whose upload the ledger recorded is never
sent again.
"""

import os
import random
import signal
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3server  # noqa: E402
from helpers import (RUN_TIMEOUT, WithArchive, files_under,  # noqa: E402
                     skip_unless_server_checks, write_file)
from test_faults import MIB, MULTIPART, FaultCase  # noqa: E402

# The script with s3push.MOVE_SEAM set: at the step named by SEAM_STEP, either die
# (SEAM_ACTION=kill, as kill -9 would) or be a writer that renames a new version, written
# beside the name (SEAM_NEW), over it (SEAM_ACTION=rename).
SEAMED = """
import os, signal, sys
sys.path.insert(0, %r)
import s3push

def seam(step, name):
    if step != os.environ["SEAM_STEP"]:
        return
    if os.environ["SEAM_ACTION"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    new = os.environ["SEAM_NEW"]
    os.rename(new, os.path.join(os.path.dirname(new), name))

s3push.MOVE_SEAM = seam
sys.argv[0] = s3push.__file__
sys.exit(s3push.main())
""" % s3server.REPO
# From the server's confirmation to the unlink (see s3push.move_file and remove_file).
STEPS = ("confirmed", "written", "recorded", "rename", "check", "unlink", "removed")
RECORDED = STEPS[1:]   # the ledger holds the upload (its line written: a kill leaves it,
# fsync'ed or not): a later run sends nothing again
# Under --archive-dir: DIR's folders made (archive), linked into DIR (archived).
ARCHIVE_STEPS = STEPS[:-1] + ("archive", "archived", "removed")


def private_names(root):
    """Every name under root that a removal left: an aside name, a private folder."""
    return [name for _, dirs, files in os.walk(root) for name in dirs + files
            if name.startswith(".s3push-")]


class RewrittenInPlace(FaultCase):
    """A multipart upload whose file is rewritten in place (same name, same inode, same
    size, the old mtime put back: what rsync --inplace or a database does) at one moment."""

    def rewrite(self, path, data):
        def act():
            mtime = os.stat(path).st_mtime
            with open(path, "r+b") as handle:
                handle.write(data)
            os.utime(path, (mtime, mtime))
        return act

    def check_moment(self, moment, rule_for):
        old = os.urandom(11 * MIB)
        new = os.urandom(len(old))
        path = write_file(self.source, "db.bin", old)
        proxy = self.fault_proxy(rule_for(self.rewrite(path, new)))
        result = self.run_s3push("--jobs", "1", *MULTIPART, endpoint=proxy.endpoint)
        got = self.server.object_bytes(self.prefix + "db.bin")
        held = {None: "nothing", old: "the old bytes", new: "the new bytes"}.get(got, "a mix")
        self.assertNotEqual(held, "a mix", "%s: the key holds a mix of two states" % moment)
        self.assertEqual(result.status, 65, result.stderr)
        self.assertIn("changed while it was uploading", result.stderr)
        self.assertEqual(files_under(self.source), [b"db.bin"], moment)
        if moment != "after the last part":   # parts of two states: never completed
            self.assertEqual(held, "nothing", moment)
            self.assertIn("multipart upload was not completed", result.stderr)
        result = self.run_s3push(*MULTIPART)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed({"db.bin": new})

    def test_rewritten_at_each_moment(self):
        moments = {
            "before any part": lambda act: lambda r: (
                ("after", act) if "?uploads" in r.target else None),
            "between parts": lambda act: lambda r: (
                ("after", act) if "partNumber=1&" in r.target and r.attempt == 0 else None),
            "while a part is in flight": lambda act: lambda r: (
                act() if "partNumber=2&" in r.target and r.attempt == 0 else None),
            "after the last part": lambda act: lambda r: (
                act() if r.method == "POST" and "?uploadId=" in r.target else None),
        }
        base = self.prefix.rstrip("/")
        for moment, rule_for in moments.items():
            with self.subTest(moment=moment):
                self.prefix = "%s-%d/" % (base, len(moment))
                self.check_moment(moment, rule_for)

    @skip_unless_server_checks("content-md5")
    def test_a_big_single_put_changed_between_its_hash_and_its_send(self):
        # The body is read twice (hashed, then sent): a change in between is the file's,
        # not the network's, and is said so at once, not retried as a damaged body.
        old = os.urandom(24 * MIB)
        path = write_file(self.source, "big.bin", old)
        gate = s3server.GateProxy(self.recorder.endpoint)
        self.addCleanup(gate.close)
        argv = self.command("--multipart-threshold", "64MiB", endpoint=gate.endpoint)
        process = subprocess.Popen(argv, env=self.env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.addCleanup(process.kill)
        self.assertTrue(gate.arrived.wait(RUN_TIMEOUT))
        with open(path, "r+b") as handle:
            handle.seek(20 * MIB)
            handle.write(b"rewritten")
        gate.release.set()
        _, err = process.communicate(timeout=RUN_TIMEOUT)
        self.assertEqual(process.returncode, 65, err)
        self.assertIn(b"changed while it was uploading", err)
        self.assertLessEqual(len(self.recorder.requests), 2, "retried as a network fault")
        self.assertTrue(self.server.object_bytes(self.prefix + "big.bin") in (None, old),
                        "the key holds bytes that were never the file's")
        self.assertEqual(files_under(self.source), [b"big.bin"])


class Handover(FaultCase):
    def seamed_run(self, step, action, new=None, *args):
        argv = self.command("--min-age", "0", *args)
        argv[1:3] = ["-c", SEAMED]
        env = self.env(SEAM_STEP=step, SEAM_ACTION=action, SEAM_NEW=new or "")
        return subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)

    def puts(self):
        return [t for m, t in self.recorder.requests if m == "PUT"]

    def test_a_new_version_renamed_over_the_name_at_each_step(self):
        base = self.prefix.rstrip("/")   # a random part: runs side by side share servers
        for step in STEPS:
            with self.subTest(step=step):
                self.prefix = "%s-%s/" % (base, step)
                old, new = b"old %d" % random.randrange(10 ** 9), b"new version"
                write_file(self.source, "sub/app.log", old)
                tmp = write_file(self.source, "sub/app.log.tmp", new)
                done = self.seamed_run(step, "rename", os.fsdecode(tmp))
                self.assertEqual(done.returncode, 0, done.stderr)
                # The new version is local, the old one at the key: neither was lost.
                self.assertEqual(files_under(self.source), [b"sub/app.log"])
                with open(os.path.join(self.source, "sub", "app.log"), "rb") as handle:
                    self.assertEqual(handle.read(), new, step)
                self.assert_landed({"sub/app.log": old})
                self.assertEqual(private_names(self.source), [])
                result = self.run_s3push("--min-age", "0")
                self.assertEqual(result.status, 0, result.stderr)
                self.assert_landed({"sub/app.log": new})
                self.assertEqual(files_under(self.source), [])

    def test_killed_at_each_step_then_run_again(self):
        base = self.prefix.rstrip("/")
        for step in STEPS:
            with self.subTest(step=step):
                self.prefix = "%s-%s/" % (base, step)
                data = b"data %d" % random.randrange(10 ** 9)
                write_file(self.source, "sub/app.log", data)
                done = self.seamed_run(step, "kill")
                self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
                self.assertEqual(self.server.object_bytes(self.prefix + "sub/app.log"), data)
                sent = len(self.puts())
                result = self.run_s3push("--min-age", "0", "-v")
                self.assertEqual(result.status, 0, result.stderr)
                self.assertEqual(files_under(self.source), [], step)
                self.assertEqual(private_names(self.source), [], step)
                self.assert_landed({"sub/app.log": data})
                if step in RECORDED:   # the ledger vouches: removed, not sent again
                    self.assertEqual(len(self.puts()), sent, step)

    def test_killed_at_each_step_then_a_new_version_takes_the_name(self):
        # Whatever the kill left (the file at its name or aside, recorded or not), and
        # whether the new version is dated before or after the old: the new one reaches
        # the key last, and neither version is lost.
        base = self.prefix.rstrip("/")
        for step in STEPS[:-1]:
            for new_mtime, jobs in ((1000, "1"), (3000, "8")):
                with self.subTest(step=step, new_mtime=new_mtime):
                    self.prefix = "%s-%s-%d/" % (base, step, new_mtime)
                    old = b"old %d" % random.randrange(10 ** 9)
                    new = b"new %d" % random.randrange(10 ** 9)
                    write_file(self.source, "app.log", old, mtime=2000)
                    done = self.seamed_run(step, "kill")
                    self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
                    self.assertEqual(self.server.object_bytes(self.prefix + "app.log"), old)
                    tmp = write_file(self.source, "app.log.tmp", new, mtime=new_mtime)
                    os.rename(tmp, os.path.join(os.fsencode(self.source), b"app.log"))
                    result = self.run_s3push("--min-age", "0", "--jobs", jobs)
                    self.assertEqual(result.status, 0, result.stderr)
                    self.assertEqual(files_under(self.source), [])
                    self.assert_landed({"app.log": new})

    def test_killed_after_the_confirmation_under_if_exists_keep_and_number(self):
        # The next run meets no object of its own (412) and makes no numbered copy: the
        # ledger vouches for the file, which is removed without another PUT.
        for mode in ("keep", "number"):
            with self.subTest(mode=mode):
                self.prefix = "%s-%s/" % (self.prefix.rstrip("/"), mode)
                data = b"report %d" % random.randrange(10 ** 9)
                write_file(self.source, "report.csv", data)
                done = self.seamed_run("recorded", "kill", None, "--if-exists", mode)
                self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
                sent = len(self.puts())
                result = self.run_s3push("--min-age", "0", "--if-exists", mode)
                self.assertEqual(result.status, 0, result.stderr)
                self.assertEqual(files_under(self.source), [])
                self.assertEqual(len(self.puts()), sent, "sent again")
                self.assertIsNone(self.server.object_bytes(self.prefix + "report.1.csv"))
                self.assert_landed({"report.csv": data})

    def test_an_aside_name_the_ledger_does_not_vouch_for_never_takes_its_name_s_key(self):
        # Planted beside report.csv (by another account, or left by a run without the
        # ledger): it goes to a key of its own, and report.csv to its own.
        write_file(self.source, "report.csv", b"the report", mtime=1000)
        planted = ".s3push-0000000000000000-report.csv"
        write_file(self.source, planted, b"other bytes", mtime=2000)
        result = self.run_s3push("--min-age", "0")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn("a key of its own", result.stderr)
        self.assert_landed({"report.csv": b"the report", planted: b"other bytes"})
        self.assertEqual(files_under(self.source), [])

    def test_an_aside_name_whose_name_is_free_is_given_back_then_moved(self):
        # Left by a run that kept no ledger (another state folder): given back, moved by
        # the next run under its name.
        write_file(self.source, "sub/app.log", b"old")
        done = self.seamed_run("check", "kill")
        self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
        other_home = os.path.join(self.tmp, "other-home")
        os.makedirs(other_home)
        result = self.run_s3push("--min-age", "0", env=self.env(HOME=other_home))
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [b"sub/app.log"])
        result = self.run_s3push("--min-age", "0", env=self.env(HOME=other_home))
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed({"sub/app.log": b"old"})

    @unittest.skipIf(os.geteuid() != 0, "needs root, to make another account's folder")
    def test_another_account_s_folder_under_an_aside_name_is_not_given_back(self):
        # In a shared sticky folder, nobody's folder named as an aside name of the empty
        # inbox/ would replace it if given back (a rename replaces an empty folder).
        drop = os.path.join(self.source, "drop")
        os.makedirs(os.path.join(drop, "inbox"))
        os.chmod(drop, 0o1777)
        planted = os.path.join(drop, ".s3push-0000000000000000-inbox")
        os.mkdir(planted)
        os.chown(planted, 65534, 65534)
        inbox = os.stat(os.path.join(drop, "inbox"))
        result = self.run_s3push("--min-age", "0")
        self.assertEqual(result.status, 0, result.stderr)
        after = os.stat(os.path.join(drop, "inbox"))
        self.assertEqual((after.st_ino, after.st_uid), (inbox.st_ino, inbox.st_uid))
        self.assertTrue(os.path.isdir(planted))

    def test_a_dry_run_renames_nothing(self):
        write_file(self.source, "app.log", b"data")
        self.assertEqual(self.seamed_run("check", "kill").returncode, -signal.SIGKILL)
        before = private_names(self.source)
        result = self.run_s3push("--dry-run", "--min-age", "0")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertIn("app.log", result.stdout)
        self.assertEqual(private_names(self.source), before)
        self.assertEqual(len(before), 1)

    def test_an_earlier_versions_private_folder_is_moved_from_and_removed(self):
        folder = os.path.join(self.source, "sub", ".s3push-handover-0123abcd-89abcdef")
        os.makedirs(folder, mode=0o700)
        write_file(self.source, "sub/.s3push-handover-0123abcd-89abcdef/app.log", b"old")
        result = self.run_s3push("--min-age", "0")
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"sub/app.log": b"old"})
        self.assertEqual(files_under(self.source), [])
        result = self.run_s3push("--min-age", "0")
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(private_names(self.source), [])


class Archived(WithArchive, FaultCase):
    """The same last steps under --archive-dir: what is archived is the version read,
    once, whatever a writer or a kill does at any step."""

    seamed_run = Handover.seamed_run
    puts = Handover.puts

    def test_a_new_version_renamed_over_the_name_at_each_step(self):
        base = self.prefix.rstrip("/")
        for step in ARCHIVE_STEPS:
            with self.subTest(step=step):
                self.prefix = "%s-%s/" % (base, step)
                self.empty_archive()
                old, new = b"old %d" % random.randrange(10 ** 9), b"new version"
                write_file(self.source, "sub/app.log", old)
                tmp = write_file(self.source, "sub/app.log.tmp", new)
                done = self.seamed_run(step, "rename", os.fsdecode(tmp), "--archive-dir",
                                       self.archive)
                self.assertEqual(done.returncode, 0, done.stderr)
                # The new version stays local; the archive holds the one read, or nothing
                # where the writer's rename replaced it before it was set aside.
                self.assertEqual(files_under(self.source), [b"sub/app.log"])
                with open(os.path.join(self.source, "sub", "app.log"), "rb") as handle:
                    self.assertEqual(handle.read(), new, step)
                kept = {} if step in ("confirmed", "written", "recorded", "rename") else \
                    {"sub/app.log": old}
                self.assertEqual(self.archived(), kept, step)
                self.assert_landed({"sub/app.log": old})
                self.assertEqual(private_names(self.source), [])
                result = self.run_s3push("--min-age", "0", "--archive-dir", self.archive)
                self.assertEqual(result.status, 0, result.stderr)
                self.assert_landed({"sub/app.log": new})
                self.assertEqual(files_under(self.source), [])
                self.assertIn(new, self.archived().values())

    def test_killed_at_each_step_then_run_again(self):
        base = self.prefix.rstrip("/")
        for step in ARCHIVE_STEPS:
            with self.subTest(step=step):
                self.prefix = "%s-%s/" % (base, step)
                self.empty_archive()
                data = b"data %d" % random.randrange(10 ** 9)
                write_file(self.source, "sub/app.log", data)
                done = self.seamed_run(step, "kill", None, "--archive-dir", self.archive)
                self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
                self.assertEqual(self.server.object_bytes(self.prefix + "sub/app.log"), data)
                sent = len(self.puts())
                result = self.run_s3push("--min-age", "0", "--archive-dir", self.archive)
                self.assertEqual(result.status, 0, result.stderr)
                self.assertEqual(files_under(self.source), [], step)
                self.assertEqual(private_names(self.source), [], step)
                self.assertEqual(self.archived(), {"sub/app.log": data}, step)
                self.assertEqual(os.stat(os.path.join(self.archive, "sub/app.log")).st_nlink,
                                 1, step)
                if step != "confirmed":   # the ledger vouches: archived, not sent again
                    self.assertEqual(len(self.puts()), sent, step)

    def test_killed_after_the_link_then_its_name_in_the_archive_expired(self):
        # app.log taken, so it was linked as app.1.log; then the expiry took app.log: the
        # next run finds its own app.1.log rather than linking it again as app.log.
        write_file(self.archive, "sub/app.log", b"last week")
        write_file(self.source, "sub/app.log", b"today")
        done = self.seamed_run("archived", "kill", None, "--archive-dir", self.archive)
        self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
        os.unlink(os.path.join(self.archive, "sub/app.log"))   # find -ctime +7 -delete
        result = self.run_s3push("--min-age", "0", "--archive-dir", self.archive)
        self.assertEqual(result.status, 0, result.stderr)
        self.assertEqual(self.archived(), {"sub/app.1.log": b"today"})
        self.assertEqual(os.stat(os.path.join(self.archive, "sub/app.1.log")).st_nlink, 1)
        self.assertEqual(files_under(self.source), [])

    def test_killed_after_the_link_where_hard_links_are_not_protected(self):
        # As on macOS and the BSDs: the aside name's other link is its own copy in DIR.
        # The runs after the kill read fs.protected_hardlinks off from a file of the test's
        # (the check_links seam), never from the kernel's setting, which other tests share.
        write_file(self.source, "sub/app.log", b"today")
        done = self.seamed_run("archived", "kill", None, "--archive-dir", self.archive)
        self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
        sent = len(self.puts())
        unprotected = write_file(self.tmp, "protected_hardlinks", b"0\n")
        launcher = ("import sys; sys.path[:0] = [%r]; import s3push; "
                    "s3push.check_links.__defaults__ = (%r,); sys.argv[0] = s3push.__file__; "
                    "sys.exit(s3push.main())" % (os.path.dirname(s3server.S3PUSH),
                                                 os.fsdecode(unprotected)))

        def run():
            argv = self.command("--min-age", "0", "--archive-dir", self.archive)
            argv[1:3] = ["-c", launcher]
            return subprocess.run(argv, env=self.env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
        result = run()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(files_under(self.source), [])
        self.assertEqual(self.archived(), {"sub/app.log": b"today"})
        self.assertEqual(os.stat(os.path.join(self.archive, "sub/app.log")).st_nlink, 1)
        self.assertEqual(len(self.puts()), sent)
        # Any other file of two links is still refused.
        write_file(self.source, "two.log", b"two")
        os.link(os.path.join(self.source, "two.log"), os.path.join(self.tmp, "elsewhere"))
        result = run()
        self.assertEqual(result.returncode, 65, result.stderr)
        self.assertIn(b"has 2 hard links", result.stderr)

    def test_a_name_too_long_to_set_aside_replaced_as_it_is_archived(self):
        # Unlinked by its name: a new version renamed over it as DIR's folder is opened is
        # not archived in its stead (nor removed unsent).
        name = "L" * 240 + ".log"
        write_file(self.source, "sub/" + name, b"old")
        tmp = write_file(self.source, "sub/new.tmp", b"new version")
        done = self.seamed_run("archive", "rename", os.fsdecode(tmp), "--archive-dir",
                               self.archive)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.archived(), {})
        with open(os.path.join(self.source, "sub", name), "rb") as handle:
            self.assertEqual(handle.read(), b"new version")
        self.assert_landed({"sub/" + name: b"old"})
        result = self.run_s3push("--min-age", "0", "--archive-dir", self.archive)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed({"sub/" + name: b"new version"})
        self.assertEqual(self.archived(), {"sub/" + name: b"new version"})
        self.assertEqual(files_under(self.source), [])


if __name__ == "__main__":
    unittest.main()

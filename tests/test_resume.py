"""A multipart upload cut off part-way resumes on the next run, from the journal the
script keeps outside SOURCE_DIR, with PutObject-only requests (no ListParts).

The runs are real processes killed with SIGKILL by the test proxy the moment a chosen
part arrives; the proxy records which parts each run sent. After every run: nothing
lost, and no part the server had confirmed to an earlier run is sent again, beyond the
parts that were in flight when the kill came.
"""

import glob
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import filesystems  # noqa: E402
import s3server  # noqa: E402
from helpers import (RUN_TIMEOUT, files_under, skip_unless_server_checks,  # noqa: E402
                     soak, write_file)
from test_faults import MIB, FaultCase  # noqa: E402

PART = 5 * MIB

# Runs the command from argv[2] on under the host name argv[1] (in a UTS namespace of its
# own: unshare --uts).
RENAMED = ("import os, socket, sys; socket.sethostname(sys.argv[1]); "
           "os.execv(sys.argv[2], sys.argv[2:])")
MULTIPART = ("--multipart-threshold", "5MiB", "--part-size", "5MiB")


def part_number(target):
    for field in target.partition("?")[2].split("&"):
        name, _, value = field.partition("=")
        if name == "partNumber":
            return int(value)
    return None


class KillProxy(s3server.FaultProxy):
    """Kills the run (SIGKILL) when the kill_at-th part PUT of this proxy arrives, and
    drops that request; `parts` lists the part numbers sent, `answered` those whose
    answer was passed on, `answers` an extra rule."""

    def __init__(self, upstream, kill_at=None, answers=None):
        self.kill_at, self.answers, self.process = kill_at, answers, None
        self.parts, self.answered = [], []
        s3server.FaultProxy.__init__(self, upstream, self.watch)

    def act(self, client, request, action, upstream):
        going_on = s3server.FaultProxy.act(self, client, request, action, upstream)
        number = part_number(request.target) if request.method == "PUT" else None
        if number is not None and action is None:
            with self.lock:
                self.answered.append(number)
        return going_on

    def watch(self, request):
        number = part_number(request.target) if request.method == "PUT" else None
        if number is not None:
            self.parts.append(number)
            if len(self.parts) == self.kill_at:
                self.process.send_signal(signal.SIGKILL)
                return ("reset-before",)
        return self.answers(request) if self.answers else None


class Resume(FaultCase):
    def run_through(self, *args, kill_at=None, answers=None):
        """One run through a KillProxy; (proxy, status, stdout, stderr)."""
        proxy = KillProxy(self.server.endpoint, kill_at, answers)
        self.addCleanup(proxy.close)
        self.proxies.append(proxy)
        proxy.process = subprocess.Popen(
            self.command(*(MULTIPART + args), endpoint=proxy.endpoint), env=self.env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.addCleanup(proxy.process.kill)
        out, err = proxy.process.communicate(timeout=RUN_TIMEOUT)
        return proxy, proxy.process.returncode, out.decode(), err.decode()

    def killed_run(self, kill_at, *args):
        proxy, status, _, err = self.run_through(*args, kill_at=kill_at)
        self.assertEqual(status, -signal.SIGKILL, err)
        self.assertEqual(files_under(self.source), [b"big.bin"])
        return proxy

    def killed_with_a_journal(self, data):
        """big.bin holding data, its run killed at part 3: (its journal, the journal's
        bytes)."""
        write_file(self.source, "big.bin", data)
        self.killed_run(3, "--jobs", "1")
        [journal] = self.journals()
        with open(journal, "rb") as handle:
            return journal, handle.read()

    def journals(self):
        return glob.glob(os.path.join(self.home, ".local", "state", "s3push", "*", "*.journal"))

    def journaled_parts(self):
        """The part numbers the journal holds (its last line only if whole)."""
        [path] = self.journals()
        with open(path, "rb") as handle:
            lines = handle.read().split(b"\n")[1:-1]
        return {json.loads(line.decode())["part"] for line in lines}

    def test_kill_9_at_seeded_points_resends_only_parts_in_flight(self):
        rng = random.Random(14)
        data = os.urandom(16 * PART + 12345)   # 17 parts
        write_file(self.source, "big.bin", data)
        journaled, sent, resent, kills = set(), set(), 0, 0
        while True:
            jobs = rng.choice((1, 2, 3))
            kill_at = rng.randrange(1, 5) if kills < soak(5, 2) else None
            proxy, status, out, err = self.run_through("--jobs", str(jobs), "-v",
                                                       kill_at=kill_at)
            # No part the journal held is sent again (the file is unchanged) ...
            self.assertEqual(journaled.intersection(proxy.parts), set(), err)
            resent += len(sent.intersection(proxy.parts))
            sent.update(proxy.parts)
            if kill_at is None:
                break
            kills += 1
            self.assertEqual(status, -signal.SIGKILL, err)
            self.assertEqual(files_under(self.source), [b"big.bin"])   # nothing lost
            # ... and it holds every part answered, but those in flight at the kill.
            journaled = self.journaled_parts()
            self.assertLessEqual(len(set(proxy.answered) - journaled), jobs,
                                 (proxy.answered, journaled))
        self.assertEqual(status, 0, err)
        self.assertIn("resuming", out)
        self.assertEqual(files_under(self.source), [])
        self.assert_landed({"big.bin": data})
        self.assertEqual(self.journals(), [])
        self.assertLess(len(proxy.parts), 17, "the last run sent every part again")
        sys.stderr.write("[resume: %d kills, %d parts sent again] " % (kills, resent))

    def test_the_last_run_sends_only_the_missing_parts(self):
        data = os.urandom(7 * PART + 100)   # 8 parts
        write_file(self.source, "big.bin", data)
        first = self.killed_run(6, "--jobs", "1")   # parts 1-5 confirmed, 6 dropped
        self.assertEqual(first.parts, [1, 2, 3, 4, 5, 6])
        proxy, status, out, err = self.run_through("--jobs", "1", "-v", "--summary-json",
                                                   os.path.join(self.tmp, "summary.json"))
        self.assertEqual(status, 0, err)
        self.assertEqual(proxy.parts, [6, 7, 8])
        self.assertFalse(any("uploads" in target for _, target in proxy.requests))
        self.assertIn("resuming %s: 5 of 8 parts already there"
                      % os.path.join(self.source, "big.bin"), out)
        with open(os.path.join(self.tmp, "summary.json")) as handle:
            self.assertEqual(json.load(handle)["bytes_resumed"], 5 * PART)
        self.assert_landed({"big.bin": data})

    def test_a_state_folder_that_hosts_share_is_said(self):
        """Runs of another host name (a home over NFS, a container made anew) on the same
        SOURCE_DIR path and destination: a warning at each change of host."""
        filesystems.need_root(self, "another host name (unshare)")
        said = []
        for number, host in enumerate((None, "s3push-other-host", None, None)):
            write_file(self.source, "f%d" % number, b"x")   # a run with something to do
            renamed = [] if host is None else ["unshare", "--uts", sys.executable, "-c",
                                               RENAMED, host]
            done = subprocess.run(renamed + self.command(), env=self.env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)
            self.assertEqual(done.returncode, 0, done.stderr)
            said.append(done.stderr.decode())
        self.assertEqual(["was kept last by host" in err for err in said],
                         [False, True, True, False])
        self.assertIn("by host %s, not s3push-other-host: hosts that share a state folder"
                      % socket.gethostname(), said[1])
        self.assertEqual(files_under(self.source), [])

    def test_a_compressed_upload_resumes_from_the_same_gzip(self):
        # The gzip is made again by the next run, byte for byte (no name, mtime 0), so
        # the parts an earlier run sent of it are not sent again.
        import gzip
        data = os.urandom(3 * PART).hex().encode()   # gzips to about 17 MiB: 4 parts
        write_file(self.source, "big.txt", data)
        proxy, status, _, err = self.run_through("--jobs", "1", "--compress", "gzip",
                                                 kill_at=3)
        self.assertEqual(status, -signal.SIGKILL, err)
        self.assertEqual(proxy.parts, [1, 2, 3])
        self.assertEqual(files_under(self.source), [b"big.txt"])
        proxy, status, out, err = self.run_through("--jobs", "1", "--compress", "gzip", "-v")
        self.assertEqual(status, 0, err)
        stored = self.server.object_bytes(self.prefix + "big.txt.gz")
        parts = -(-len(stored) // PART)
        self.assertEqual(proxy.parts, list(range(3, parts + 1)))
        self.assertIn("2 of %d parts already there" % parts, out)
        self.assertEqual(gzip.decompress(stored), data)
        self.assertEqual(files_under(self.source), [])

    def rewrite(self, path, offset, data, mtime=None):
        info = os.stat(path)
        with open(path, "r+b") as handle:
            handle.seek(offset)
            handle.write(data)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns if mtime is None else mtime))

    def test_a_file_rewritten_in_place_with_its_mtime_kept_is_never_mixed(self):
        data = bytearray(os.urandom(5 * PART + 7))
        path = write_file(self.source, "big.bin", bytes(data))
        self.killed_run(5, "--jobs", "1")   # parts 1-4 confirmed
        data[PART + 10:PART + 20] = b"0123456789"   # in part 2, same size, same mtime
        self.rewrite(path, PART + 10, b"0123456789")
        proxy, status, _, err = self.run_through("--jobs", "1")
        self.assertEqual(status, 0, err)
        # Part 1 reused, from 2 on sent again; or, where the server will not replace a
        # part (rclone's: 501 NotImplemented), started afresh.
        self.assertIn(proxy.parts, ([2, 3, 4, 5, 6], [2, 1, 2, 3, 4, 5, 6]))
        self.assert_landed({"big.bin": bytes(data)})

    def test_a_file_that_grew_or_shrank_starts_over(self):
        for size in (5 * PART + 9, 4 * PART - 9):
            data = os.urandom(5 * PART)
            path = write_file(self.source, "big.bin", data)
            self.killed_run(4, "--jobs", "1")
            data = os.urandom(size)
            write_file(self.source, "big.bin", data)
            proxy, status, _, err = self.run_through("--jobs", "1")
            self.assertEqual(status, 0, err)
            self.assertEqual(proxy.parts, list(range(1, -(-size // PART) + 1)))
            self.assertEqual(sum("uploads" in t for _, t in proxy.requests), 1)
            self.assert_landed({"big.bin": data})
            self.assertFalse(os.path.exists(path))

    @skip_unless_server_checks("no-such-upload")
    def test_an_upload_gone_on_the_server_starts_over(self):
        data = os.urandom(3 * PART + 1)
        write_file(self.source, "big.bin", data)
        first = self.killed_run(3, "--jobs", "1")
        old_id = [t for m, t in first.requests if "uploadId=" in t][0].rpartition("=")[2]
        # As a lifecycle rule would: the upload is aborted on the server meanwhile.
        self.server.abort_upload(self.prefix + "big.bin", urllib.parse.unquote(old_id))
        summary = os.path.join(self.tmp, "summary.json")
        proxy, status, _, err = self.run_through("--jobs", "1", "--summary-json", summary)
        self.assertEqual(status, 0, err)
        self.assertEqual(proxy.parts, [3, 1, 2, 3, 4])   # the resumed part refused, then all
        self.assertEqual(sum("?uploads" in t for _, t in proxy.requests), 1)
        self.assert_landed({"big.bin": data})
        self.assertEqual(self.journals(), [])
        with open(summary) as handle:   # the reused parts were sent again after all
            self.assertEqual(json.load(handle)["bytes_resumed"], 0)

    def test_an_upload_whose_parts_the_server_fails_starts_over(self):
        # As rclone's server does to an upload whose stream broke: every part fails, 500.
        def failing(status, code, doomed):
            """Answer status to every part of the uploads in doomed (the first one this
            run starts if it is empty)."""
            def rule(request):
                if request.method != "PUT" or part_number(request.target) is None:
                    return None
                upload = request.target.rpartition("uploadId=")[2]
                doomed.add(upload) if not doomed else None
                return ("answer", status, code) if upload in doomed else None
            return rule

        def starts(proxy):
            return sum("?uploads" in t for _, t in proxy.requests)

        data = os.urandom(2 * PART + 1)
        write_file(self.source, "big.bin", data)
        busy = set()   # a busy server (503) is waited for, the upload kept for the next run
        proxy, status, _, err = self.run_through("--jobs", "1", "--retries", "1",
                                                 answers=failing(503, "SlowDown", busy))
        self.assertEqual(status, 75, err)
        self.assertIn("part 1: SlowDown", err)
        self.assertEqual((starts(proxy), proxy.parts), (1, [1, 1]))
        self.assertEqual(files_under(self.source), [b"big.bin"])
        self.assertEqual(len(self.journals()), 1)
        # Resumed, its parts failed (500): started afresh at once, and the journal's upload
        # is never resumed again.
        proxy, status, out, err = self.run_through("--jobs", "1", "--retries", "1", "-v",
                                                   answers=failing(500, "InternalError", busy))
        self.assertEqual(status, 0, err)
        self.assertIn("big.bin: its multipart upload starts afresh (part 1: InternalError", out)
        self.assertEqual((starts(proxy), proxy.parts), (1, [1, 1, 1, 2, 3]))
        self.assert_landed({"big.bin": data})
        self.assertEqual(self.journals(), [])
        # Started by this run, the same.
        data = os.urandom(2 * PART + 1)
        write_file(self.source, "big.bin", data)
        proxy, status, _, err = self.run_through("--jobs", "2", "--retries", "1",
                                                 answers=failing(500, "InternalError", set()))
        self.assertEqual(status, 0, err)
        self.assertEqual(starts(proxy), 2)
        self.assertEqual(proxy.parts.count(1), 3, proxy.parts)
        self.assert_landed({"big.bin": data})
        self.assertEqual((files_under(self.source), self.journals()), ([], []))
        # A server failing every part of every upload for a while: the fresh upload has no
        # part, the journal stays the resumed upload's, and the next run resumes it.
        data = os.urandom(2 * PART + 1)
        journal, before = self.killed_with_a_journal(data)
        proxy, status, _, err = self.run_through("--jobs", "1", "--retries", "0",
                                                 answers=lambda request: (
                                                     "answer", 500, "InternalError")
                                                 if part_number(request.target) else None)
        self.assertEqual(status, 75, err)
        self.assertIn("part 1: InternalError", err)
        self.assertEqual((starts(proxy), proxy.parts), (1, [3, 1]))
        with open(journal, "rb") as handle:
            self.assertEqual(handle.read(), before)
        proxy, status, _, err = self.run_through("--jobs", "1")
        self.assertEqual(status, 0, err)
        self.assertEqual((starts(proxy), proxy.parts), (0, [3]))
        self.assert_landed({"big.bin": data})
        self.assertEqual((files_under(self.source), self.journals()), ([], []))
        # Failed once the --deadline passed: not started afresh.
        write_file(self.source, "big.bin", data)

        def late(request):
            if part_number(request.target) is None:
                return None
            time.sleep(1.5)
            return ("answer", 500, "InternalError")
        proxy, status, _, err = self.run_through("--jobs", "3", "--deadline", "1",
                                                 answers=late)   # all three parts in flight
        self.assertEqual(status, 75, err)
        self.assertEqual((starts(proxy), sorted(proxy.parts)), (1, [1, 2, 3]))
        self.assertEqual(files_under(self.source), [b"big.bin"])

    def test_unusable_journals_start_over_and_say_so(self):
        damages = {"corrupt": lambda text: text[:40] + b"\x00garbage\n" + text[40:],
                   "truncated": lambda text: text[:len(text) // 2] + b"\n",
                   "another version": lambda text: text.replace(b'"s3push_journal": 1',
                                                                b'"s3push_journal": 99')}
        for what, damage in sorted(damages.items()):
            data = os.urandom(3 * PART + 1)
            journal, text = self.killed_with_a_journal(data)
            with open(journal, "wb") as handle:
                handle.write(damage(text))
            proxy, status, _, err = self.run_through("--jobs", "1", "-v")
            self.assertEqual(status, 0, (what, err))
            self.assertEqual(proxy.parts, [1, 2, 3, 4], what)
            self.assertIn("resume journal", err, what)
            self.assertIn("is unusable", err, what)
            self.assert_landed({"big.bin": data})

    def test_an_unwritable_state_folder_works_as_before(self):
        blocker = os.path.join(self.tmp, "not-a-folder")
        write_file(self.tmp, "not-a-folder", b"")
        data = os.urandom(3 * PART + 1)
        write_file(self.source, "big.bin", data)
        proxy, status, _, err = self.run_through("--jobs", "2", "-v", "--state-dir", blocker)
        self.assertEqual(status, 0, err)
        self.assertEqual(err.count("no resume journals are kept (%s" % blocker), 1, err)
        self.assertEqual(err.count("cannot keep the ledger"), 1, err)
        self.assert_landed({"big.bin": data})

    def test_a_state_folder_the_scan_would_reach_is_a_usage_error(self):
        # Named by XDG_STATE_HOME as by --state-dir: its ledger and journals would be moved.
        write_file(self.source, "f", b"data")
        result = self.run_s3push(env=self.env(XDG_STATE_HOME=os.path.join(self.source, "st")))
        self.assertEqual(result.status, 2, result.stderr)
        self.assertIn("XDG_STATE_HOME", result.stderr)
        self.assertEqual(files_under(self.source), [b"f"])

    def test_journals_of_files_gone_or_too_old_and_torn_writes_are_removed(self):
        aside = os.path.join(self.tmp, "aside")
        os.makedirs(aside)
        journals = {}
        for name in ("gone.bin", "old.bin", "kept.bin"):   # one killed upload each
            write_file(self.source, name, os.urandom(2 * PART + 1))
            before = set(self.journals())
            self.killed_run_of(name)
            [journals[name]] = set(self.journals()) - before
            os.rename(os.path.join(self.source, name), os.path.join(aside, name))
        with open(journals["old.bin"], "rb") as handle:   # an upload of eight days ago
            header, _, rest = handle.read().partition(b"\n")
        header = json.loads(header.decode())
        header["created"] -= 8 * 86400
        with open(journals["old.bin"], "wb") as handle:
            handle.write(json.dumps(header).encode() + b"\n" + rest)
        for name in ("old.bin", "kept.bin"):
            os.rename(os.path.join(aside, name), os.path.join(self.source, name))
        write_file(self.source, "small", b"x")   # a run with something to do
        pair = os.path.dirname(journals["kept.bin"])
        torn = [journals["gone.bin"] + ".4242.tmp", os.path.join(pair, "confirmed.jsonl.17.tmp")]
        for path in torn:   # what runs killed in write_atomically left
            write_file(pair, os.path.basename(path), b"{")
        write_file(pair, "notes.tmp", b"not ours")
        write_file(pair, "confirmed.jsonl.18.tmp", b"{", mtime=time.time())   # under way
        proxy, status, _, err = self.run_through("--exclude", "*.bin")
        self.assertEqual(status, 0, err)
        self.assertEqual(self.journals(), [journals["kept.bin"]])
        self.assertEqual([os.path.exists(path) for path in torn], [False, False])
        self.assertTrue(os.path.exists(os.path.join(pair, "notes.tmp")))
        self.assertTrue(os.path.exists(os.path.join(pair, "confirmed.jsonl.18.tmp")))

    def killed_run_of(self, name):
        proxy, status, _, err = self.run_through("--jobs", "1", kill_at=2)
        self.assertEqual(status, -signal.SIGKILL, err)
        self.assertEqual(files_under(self.source), [name.encode()])

    def test_resume_days_0_keeps_no_journal(self):
        data = os.urandom(3 * PART + 1)
        write_file(self.source, "big.bin", data)
        self.killed_run(3, "--jobs", "1", "--resume-days", "0")
        self.assertEqual(self.journals(), [])
        proxy, status, _, err = self.run_through("--jobs", "1", "--resume-days", "0")
        self.assertEqual(status, 0, err)
        self.assertEqual(proxy.parts, [1, 2, 3, 4])

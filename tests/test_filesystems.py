"""Moves off filesystems where removing a file is hard (issue 31): an ext4 full to its last
block, a tmpfs out of inodes, a FUSE filesystem that ignores modes (bindfs) and exFAT
through FUSE (tests/filesystems.py makes them; they need root).

On each, one run with --min-age 0 uploads every file and removes it (exit 0, the bytes at
the keys, nothing left in SOURCE_DIR, no aside name): the removal renames the name aside
within its directory, which needs no mkdir, no inode and no mode bits, so no guarantee is
weaker there and nothing is said. Where even that rename cannot be made (a directory whose
blocks are full on a full disk), each file is removed by its name after its last check,
said once for the directory. A second run then changes nothing. The state folder is
elsewhere (HOME), as in practice, or on the full filesystem itself.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import filesystems  # noqa: E402
from helpers import IntegrationCase, files_under, write_file  # noqa: E402

# Five files in two directories: SOURCE_DIR and a subfolder of it.
FILES = {"a.txt": b"alpha\n", "b.bin": bytes(range(256)) * 9, "c": b"",
         "sub/d.txt": b"delta\n" * 300, "sub/e.bin": b"\x00\xff" * 2500}
DIRECTORIES = 2
WARNING = re.compile(r"(s3push: )?warning:")


class HardRemoval(IntegrationCase):
    """What every test here checks; `words`: what a warning may name the filesystem by
    (lower case), besides a path on the mount (SOURCE_DIR's, a folder's in it)."""
    words = ()

    def put_files(self, mount):
        """SOURCE_DIR in a folder of the mount, beside what a fixture adds as filler."""
        self.mount = mount
        self.source = os.path.join(mount, "src")
        os.mkdir(self.source)
        for relative, data in FILES.items():
            write_file(self.source, relative, data)

    def warnings(self, stderr, state_dir=None):
        """The warning lines of stderr, but for those about the state folder."""
        return [line for line in stderr.splitlines() if WARNING.match(line) and
                not (state_dir and state_dir in line)]

    def files_beside(self, state_dir):
        """The files on the mount, but for the state folder's (a run lock that a second run
        can keep there, now that the first made room)."""
        state = os.fsencode(os.path.relpath(state_dir, self.mount) + "/") if state_dir else None
        return [path for path in files_under(self.mount)
                if state is None or not path.startswith(state)]

    def assert_moved(self, *args, **kw):
        """One run moves every file, saying on `warned` (low, high) warning lines, each
        naming the directory or the filesystem, that a weaker guarantee applies; then a
        second run sends nothing and changes nothing."""
        state_dir = kw.get("state_dir")
        low, high = kw.get("warned", (0, 0))
        files = kw.get("files", FILES)
        result = self.run_s3push("--min-age", "0", *args)
        self.assertEqual(result.status, 0, result.stderr)
        self.assert_landed(files)
        self.assertEqual(files_under(self.source), [], result.stderr)
        self.assertEqual([name for _, dirs, files in os.walk(self.source)
                          for name in dirs + files if name.startswith(".s3push-")], [],
                         result.stderr)
        warnings = self.warnings(result.stderr, state_dir)
        self.assertTrue(low <= len(warnings) <= high,
                        "want %d to %d warnings about this filesystem, got:\n%s"
                        % (low, high, result.stderr))
        for line in warnings:
            self.assertTrue(self.mount in line or any(w in line.lower() for w in self.words),
                            "a warning names neither %s nor any of %s: %s"
                            % (self.mount, self.words, line))
        before, sent = self.files_beside(state_dir), len(self.recorder.requests)
        again = self.run_s3push("--min-age", "0", *args)
        self.assertEqual(again.status, 0, again.stderr)
        self.assertEqual(len(self.recorder.requests), sent, "a second run sent requests")
        self.assertEqual(self.files_beside(state_dir), before, "a second run changed files")
        self.assert_landed(files)


class FullExt4(HardRemoval):
    words = ("ext4", "full", "space")

    def test_moved_off_a_full_ext4(self):
        with filesystems.small_ext4(self) as mount:
            self.put_files(mount)
            filesystems.fill_blocks(mount)
            self.assert_moved()

    def test_moved_out_of_a_full_directory_on_a_full_ext4(self):
        # Empty files, their names shorter and shorter, fill the directories' last blocks
        # to the last bytes: an aside name (a name and 25 bytes more) finds no room until
        # a file is gone, and no block can be added.
        with filesystems.small_ext4(self) as mount:
            self.put_files(mount)
            filesystems.fill_blocks(mount)
            files = dict(FILES)
            for directory in ("", "sub/"):
                for length in (200, 100, 50, 20, 8, 4, 1):
                    for n in range(10000):
                        name = "%sx%d-%s%d" % (directory, length, "x" * length, n)
                        try:
                            write_file(self.source, name, b"")
                        except OSError:
                            break
                        files[name] = b""
            self.assert_moved(warned=(1, DIRECTORIES), files=files)
            result = self.run_s3push("--min-age", "0")
            self.assertNotIn("warning", result.stderr)

    def test_moved_off_a_full_ext4_holding_the_state_folder(self):
        with filesystems.small_ext4(self) as mount:
            self.put_files(mount)
            state_dir = os.path.join(mount, "state")
            os.mkdir(state_dir, 0o700)   # an earlier run's, from before the disk filled
            filesystems.fill_blocks(mount)
            self.assert_moved("--state-dir", state_dir, state_dir=state_dir)


class InodeStarvedTmpfs(HardRemoval):
    words = ("tmpfs", "inode", "full", "space")

    def test_moved_off_a_tmpfs_out_of_inodes(self):
        with filesystems.small_tmpfs(self) as mount:
            self.put_files(mount)
            filesystems.fill_inodes(mount)
            self.assert_moved()

    def test_moved_off_a_tmpfs_out_of_inodes_holding_the_state_folder(self):
        with filesystems.small_tmpfs(self) as mount:
            self.put_files(mount)
            state_dir = os.path.join(mount, "state")
            os.mkdir(state_dir, 0o700)
            filesystems.fill_inodes(mount)
            self.assert_moved("--state-dir", state_dir, state_dir=state_dir)


class ModeIgnoringFuse(HardRemoval):
    words = ("fuse", "mode", "permission")

    def test_moved_off_bindfs_that_ignores_modes(self):
        with filesystems.mode_ignoring_bindfs(self) as mount:
            self.put_files(mount)
            self.assert_moved()


class ExfatThroughFuse(HardRemoval):
    words = ("exfat", "fuse", "mode", "permission")

    def test_moved_off_exfat(self):
        with filesystems.exfat_fuse(self) as mount:
            self.put_files(mount)
            self.assert_moved()

    def test_archived_on_exfat_by_a_rename_never_over_a_name(self):
        # No hard links: each file is renamed into DIR once its name there is seen free,
        # said once; a name taken there is never replaced.
        with filesystems.exfat_fuse(self) as mount:
            self.put_files(mount)
            archive = os.path.join(mount, "sent")
            write_file(archive, "sub/d.txt", b"earlier")
            result = self.run_s3push("--min-age", "0", "--archive-dir", archive)
            self.assertEqual(result.status, 0, result.stderr)
            self.assert_landed(FILES)
            self.assertEqual(files_under(self.source), [])
            warnings = self.warnings(result.stderr)
            self.assertEqual(len(warnings), 1, result.stderr)
            self.assertIn("cannot hard-link files into the archive %s" % archive, warnings[0])
            archived = {}
            for relative in files_under(archive):
                with open(os.path.join(os.fsencode(archive), relative), "rb") as handle:
                    archived[os.fsdecode(relative)] = handle.read()
            self.assertEqual(archived, dict(FILES, **{"sub/d.txt": b"earlier",
                                                      "sub/d.1.txt": FILES["sub/d.txt"]}))

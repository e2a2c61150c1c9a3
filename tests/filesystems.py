"""Mounted filesystems on which removing a file is harder than on a roomy ext4 (issue 31):
an ext4 full to its last block, a tmpfs out of inodes, a FUSE filesystem that ignores modes
(bindfs), and exFAT through FUSE (an SD card: no modes, no owners, no hard links).

Each fixture is a context manager: the path of a fresh mount, in a temporary folder of its
own (no other test, nor another interpreter's, ever walks into it), unmounted on the way
out whatever happened, lazily if it stays busy; a FUSE daemon runs as this process's child
and never outlives the fixture. Where the mount cannot be made here (not root, no
/dev/fuse, no loop device, a tool missing where no apt-get can fetch it) the test is
skipped, named. fill_blocks and fill_inodes fill a mount once the test has put its files
in. Each fixture checks that it is what it claims, and raises otherwise.
"""

import contextlib
import errno
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What `make test` unpacks from Debian's packages (bindfs, exfat-fuse, exfatprogs, libfuse2).
FUSEFS = os.path.join(REPO, ".testenv", "fusefs")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin",
                             "/sbin"])
MIB = 1024 * 1024
FILLER = "filler"   # at the top of a mount: keep SOURCE_DIR in a folder beside it
TOOL_TIMEOUT = 60


# === What the host must have ===

def need_root(test, what):
    if os.geteuid() != 0:
        test.skipTest("%s: mounting a filesystem needs root" % what)
    if not os.path.exists("/proc/self/mounts"):   # the foreign-platform run hides /proc
        test.skipTest("%s: no /proc/self/mounts here to see the mount" % what)


def need_loop(test, what):
    if not os.path.exists("/dev/loop-control") or shutil.which("losetup", path=SBIN_PATH) \
            is None:
        test.skipTest("%s: no loop devices here (/dev/loop-control, losetup)" % what)


def need_fuse(test, what):
    if not os.path.exists("/dev/fuse"):
        test.skipTest("%s: no /dev/fuse here" % what)


def system_tool(test, name, what):
    found = shutil.which(name, path=SBIN_PATH)
    if found is None:
        test.skipTest("%s: no %s here" % (what, name))
    return found


def fusefs_tool(test, relative, what):
    """(path, environment) of a tool that `make test` unpacked into .testenv/fusefs (its
    libraries found through LD_LIBRARY_PATH), else of one on PATH. Where there is no apt-get
    (macOS, other distributions) and neither, the test is skipped, named; with apt-get, a
    missing tool is an error, as faketime_library's."""
    unpacked = os.path.join(FUSEFS, relative)
    if os.access(unpacked, os.X_OK):
        libraries = [os.path.join(FUSEFS, d, "x86_64-linux-gnu") for d in ("lib", "usr/lib")]
        libraries += [os.environ["LD_LIBRARY_PATH"]] if os.environ.get("LD_LIBRARY_PATH") \
            else []
        return unpacked, dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(libraries))
    found = shutil.which(os.path.basename(relative), path=SBIN_PATH)
    if found is not None:
        return found, dict(os.environ)
    if shutil.which("apt-get") is None:
        test.skipTest("%s: no %s, and no apt-get to fetch it" % (what, relative))
    raise RuntimeError("%s not found under .testenv/fusefs: run `make test`, which unpacks "
                       "it from Debian's packages" % relative)


# === Mounting and unmounting ===

def run_tool(argv, env=None):
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=TOOL_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError("%s failed (exit %d): %s" % (
            " ".join(argv), done.returncode, done.stderr.decode("utf-8", "replace").strip()))
    return done.stdout.decode("utf-8", "replace")


def is_mounted(path):
    """Whether something is mounted at path, even a FUSE mount whose daemon died (there,
    os.path.ismount's lstat fails, ENOTCONN, and says no)."""
    with open("/proc/self/mounts", "rb") as handle:
        points = [line.split()[1] for line in handle]
    return os.fsencode(os.path.realpath(path)) in points


def unmount(path):
    """umount path, retried while busy; then a lazy one (gone once nothing uses it)."""
    for _ in range(20):
        if not is_mounted(path):
            return
        subprocess.run(["umount", path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=TOOL_TIMEOUT)
        time.sleep(0.1)
    subprocess.run(["umount", "-l", path], stdin=subprocess.DEVNULL, timeout=TOOL_TIMEOUT)


@contextlib.contextmanager
def scratch(what):
    """A temporary folder for one mount (its image, its mount point); removed afterwards,
    unless something is still mounted in it (its files are then left alone)."""
    top = tempfile.mkdtemp(prefix="s3push-fs-%s-" % what)
    mount = os.path.join(top, "mnt")
    os.mkdir(mount)
    try:
        yield top, mount
    finally:
        if not is_mounted(mount):
            shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def loop_device(image):
    device = run_tool(["losetup", "--find", "--show", image]).strip()
    try:
        yield device
    finally:   # busy still (a lazy unmount): the kernel detaches it once free
        subprocess.run(["losetup", "-d", device], stdin=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=TOOL_TIMEOUT)


@contextlib.contextmanager
def mounted(argv, mount):
    run_tool(argv)
    try:
        yield mount
    finally:
        unmount(mount)


@contextlib.contextmanager
def fuse_daemon(argv, mount, env, log):
    """A FUSE daemon in the foreground, as this process's child (its output in the file
    log), until mount is up: yields its Popen. On the way out: resumed (a test may have
    stopped it), unmounted, waited for, killed if it lingers."""
    with open(log, "wb") as output:
        daemon = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                  stderr=output)
    try:
        deadline = time.monotonic() + TOOL_TIMEOUT
        while not is_mounted(mount):
            if daemon.poll() is not None or time.monotonic() > deadline:
                with open(log, "rb") as output:
                    said = output.read()[-2000:].decode("utf-8", "replace").strip()
                raise RuntimeError("%s did not mount %s (exit %s): %s"
                                   % (argv[0], mount, daemon.returncode, said))
            time.sleep(0.05)
        yield daemon
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGCONT)
        unmount(mount)
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


# === The fixtures' checks ===

def check_full(mount, what):
    """Raise unless mkdir fails with ENOSPC in every folder under mount."""
    for directory, _, _ in os.walk(mount):
        probe = os.path.join(directory, "probe-%d" % os.getpid())
        try:
            os.mkdir(probe)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                continue
            raise
        os.rmdir(probe)
        raise RuntimeError("%s: mkdir in %s did not fail with ENOSPC" % (what, directory))


def check_modes_ignored(mount, what):
    """Raise unless a folder made 0700, then chmod'ed 0700, reads back 0755."""
    probe = os.path.join(mount, "probe-%d" % os.getpid())
    os.mkdir(probe, 0o700)
    try:
        made = stat.S_IMODE(os.stat(probe).st_mode)
        os.chmod(probe, 0o700)
        changed = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.rmdir(probe)
    if (made, changed) != (0o755, 0o755):
        raise RuntimeError("%s: a folder made 0700 reads back %04o, %04o once chmod'ed 0700: "
                           "modes are not ignored" % (what, made, changed))


def check_no_hard_links(mount, what):
    probe = os.path.join(mount, "probe-%d" % os.getpid())
    open(probe, "wb").close()
    try:
        os.link(probe, probe + ".link")
    except OSError:
        return
    finally:
        os.unlink(probe)
    os.unlink(probe + ".link")
    raise RuntimeError("%s: a hard link could be made" % what)


# === The fixtures ===

@contextlib.contextmanager
def small_ext4(test, size=8 * MIB):
    """A mounted ext4 of a few MiB on a loop image, made with -m 0 (no blocks kept for
    root, who runs the tests); fill_blocks() fills it once the test's files are in."""
    need_root(test, "full ext4")
    need_loop(test, "full ext4")
    mkfs = system_tool(test, "mkfs.ext4", "full ext4")
    with scratch("ext4") as (top, mount):
        image = os.path.join(top, "ext4.img")
        with open(image, "wb") as handle:
            handle.truncate(size)
        run_tool([mkfs, "-q", "-F", "-m", "0", image])
        with loop_device(image) as device, mounted(["mount", "-t", "ext4", device, mount],
                                                   mount):
            yield mount


def fill_blocks(mount):
    """Fill the filesystem at mount to its last block: FILLER grown until ENOSPC, by
    smaller and smaller writes, down to one byte; then mkdir must fail with ENOSPC."""
    fd = os.open(os.path.join(mount, FILLER), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (MIB, 64 * 1024, 4096, 512, 1):
            block = b"\xa5" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    check_full(mount, "after fill_blocks")


@contextlib.contextmanager
def small_tmpfs(test, inodes=64):
    """A mounted tmpfs with room for 16 MiB but only `inodes` inodes; fill_inodes() takes
    the last of them once the test's files are in."""
    need_root(test, "inode-starved tmpfs")
    with scratch("tmpfs") as (_, mount):
        options = "size=16m,nr_inodes=%d,mode=0755" % inodes
        with mounted(["mount", "-t", "tmpfs", "-o", options, "s3push-test", mount], mount):
            yield mount


def fill_inodes(mount):
    """Take every inode left at mount: empty files in FILLER until ENOSPC; then mkdir must
    fail with ENOSPC."""
    folder = os.path.join(mount, FILLER)
    os.mkdir(folder)
    for number in range(10 ** 6):
        try:
            open(os.path.join(folder, "%d" % number), "wb").close()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            break
    check_full(mount, "after fill_inodes")


@contextlib.contextmanager
def bindfs(test, *options):
    """(mount, its daemon's Popen): bindfs with options over a backing folder."""
    need_root(test, "bindfs")
    need_fuse(test, "bindfs")
    binary, env = fusefs_tool(test, "usr/bin/bindfs", "bindfs")
    with scratch("bindfs") as (top, mount):
        backing = os.path.join(top, "backing")
        os.mkdir(backing)
        argv = [binary, "-f"] + list(options) + [backing, mount]
        with fuse_daemon(argv, mount, env, os.path.join(top, "bindfs.log")) as daemon:
            yield mount, daemon


@contextlib.contextmanager
def mode_ignoring_bindfs(test):
    """bindfs --perms=0755 --chmod-ignore over a backing folder: every file and folder
    reads 0755, whatever it was made or chmod'ed with (as on some NAS and container
    mounts), while the backing folder keeps the real modes."""
    with bindfs(test, "--perms=0755", "--chmod-ignore") as (mount, _):
        check_modes_ignored(mount, "bindfs")
        yield mount


def stoppable_bindfs(test):
    """(mount, its daemon's Popen): plain bindfs. Stopped (SIGSTOP), the daemon makes a
    dead mount: a look at anything in it hangs until it is resumed, as on an NFS mount
    whose server is gone. Resumed on the way out (see fuse_daemon)."""
    return bindfs(test)


@contextlib.contextmanager
def exfat_fuse(test, size=16 * MIB):
    """An exFAT image (mkfs.exfat) on a loop device, mounted through exfat-fuse with
    umask=022, as an SD card is: folders and files read 0755, owned by the mounting
    account, chmod does nothing, and there are no hard links. (exfat-fuse wants a block
    device when run as root; its -d keeps it in the foreground, and logs to a file.)"""
    need_root(test, "exFAT")
    need_fuse(test, "exFAT")
    need_loop(test, "exFAT")
    mkfs, mkfs_env = fusefs_tool(test, "usr/sbin/mkfs.exfat", "exFAT")
    mount_exfat, env = fusefs_tool(test, "sbin/mount.exfat-fuse", "exFAT")
    with scratch("exfat") as (top, mount):
        image = os.path.join(top, "exfat.img")
        with open(image, "wb") as handle:
            handle.truncate(size)
        run_tool([mkfs, image], env=mkfs_env)
        with loop_device(image) as device:
            argv = [mount_exfat, "-d", "-o", "umask=022", device, mount]
            with fuse_daemon(argv, mount, env, os.path.join(top, "exfat.log")):
                check_modes_ignored(mount, "exFAT")
                check_no_hard_links(mount, "exFAT")
                yield mount

"""Unit tests of the pure parts: settings resolution, destinations, keys, selection, checks."""

import argparse
import base64
import contextlib
import errno
import io
import hashlib
import inspect
import os
import re
import select
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
import urllib.parse
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import s3push  # noqa: E402
s3push.load_deferred_modules()   # what a run loads once it has a file to send

PATHS = ("/h/.aws/credentials", "/h/.aws/config")


def options(**kw):
    values = {"profile": None, "region": None, "endpoint_url": None, "ca_bundle": None,
              "expected_bucket_owner": None}
    values.update(kw)
    return argparse.Namespace(**values)


def ini(text):
    return s3push.parse_ini(text, "/h/.aws/credentials")


def descriptors_under(path):
    """How many of this process's descriptors name something under path: other threads
    (a server of an earlier test winding down) open and close theirs meanwhile."""
    count = 0
    for entry in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(os.path.join("/proc/self/fd", entry))
        except OSError:   # closed since the listing
            continue
        count += target.startswith(path.rstrip("/") + "/") or target == path
    return count


class Settings(unittest.TestCase):
    def resolve(self, environ=None, creds="", config="", **kw):
        return s3push.resolve_settings(options(**kw), environ or {}, ini(creds),
                                       s3push.parse_ini(config, PATHS[1]), PATHS)

    def test_environment_first(self):
        settings = self.resolve({"AWS_ACCESS_KEY_ID": "AKENV", "AWS_SECRET_ACCESS_KEY": "s"},
                                "[default]\naws_access_key_id=AKFILE\n"
                                "aws_secret_access_key=f\n")
        self.assertEqual(settings.credentials.access_key, "AKENV")
        self.assertEqual(settings.credentials.source, "environment")

    def test_explicit_profile_passes_over_environment(self):
        settings = self.resolve({"AWS_ACCESS_KEY_ID": "AKENV", "AWS_SECRET_ACCESS_KEY": "s"},
                                "[ops]\naws_access_key_id=AKOPS\naws_secret_access_key=o\n",
                                profile="ops")
        self.assertEqual(settings.credentials.access_key, "AKOPS")

    def test_aws_profile_variable(self):
        settings = self.resolve({"AWS_PROFILE": "ops"},
                                "[ops]\naws_access_key_id=AKOPS\naws_secret_access_key=o\n")
        self.assertEqual(settings.credentials.access_key, "AKOPS")

    def test_credentials_file_before_config_file(self):
        settings = self.resolve({}, "[default]\naws_access_key_id=AKC\naws_secret_access_key=c\n",
                                "[default]\naws_access_key_id=AKCONF\n"
                                "aws_secret_access_key=x\n")
        self.assertEqual(settings.credentials.access_key, "AKC")

    def test_config_file_profile_section_and_token(self):
        settings = self.resolve({}, "", "[profile ops]\naws_access_key_id=AKO\n"
                                "aws_secret_access_key=o\naws_session_token=T\n"
                                "region=eu-west-3\n", profile="ops")
        self.assertEqual((settings.credentials.access_key, settings.credentials.token,
                          settings.region), ("AKO", "T", "eu-west-3"))

    def test_region_precedence(self):
        creds = "[default]\naws_access_key_id=A\naws_secret_access_key=s\n"
        config = "[default]\nregion=from-profile\n"
        env = {"AWS_REGION": "from-aws-region", "AWS_DEFAULT_REGION": "from-default"}
        self.assertEqual(self.resolve(env, creds, config, region="flag").region, "flag")
        self.assertEqual(self.resolve(env, creds, config).region, "from-aws-region")
        del env["AWS_REGION"]
        self.assertEqual(self.resolve(env, creds, config).region, "from-default")
        self.assertEqual(self.resolve({}, creds, config).region, "from-profile")
        self.assertEqual(self.resolve({}, creds, "").region, "us-east-1")

    def test_endpoint_precedence(self):
        creds = "[default]\naws_access_key_id=A\naws_secret_access_key=s\n"
        config = "[default]\nendpoint_url=http://profile\n"
        env = {"AWS_ENDPOINT_URL_S3": "http://s3var", "AWS_ENDPOINT_URL": "http://var"}
        self.assertEqual(self.resolve(env, creds, config, endpoint_url="http://flag")
                         .endpoint_url, "http://flag")
        self.assertEqual(self.resolve(env, creds, config).endpoint_url, "http://s3var")
        del env["AWS_ENDPOINT_URL_S3"]
        self.assertEqual(self.resolve(env, creds, config).endpoint_url, "http://var")
        self.assertEqual(self.resolve({}, creds, config).endpoint_url, "http://profile")
        self.assertIsNone(self.resolve({}, creds, "").endpoint_url)

    def test_secret_with_symbols_is_kept_verbatim(self):
        settings = self.resolve({}, "[default]\naws_access_key_id=A\n"
                                "aws_secret_access_key = a%b+c/d=e%%\n")
        self.assertEqual(settings.credentials.secret_key, "a%b+c/d=e%%")

    def test_crlf_and_bom(self):
        text = "\ufeff[default]\r\naws_access_key_id = A\r\naws_secret_access_key = s\r\n"
        settings = self.resolve({}, text.replace("\r\n", "\n"))
        self.assertEqual(settings.credentials.secret_key, "s")
        with tempfile.NamedTemporaryFile("wb", delete=False) as handle:
            handle.write(text.encode("utf-8"))
        self.addCleanup(os.unlink, handle.name)
        parsed = s3push.read_ini_file(handle.name)
        self.assertEqual(parsed["default"]["aws_secret_access_key"], "s")

    def test_unknown_profile(self):
        with self.assertRaisesRegex(s3push.ConfigError, "profile 'nope' not found in "
                                    "/h/.aws/credentials or /h/.aws/config"):
            self.resolve({"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "s"},
                         profile="nope")

    def test_missing_key_is_named(self):
        with self.assertRaisesRegex(s3push.ConfigError, "profile 'default' has no "
                                    "aws_secret_access_key"):
            self.resolve({}, "[default]\naws_access_key_id=A\n")

    def test_half_set_environment(self):
        with self.assertRaisesRegex(s3push.ConfigError, "AWS_SECRET_ACCESS_KEY is not set"):
            self.resolve({"AWS_ACCESS_KEY_ID": "A"})

    def test_no_credentials(self):
        with self.assertRaisesRegex(s3push.ConfigError, "no credentials for profile 'default'"):
            self.resolve({})

    def test_malformed_ini_never_echoes_the_line(self):
        for text in ("aws_secret_access_key = CANARY\n", "[default]\nCANARY-no-equals\n"):
            with self.assertRaises(s3push.ConfigError) as caught:
                ini(text)
            self.assertNotIn("CANARY", str(caught.exception))
            self.assertIn("/h/.aws/credentials line", str(caught.exception))

    def role_source(self, config, environ=None):
        section = s3push.parse_ini(config, PATHS[1])["profile ops"]
        return s3push.role_source_credentials(section, "ops", environ or {},
                                              (ini(""), s3push.parse_ini(config, PATHS[1])),
                                              PATHS, s3push.Network({}, None))

    def test_role_credential_source(self):
        role = "[profile ops]\nrole_arn = arn:aws:iam::1:role/r\n"
        found = self.role_source(role + "credential_source = Environment\n",
                                 {"AWS_ACCESS_KEY_ID": "AKENV", "AWS_SECRET_ACCESS_KEY": "s"})
        self.assertEqual((found.access_key, found.source), ("AKENV", "environment"))
        found = self.role_source(role + "source_profile = base\n[profile base]\n"
                                 "aws_access_key_id = AKBASE\naws_secret_access_key = b\n",
                                 {"AWS_ACCESS_KEY_ID": "AKENV", "AWS_SECRET_ACCESS_KEY": "s"})
        self.assertEqual(found.access_key, "AKBASE")
        for extra, message in (
                ("credential_source = Environment\n", "credential_source = Environment found "
                 "no credentials"),
                ("credential_source = Ec2InstanceMetadata\n", "credential_source = "
                 "Ec2InstanceMetadata found no credentials"),   # metadata disabled below
                ("credential_source = Bogus\n", "credential_source = Bogus is not one of "
                 "Ec2InstanceMetadata, EcsContainer, Environment"),
                ("credential_source = Environment\nsource_profile = base\n", "profile 'ops' "
                 "has both source_profile and credential_source"),
                ("", "profile 'ops' has role_arn but neither source_profile nor "
                 "credential_source")):
            with self.assertRaisesRegex(s3push.ConfigError, message):
                self.role_source(role + extra, {"AWS_EC2_METADATA_DISABLED": "true"})

    def test_credentials_repr_hides_secret_and_token(self):
        creds = s3push.Credentials("AKID", "CANARY-SECRET", "CANARY-TOKEN", "env")
        self.assertNotIn("CANARY", repr(creds) + str(creds))
        self.assertIn("AKID", repr(creds))


class Addressing(unittest.TestCase):
    def test_endpoint_urls(self):
        endpoint = s3push.parse_endpoint_url("http://127.0.0.1:9000")
        self.assertEqual((endpoint.scheme, endpoint.host, endpoint.port, endpoint.base_path),
                         ("http", "127.0.0.1", 9000, ""))
        self.assertEqual(s3push.parse_endpoint_url("https://h/base/").base_path, "/base")
        self.assertEqual(s3push.parse_endpoint_url("https://h").port, 443)
        for bad in ("ftp://h", "h:9000", "http://", "http://h:99999", "http://h/?x=1",
                    "http://user:pw@h"):
            with self.assertRaises(s3push.ConfigError, msg=bad):
                s3push.parse_endpoint_url(bad)

    def test_object_address(self):
        custom = s3push.parse_endpoint_url("http://127.0.0.1:9000")
        self.assertEqual(s3push.object_address(custom, "b", "k/x"),
                         ("127.0.0.1:9000", "/b/k/x"))
        aws = s3push.aws_endpoint("eu-west-1", "bucket")
        self.assertEqual(s3push.object_address(aws, "bucket", "k"),
                         ("bucket.s3.eu-west-1.amazonaws.com", "/k"))
        dotted = s3push.aws_endpoint("eu-west-1", "my.bucket")
        self.assertEqual(s3push.object_address(dotted, "my.bucket", "k"),
                         ("s3.eu-west-1.amazonaws.com", "/my.bucket/k"))
        self.assertEqual(s3push.aws_endpoint("cn-north-1", "b").host,
                         "s3.cn-north-1.amazonaws.com.cn")


class Destinations(unittest.TestCase):
    def test_forms(self):
        for url, bucket, prefix in (("s3://b-1", "b-1", ""), ("s3://b.x/", "b.x", ""),
                                    ("s3://bkt/p", "bkt", "p/"), ("S3://bkt/p/q/", "bkt", "p/q/"),
                                    ("s3://bkt/a b#?", "bkt", "a b#?/")):
            destination = s3push.parse_destination(url)
            self.assertEqual((destination.bucket, destination.prefix), (bucket, prefix), url)

    def test_errors_name_the_culprit(self):
        for url in ("bucket/p", "s3://", "s3:///p", "s3://ab", "s3://Upper", "s3://a..b",
                    "s3://-bad", "s3://bad-", "s3://sp ace",
                    os.fsdecode(b"s3://bkt/p\xe9/"), os.fsdecode(b"s3://bkt/p\xe9/{name}")):
            with self.assertRaises(s3push.UsageError, msg=url) as caught:
                s3push.parse_destination(url)
            self.assertIn(repr(url), str(caught.exception))


class Durations(unittest.TestCase):
    def test_seconds_and_units(self):
        for text, seconds in (("0", 0), ("90", 90), ("90s", 90), ("10m", 600), ("1h", 3600),
                              ("2d", 172800), ("1h30m", 5400), ("90m", 5400),
                              ("2d3h4m5s", 183845), ("0s", 0)):
            self.assertEqual(s3push.duration_argument(text), seconds, text)
        self.assertEqual(s3push.positive_duration("1s"), 1)

    def test_what_is_refused_names_the_accepted_forms(self):
        for text in ("", "10x", "10M", "1.5h", "-5", "1h30", "30m1h", "1h1h", "m", "5\n",
                     "\u0665"):
            with self.assertRaises(argparse.ArgumentTypeError, msg=repr(text)) as caught:
                s3push.duration_argument(text)
            self.assertIn("90s, 10m, 1h30m, 2d", str(caught.exception))
        with self.assertRaises(argparse.ArgumentTypeError):
            s3push.positive_duration("0m")


class CommandLineParser(unittest.TestCase):
    def test_flags_given_together_are_split_before_the_parser_sees_them(self):
        split = s3push.split_short_flags
        self.assertEqual(split(["-vv", "-vh", "--x=-vv", "-vx", "a"]),
                         ["-v", "-v", "-v", "-h", "--x=-vv", "-vx", "a"])
        self.assertEqual(split(["-v", "--", "-vv", "s3://b"]), ["-v", "--", "-vv", "s3://b"])

    def test_every_option_is_in_a_titled_group(self):
        for group in s3push.build_parser()._action_groups:
            if group.title in ("positional arguments", "optional arguments", "options"):
                self.assertEqual(group._group_actions, [], group.title)

    def test_short_flags_names_every_option_of_one_letter(self):
        actions = s3push.build_parser()._actions
        short = {name[1] for action in actions for name in action.option_strings
                 if len(name) == 2}
        self.assertEqual(short, set(s3push.SHORT_FLAGS))
        self.assertEqual({action.nargs for action in actions
                          if set(action.option_strings) & {"-" + c for c in short}}, {0})


class Keys(unittest.TestCase):
    def test_prefix_and_relative(self):
        self.assertEqual(s3push.object_key("", "a/b c"), "a/b c")
        self.assertEqual(s3push.object_key("p/", "ü/x"), "p/ü/x")

    def test_bytes_that_are_not_utf8_are_escaped_as_rclone_escapes_them(self):
        # Each byte that is not part of valid UTF-8: U+201B and two upper-case hex digits.
        for raw, text in ((b"caf\xe9.txt", "caf\u201bE9.txt"),
                          (b"\xff\xfe/x", "\u201bFF\u201bFE/x"),
                          (b"a\xe2\x82", "a\u201bE2\u201b82"),       # cut short
                          (b"\xed\xa0\x80", "\u201bED\u201bA0\u201b80"),  # a surrogate
                          (b"\xc0\xaf", "\u201bC0\u201bAF"),             # overlong "/"
                          ("caf\u00e9 \u201bE9".encode(), "caf\u00e9 \u201b\u201bE9"),  # UTF-8
                          ("caf\u201b".encode() + b"\xe9", "caf\u201b\u201b\u201bE9"),  # README
                          ("caf\u00e9.txt".encode(), "caf\u00e9.txt")):
            for name in (raw, os.fsdecode(raw)):
                self.assertEqual(s3push.key_text(name), text, raw)
            self.assertEqual(s3push.object_key("p/", os.fsdecode(raw)), "p/" + text)

    def test_a_key_reads_back_to_the_name_s_bytes_left_to_right(self):
        # The README's rule: U+201B twice is one U+201B, U+201B and two hex digits the byte.
        def name_of(key):
            parts = re.split("\u201b(\u201b|[0-9A-F]{2})", key)
            return b"".join(part.encode("utf-8") if i % 2 == 0 or part == "\u201b" else
                            bytes([int(part, 16)]) for i, part in enumerate(parts))
        mark = "\u201b".encode()
        names = [b"caf\xe9.csv", mark + b"x", mark * 2, b"caf" + mark + b"E9.csv",
                 b"caf" + mark * 2 + b"E9.csv", b"caf\xe9" + mark + b"E9\xe9",
                 mark + b"\xff" + mark + b"FF" + mark * 3 + b"\xe2\x80", mark[:2] + b"9B",
                 b"\xe2\x80\x9b\x9b" + mark + b"\xc3\xa9/d\xff" + mark + b"/" + mark,
                 b"plain/a b.log", b""]
        keys = set()
        for raw in names:
            key = s3push.key_text(os.fsdecode(raw))
            self.assertEqual(name_of(key), raw, key)
            keys.add(key)
        self.assertEqual(len(keys), len(names))   # one key a name

    def test_the_original_bytes_percent_encoded(self):
        self.assertIsNone(s3push.percent_bytes("caf\u00e9/a b~"))
        for raw, text in ((b"caf\xe9.txt", "caf%E9.txt"),
                          (b"d\xff/a b~%.c\xc3\xa9", "d%FF/a%20b~%25.c%C3%A9")):
            self.assertEqual(s3push.percent_bytes(os.fsdecode(raw)), text)
            self.assertEqual(urllib.parse.unquote_to_bytes(text), raw)

    def test_mtimes_to_the_nanosecond_before_1970_too(self):
        for mtime_ns, text in ((-1500000000, "-1.500000000"), (-500000000, "-0.500000000"),
                               (-2 * 10 ** 9, "-2.000000000"), (0, "0.000000000"),
                               (1700006399999999999, "1700006399.999999999")):
            self.assertEqual(s3push.mtime_text(mtime_ns), text)

    def test_too_long(self):
        s3push.object_key("", "x" * 1024)
        with self.assertRaisesRegex(s3push.FileError, "1025 bytes"):
            s3push.object_key("p/", "x" * 1023)

    def test_safe_name_escapes_control_characters(self):
        self.assertEqual(s3push.safe_name("a\nb\x1bc"), "a\\nb\\x1bc")


class Selection(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)

    def touch(self, relative, mtime=1000):
        path = os.path.join(self.root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(b"x")
        os.utime(path, (mtime, mtime))
        return path

    def scan(self, root, patterns, errors):
        fd = s3push.open_source(root)
        self.addCleanup(os.close, fd)
        return s3push.scan(fd, s3push.Selection(patterns), errors, s3push.AsideNames(True))

    def scanned(self, patterns=s3push.DEFAULT_EXCLUDES):
        errors = []
        found = sorted(f.relative for f in self.scan(self.root, patterns, errors))
        return found, errors

    def test_oldest_first_in_windows_each_file_once(self):
        mtimes = [5, 3, 9, 3, 1, 7, 7, 2, 8, 6, 4]   # ties broken by the path
        for i, mtime in enumerate(mtimes):
            self.touch("d%d/f%02d" % (i % 3, i), mtime)
        expected = [f for _, f in sorted((m, "d%d/f%02d" % (i % 3, i))
                                         for i, m in enumerate(mtimes))]
        self.addCleanup(setattr, s3push, "MAX_RUNS", s3push.MAX_RUNS)
        for window, max_runs, spill in [(w, m, s) for w in (1, 3, 4, 11, 12, 100)
                                        for m in (2, 64) for s in ("spill", None, "full")]:
            s3push.MAX_RUNS = max_runs
            notices = s3push.Notices()
            with contextlib.redirect_stderr(io.StringIO()) as stderr:
                got = list(s3push.oldest_first(self.scan(self.root, (), []), window,
                                               self.spill(spill), notices))
            relatives = [f.relative for f in got]
            self.assertEqual(sorted(relatives), sorted(expected), (window, spill))
            windows = len(mtimes) // window   # windows that fill up: a run each
            failed = spill is None and windows or spill == "full" and windows > 1
            if not failed:   # the whole order, the scan seen once
                self.assertEqual(relatives, expected, (window, max_runs, spill))
                self.assertEqual(stderr.getvalue(), "")
            else:   # the order gave way: said once; every file still comes, once
                self.assertEqual(stderr.getvalue().count("cannot spill the order"), 1)
                self.assertIn("oldest first within each %d" % window, stderr.getvalue())
                self.assertIn("no HOME and no --state-dir" if spill is None else
                              "No space left on device", stderr.getvalue())
            if spill is None and windows:   # each window in its own order
                for start in range(0, windows * window, window):
                    self.assertEqual(relatives[start:start + window],
                                     sorted(relatives[start:start + window],
                                            key=lambda r: (mtimes[int(r[-2:])], r)))
            for found in got:   # what comes back from a spill is what the scan saw
                info = os.stat(os.path.join(self.root, found.relative))
                self.assertEqual(found.info, (info.st_dev, info.st_ino, info.st_size,
                                              info.st_mtime_ns, info.st_mtime_ns))
                folder = os.stat(os.path.join(self.root, found.directory.relative))
                self.assertEqual(found.directory.steps[-1][1:],
                                 (folder.st_dev, folder.st_ino))

    def test_a_spilled_run_that_cannot_be_read_back_stops_the_run(self):
        for i in range(5):
            self.touch("f%d" % i, i)
        spill = self.spill("spill")
        write = spill.write

        def unreadable(records):   # its reads fail as a failing disk's would (EIO)
            run = write(records)
            run.read = lambda size: (_ for _ in ()).throw(OSError(5, "Input/output error"))
            return run
        spill.write = unreadable
        with self.assertRaises(s3push.TemporaryError) as caught:
            list(s3push.oldest_first(self.scan(self.root, (), []), 2, spill,
                                     s3push.Notices()))
        self.assertIn("cannot read back the order spilled to the state folder "
                      "(Input/output error)", str(caught.exception))

    def spill(self, kind):
        """A Spill in a folder of its own; None: no state folder; "full": one whose second
        run fails (ENOSPC)."""
        if kind is None:
            return s3push.Spill(s3push.StateFolder(None, None, "no HOME and no --state-dir"))
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        fd = os.open(folder, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        spill = s3push.Spill(s3push.StateFolder(folder, fd, None))
        if kind == "full":
            write, runs = spill.write, []

            def failing(records):
                runs.append(1)
                if len(runs) > 1:
                    raise OSError(28, "No space left on device")
                return write(records)
            spill.write = failing
        return spill

    def test_regular_files_only(self):
        self.touch("a/b/file")
        self.touch("top")
        os.mkfifo(os.path.join(self.root, "fifo"))
        os.symlink("top", os.path.join(self.root, "link"))
        os.symlink(self.root, os.path.join(self.root, "a", "loop"))
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.path.join(self.root, "sock"))
        self.addCleanup(sock.close)
        self.assertEqual(self.scanned(), (["a/b/file", "top"], []))

    def test_default_and_extra_excludes(self):
        for name in (".hidden", "x.tmp", "x.part", "x.partial", "x.swp", "x~", ".dir/inner",
                     "keep.txt", "logs/a.log", "logs/b.txt"):
            self.touch(name)
        self.assertEqual(self.scanned()[0], ["keep.txt", "logs/a.log", "logs/b.txt"])
        patterns = s3push.DEFAULT_EXCLUDES + ("*.log",)
        self.assertEqual(self.scanned(patterns)[0], ["keep.txt", "logs/b.txt"])
        patterns = s3push.DEFAULT_EXCLUDES + ("logs/*",)
        self.assertEqual(self.scanned(patterns)[0], ["keep.txt"])

    def test_a_directory_that_changed_is_reported(self):
        # Directories replaced, swapped for a symlink or gone between the listing and
        # their turn: each is TreeChanged (a warning), never followed.
        for name in ("replaced", "symlinked", "gone"):
            self.touch(name + "/f")
        outside = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, outside)
        fd = s3push.open_source(self.root)
        self.addCleanup(os.close, fd)
        stack = []   # the root's listing: three directories to visit
        self.assertEqual(list(s3push.scan_directory(fd, s3push.Directory("", ()),
                                                    s3push.Selection(), stack, [],
                                                    s3push.AsideNames(True))), [])
        shutil.rmtree(os.path.join(self.root, "gone"))
        os.rename(os.path.join(self.root, "replaced"), os.path.join(outside, "away"))
        os.mkdir(os.path.join(self.root, "replaced"))
        with open(os.path.join(self.root, "replaced", "f"), "w"):
            pass
        os.rename(os.path.join(self.root, "symlinked"), os.path.join(outside, "moved"))
        os.symlink(outside, os.path.join(self.root, "symlinked"))
        self.assertEqual(sorted(d.relative for d in stack), ["gone/", "replaced/", "symlinked/"])
        for directory in stack:
            with self.assertRaises(s3push.TreeChanged) as caught:
                s3push.open_directory(fd, directory.steps)
            self.assertNotIsInstance(caught.exception, s3push.S3PushError)   # not a failure

    def test_a_deep_tree_with_few_descriptors(self):
        # 400 levels, with no more than a few descriptors open at any time.
        path = self.root
        for _ in range(400):
            path = os.path.join(path, "d")
        os.makedirs(path)
        self.touch(os.path.relpath(os.path.join(path, "f"), self.root))
        before = descriptors_under(self.root)
        most = [0]
        found = []
        for item in self.scan(self.root, (), []):
            most[0] = max(most[0], descriptors_under(self.root) - before)
            found.append(item)
        self.assertEqual([f.relative for f in found], ["d/" * 400 + "f"])
        self.assertLessEqual(most[0], 3)
        fd = s3push.open_source(self.root)
        self.addCleanup(os.close, fd)
        parent = s3push.open_directory(fd, found[0].directory.steps)
        self.assertTrue(os.path.samestat(os.fstat(parent), os.stat(path)))
        os.close(parent)

    def test_min_age(self):
        self.touch("old", mtime=1000)
        self.touch("new", mtime=1990)
        selection = s3push.Selection(young_after_ns=(2000 - 60) * 10 ** 9)
        fd = s3push.open_source(self.root)
        self.addCleanup(os.close, fd)
        kept = [f.relative for f in s3push.scan(fd, selection, [], s3push.AsideNames(True))]
        self.assertEqual(kept, ["old"])
        self.assertEqual(selection.left.counts[s3push.YOUNG], 1)

    def test_includes_and_sizes(self):
        for name, size in (("a.log", 10), ("b.log", 2000), ("c.txt", 10), ("d/e.log", 500),
                           ("d/f.csv", 500), ("x.log.tmp", 10), ("skip/g.log", 10)):
            with open(self.touch(name), "wb") as handle:
                handle.write(b"x" * size)
        fd = s3push.open_source(self.root)
        self.addCleanup(os.close, fd)

        def selected(**kw):
            selection = s3push.Selection(s3push.DEFAULT_EXCLUDES + ("skip",), **kw)
            found = sorted(f.relative for f in s3push.scan(fd, selection, [],
                                                           s3push.AsideNames(True)))
            return found, selection.left.counts[s3push.SIZED_OUT]
        self.assertEqual(selected(includes=("*.log",)), (["a.log", "b.log", "d/e.log"], 0))
        self.assertEqual(selected(includes=("d/*",)), (["d/e.log", "d/f.csv"], 0))
        self.assertEqual(selected(includes=("*.log",), min_size=100, max_size=1000),
                         (["d/e.log"], 2))
        self.assertEqual(selected(max_size=10), (["a.log", "c.txt"], 3))

    def test_pattern_files(self):
        path = os.path.join(self.root, "globs")
        with open(path, "w") as handle:
            handle.write("# logs only\n*.log\n\n  \n*.csv\n")
        self.assertEqual(s3push.read_globs(path, "--include-from"), ("*.log", "*.csv"))
        with self.assertRaisesRegex(s3push.UsageError, "cannot read --exclude-from .*nope"):
            s3push.read_globs(path + ".nope", "--exclude-from")

    def test_same_version(self):
        path = self.touch("f")
        before = os.lstat(path)
        self.assertTrue(s3push.same_version(before, os.lstat(path)))
        os.utime(path, (5, 5))
        self.assertFalse(s3push.same_version(before, os.lstat(path)))

    def test_lock_is_exclusive_and_released(self):
        first, second = s3push.open_source(self.root), s3push.open_source(self.root)
        self.addCleanup(os.close, second)
        self.assertTrue(s3push.try_lock(first))
        self.assertFalse(s3push.try_lock(second))
        os.close(first)
        self.assertTrue(s3push.try_lock(second))

    def test_a_lock_that_cannot_be_kept_anywhere_is_a_config_error(self):
        # No state folder, and SOURCE_DIR on NFS without a lock manager (ENOLCK).
        root = s3push.open_source(self.root)
        self.addCleanup(os.close, root)
        real = s3push.try_lock
        s3push.try_lock = lambda fd: (_ for _ in ()).throw(OSError(37, "No locks available"))
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                with self.assertRaises(s3push.ConfigError) as caught:
                    s3push.take_run_lock(s3push.open_state_folder(None), root,
                                         s3push.Notices())
        finally:
            s3push.try_lock = real
        self.assertIn("cannot lock SOURCE_DIR either (No locks available)",
                      str(caught.exception))

    def test_run_lock_in_the_state_folder(self):
        state = os.path.join(tempfile.mkdtemp(), "state")
        self.addCleanup(shutil.rmtree, os.path.dirname(state))
        first, second = s3push.open_source(self.root), s3push.open_source(self.root + "/.")
        self.addCleanup(os.close, first)
        self.addCleanup(os.close, second)
        folder = s3push.open_state_folder(state)
        self.addCleanup(os.close, folder.fd)
        fd, holder = s3push.run_lock(folder.fd, s3push.source_lock_name(first))
        self.assertIsNotNone(fd)
        kept_out, holder = s3push.run_lock(folder.fd, s3push.source_lock_name(second))
        self.assertEqual((kept_out, holder.pid), (None, os.getpid()))
        self.assertEqual(stat.S_IMODE(os.stat(state).st_mode), 0o700)
        lock, = os.listdir(state)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(state, lock)).st_mode), 0o600)
        os.close(fd)
        fd, holder = s3push.run_lock(folder.fd, s3push.source_lock_name(second))
        self.assertIsNotNone(fd)
        os.close(fd)
        os.chmod(state, 0o770)
        refused = s3push.open_state_folder(state)
        self.assertIsNone(refused.fd)
        self.assertIn("mode 0770", refused.problem)
        self.assertIn("no HOME", s3push.open_state_folder(None).problem)

    def test_the_path_locks_name_is_the_host_and_the_path_as_given(self):
        name = s3push.path_lock_name
        host = os.uname().nodename.replace("%", "%25").replace("/", "%2F")
        self.assertEqual(name("/data/in%/"), "path-%s-%%2Fdata%%2Fin%%25%%2F.lock" % host)
        self.assertEqual(name("in"), name(os.path.join(os.getcwd(), "in")))
        self.assertNotEqual(name("/data/x/.."), name("/data"))   # x may be a symlink
        self.assertNotEqual(name("/data/in%2Fx"), name("/data/in/x"))
        long = name("/" + "d" * 300)
        self.assertEqual(len(long), len("path-.lock") + 64)
        self.assertNotEqual(long, name("/" + "d" * 301))
        raw = name(os.fsdecode(b"/caf\xe9"))   # not UTF-8: a name all the same
        self.assertTrue(os.fsencode(raw).endswith(b"-%2Fcaf\xe9.lock"), raw)

    def test_the_path_lock_waits_for_a_state_folder_outside_the_source(self):
        top = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, top)
        state, source = os.path.join(top, "state"), os.path.join(top, "src")
        for folder in (None, state, os.path.join(source, ".state"), source):
            self.assertEqual(s3push.take_path_lock(folder, source), (True, None))
        self.assertEqual(os.listdir(top), [])   # nothing made: neither folder
        os.mkdir(state)
        self.assertEqual(s3push.take_path_lock(state, source), (True, None))
        lock, = os.listdir(state)
        self.assertEqual(lock, s3push.path_lock_name(source))
        # (This process holds it now: a second open file of it cannot take it.)
        held, holder = s3push.take_path_lock(state, source)
        self.assertEqual((held, holder.pid), (False, os.getpid()))
        gone = os.path.join(top, "gone")   # a relative SOURCE_DIR, the working folder gone
        os.mkdir(gone)
        here = os.getcwd()
        os.chdir(gone)
        try:
            os.rmdir(gone)
            self.assertEqual(s3push.take_path_lock(state, "src"), (True, None))
        finally:
            os.chdir(here)

    def test_a_python_without_the_at_calls_is_told_what_is_missing(self):
        s3push.check_platform()
        os.supports_dir_fd.discard(os.rename)
        os.supports_fd.discard(os.listdir)
        try:
            with self.assertRaises(s3push.ConfigError) as caught:
                s3push.check_platform()
        finally:
            os.supports_dir_fd.add(os.rename)
            os.supports_fd.add(os.listdir)
        self.assertIn("cannot use os.rename, os.listdir through a directory's descriptor",
                      str(caught.exception))

    def test_removal_of_a_directory_s_files(self):
        info = os.stat(self.root)
        self.assertTrue(s3push.Removal(None, None).allows(info))
        self.assertTrue(s3push.Removal(None, info.st_uid).allows(info))
        self.assertFalse(s3push.Removal(None, info.st_uid + 1).allows(info))
        self.assertFalse(s3push.Removal("a read-only filesystem", None).allows(info))
        fd = s3push.open_source(self.root)
        self.addCleanup(os.close, fd)
        self.assertEqual(s3push.removal_in(fd), (None, None))   # ours, writable

    def test_open_refuses_fifo_and_symlink_without_blocking(self):
        os.mkfifo(os.path.join(self.root, "fifo"))
        os.symlink("/etc/hostname", os.path.join(self.root, "link"))
        fd = s3push.open_source(self.root)
        self.addCleanup(os.close, fd)
        for name in ("fifo", "link"):
            with self.assertRaises(s3push.TreeChanged):
                s3push.open_regular_file(fd, name)
        with self.assertRaises(s3push.Vanished):
            s3push.open_regular_file(fd, "missing")

    def test_hard_links_only_where_the_kernel_protects_them_or_allowed(self):
        path = self.touch("f")
        os.link(path, os.path.join(self.root, "g"))
        switch = os.path.join(self.root, "protected")
        for value, allowed, refused in (("1\n", False, False), ("0\n", False, True),
                                        ("0\n", True, False), (None, False, True)):
            if value is None:
                os.unlink(switch)   # unknown counts as off
            else:
                with open(switch, "w") as handle:
                    handle.write(value)
            if refused:
                with self.assertRaisesRegex(s3push.FileError, "has 2 hard links .*"
                                            "--allow-hardlinks"):
                    s3push.check_links(os.lstat(path), allowed, switch)
            else:
                s3push.check_links(os.lstat(path), allowed, switch)
        os.unlink(os.path.join(self.root, "g"))
        s3push.check_links(os.lstat(path), False, switch)   # one link: always fine


class NumberedKeys(unittest.TestCase):
    def test_numbered_key(self):
        for key, expected in (("logs/app.log", "logs/app.3.log"), ("app", "app.3"),
                              ("a.b/c", "a.b/c.3"), ("d/archive.tar.gz", "d/archive.tar.3.gz"),
                              ("d/.hidden", "d/.hidden.3")):
            self.assertEqual(s3push.numbered_key(key, 3), expected)

    def test_candidates_are_bounded(self):
        self.assertEqual(list(s3push.candidate_keys("k", "keep")), ["k"])
        keys = list(s3push.candidate_keys("k.txt", "number"))
        self.assertEqual(keys[:3], ["k.txt", "k.1.txt", "k.2.txt"])
        self.assertEqual(len(keys), 1 + s3push.MAX_NUMBERED_KEYS)

    def test_candidates_of_a_gzip_and_their_length(self):
        keys = s3push.candidate_keys(s3push.gzip_key("d/app.log"), "number")
        self.assertEqual([next(keys) for _ in range(2)], ["d/app.log.gz", "d/app.log.1.gz"])
        longest = "k" * (s3push.MAX_KEY_BYTES - 3)
        self.assertEqual(s3push.gzip_key(longest), longest + ".gz")
        with self.assertRaises(s3push.FileError):   # .gz takes it over S3's limit
            s3push.gzip_key(longest + "k")
        keys = s3push.candidate_keys(longest + "kkk", "number")
        self.assertEqual(next(keys), longest + "kkk")
        with self.assertRaises(s3push.FileError):   # and so does a number
            next(keys)

    def test_if_exists_and_its_alias(self):
        parse = s3push.build_parser().parse_args
        self.assertEqual(parse(["s", "s3://b"]).if_exists, "overwrite")
        self.assertEqual(parse(["--no-overwrite", "s", "s3://b"]).if_exists, "keep")
        self.assertEqual(parse(["--if-exists", "number", "s", "s3://b"]).if_exists, "number")


class Ledger(unittest.TestCase):
    """The ledger of confirmed uploads: records kept durably, read back by the next run,
    a torn last line ignored, and only the records whose file is still there kept."""

    def setUp(self):
        s3push.load_deferred_modules()
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        self.root_fd = s3push.open_source(self.root)
        self.addCleanup(os.close, self.root_fd)
        self.folder = os.path.join(self.root, ".state", "sub")
        self.notices = s3push.Notices()

    def record(self, name, data=b"data"):
        path = os.path.join(self.root, name)
        with open(path, "wb") as handle:
            handle.write(data)
        md5 = hashlib.md5(data).hexdigest()
        return {"id": name, "file": s3push.ledger_identity(os.stat(path)), "name": name,
                "aside": ".s3push-0123456789abcdef-" + name, "dir": "", "key": name,
                "endpoint": "http://s3", "checksum": {"md5": md5}}

    def found(self, name):
        """(Found, descriptor, fstat) of a file of the root, as move_file has them."""
        path = os.path.join(self.root, name)
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        info = os.fstat(fd)
        return s3push.Found(s3push.Directory("", ()), name, info), fd, info

    def vouching(self, ledger, name, endpoint="http://s3"):
        return ledger.vouching(*self.found(name) + (endpoint,))

    def ledger(self):
        ledger = s3push.Ledger(self.folder, self.notices)
        ledger.open()
        return ledger

    @staticmethod
    def add(ledger, record):
        """Keep a record durably, as move_file does before anything is renamed."""
        ledger.sync(ledger.write(record))

    def test_compactions_without_syncs_keep_no_descriptor(self):
        """Files the ledger vouches for are removed without a record added, so without a
        sync: the descriptor each compaction replaces is closed all the same."""
        ledger = s3push.Ledger(self.folder, self.notices)
        ledger.open()
        self.addCleanup(ledger.close, self.root_fd)
        ledger.compact_at = 0   # each resolved record compacts
        records = [dict(self.record("f%d" % number), aside=None) for number in range(40)]
        for record in records:
            self.add(ledger, record)
        before = descriptors_under(self.folder)
        for record in records:
            ledger.resolved(record)
        self.assertEqual(descriptors_under(self.folder), before)
        self.assertEqual(ledger.retired, [])

    def test_a_ledger_that_fails_keeps_the_lines_written_before(self):
        """Lines written and not yet fsync'ed (their workers send their next files) are
        made durable when the ledger fails (a full disk): their files are removed."""
        ledger = self.ledger()
        self.addCleanup(ledger.close, self.root_fd)
        line = ledger.write(self.record("waiting"))
        self.assertGreater(line, ledger.synced)
        fd = ledger.fd
        with unittest.mock.patch.object(os, "fsync", wraps=os.fsync) as fsync:
            ledger.fail(OSError(errno.ENOSPC, "No space left on device"))
        fsync.assert_called_once_with(fd)
        self.assertIsNone(ledger.fd)

    def test_close_waits_for_an_fsync_at_work(self):
        """A sync holds sync_lock from taking the descriptor to its fsync: close (the run
        stopped by a signal while workers still run) closes nothing under it."""
        ledger = self.ledger()
        self.add(ledger, self.record("one"))
        ledger.sync_lock.acquire()   # a sync between taking the descriptor and its fsync
        fd = ledger.fd
        closing = threading.Thread(target=ledger.close, args=(self.root_fd,), daemon=True)
        closing.start()
        closing.join(0.3)
        try:
            self.assertTrue(closing.is_alive())
            os.fsync(fd)   # still the ledger's: not closed, not reused
        finally:
            ledger.sync_lock.release()
        closing.join(10)
        self.assertFalse(closing.is_alive())
        with self.assertRaises(OSError):
            os.fstat(fd)

    def test_a_record_outlives_its_run_while_its_file_is_there(self):
        ledger = self.ledger()
        kept, gone = self.record("kept"), self.record("gone")
        self.add(ledger, kept)
        self.add(ledger, gone)
        os.unlink(os.path.join(self.root, "gone"))
        ledger.close(self.root_fd)
        again = self.ledger()
        self.assertEqual(sorted(r["id"] for r in again.unresolved()), ["kept"])
        self.assertEqual(self.vouching(again, "kept")["key"], "kept")
        again.resolved(self.vouching(again, "kept"))
        again.close(self.root_fd)
        self.assertFalse(os.path.exists(os.path.join(self.folder, s3push.LEDGER_NAME)))

    def test_only_its_own_unchanged_bytes_at_its_place_are_vouched_for(self):
        ledger = self.ledger()
        self.add(ledger, self.record("f"))
        self.assertIsNotNone(self.vouching(ledger, "f"))
        self.assertIsNone(self.vouching(ledger, "f", "https://elsewhere"))
        path = os.path.join(self.root, "f")
        os.link(path, os.path.join(self.root, "g"))   # the same inode, another name
        self.assertIsNone(self.vouching(ledger, "g"))
        aside = os.path.join(self.root, ".s3push-0123456789abcdef-f")
        os.rename(path, aside)   # its aside name: the same file
        self.assertIsNotNone(self.vouching(ledger, os.path.basename(aside)))
        mtime = os.stat(aside).st_mtime_ns
        with open(aside, "r+b") as handle:   # rewritten in place, its mtime put back
            handle.write(b"DATA")
        os.utime(aside, ns=(mtime, mtime))
        self.assertIsNone(self.vouching(ledger, os.path.basename(aside)))

    def test_a_card_that_comes_back_renumbered_is_still_vouched_for(self):
        # vfat and exFAT number inodes anew at each mount: the place, size and mtime find
        # the record, the bytes prove it; a folder seen gone drops it.
        ledger = self.ledger()
        record = self.record("f")
        record["file"][:2] = [1, 2]   # as an earlier mount numbered it
        self.add(ledger, record)
        self.assertIsNotNone(self.vouching(ledger, "f"))
        self.assertTrue(s3push.still_there(self.root_fd, record))
        record["dir"] = "gone/"
        self.assertFalse(s3push.still_there(self.root_fd, record))

    def test_an_md5_of_parts_and_a_gzip_s_file_crc32_are_computed_again(self):
        data = os.urandom(3 * s3push.MIB + 5)
        record = self.record("big", data)
        part_size = s3push.MIB
        parts = b"".join(hashlib.md5(data[o:o + part_size]).digest()
                         for o in range(0, len(data), part_size))
        record["checksum"] = {s3push.MD5_OF_PARTS: "%s-4" % hashlib.md5(parts).hexdigest()}
        record["part_size"] = part_size
        _, fd, info = self.found("big")
        self.assertTrue(s3push.content_proven(fd, info.st_size, record))
        record["part_size"] = 2 * part_size
        self.assertFalse(s3push.content_proven(fd, info.st_size, record))
        record["file_crc32"] = "%08x" % zlib.crc32(data)   # a gzip's proof is of the gzip
        record["checksum"] = {"md5": "0" * 32}
        self.assertTrue(s3push.content_proven(fd, info.st_size, record))

    def test_a_sha256_and_a_sha256_of_parts_are_computed_again(self):
        data = os.urandom(3 * s3push.MIB + 5)
        record = self.record("big", data)
        record["checksum"] = {"sha256": hashlib.sha256(data).hexdigest()}
        _, fd, info = self.found("big")
        self.assertTrue(s3push.content_proven(fd, info.st_size, record))
        part_size = s3push.MIB   # S3's COMPOSITE: the SHA-256 of the parts' SHA-256s, "-N"
        parts = b"".join(hashlib.sha256(data[o:o + part_size]).digest()
                         for o in range(0, len(data), part_size))
        record["checksum"] = {"sha256_of_parts": "%s-4" % hashlib.sha256(parts).hexdigest()}
        record["part_size"] = part_size
        self.assertTrue(s3push.content_proven(fd, info.st_size, record))
        record["part_size"] = 2 * part_size
        self.assertFalse(s3push.content_proven(fd, info.st_size, record))
        del record["part_size"]
        self.assertFalse(s3push.content_proven(fd, info.st_size, record))

    def test_a_long_run_keeps_the_ledger_small(self):
        ledger = self.ledger()
        self.addCleanup(setattr, s3push, "LEDGER_COMPACT", s3push.LEDGER_COMPACT)
        ledger.compact_at = 2000
        path = os.path.join(self.folder, s3push.LEDGER_NAME)
        held = self.record("held")   # in flight all along: never resolved
        self.add(ledger, held)
        for n in range(50):
            record = self.record("f%d" % n)
            self.add(ledger, record)
            ledger.resolved(record)
            self.assertLess(os.path.getsize(path), 3000)
        ledger.close_file()   # as a kill would: the one in flight survived every rewrite
        self.assertIn("held", [r["id"] for r in self.ledger().unresolved()])

    def test_a_torn_last_line_is_cut_off_and_the_rest_read(self):
        ledger = self.ledger()
        self.add(ledger, self.record("a"))
        ledger.close_file()
        path = os.path.join(self.folder, s3push.LEDGER_NAME)
        with open(path, "ab") as handle:
            handle.write(b'{"id": "b", "file": [1, 2')
        again = self.ledger()
        self.assertEqual([r["id"] for r in again.unresolved()], ["a"])
        with open(path, "rb") as handle:
            self.assertTrue(handle.read().endswith(b"}\n"))

    def test_a_ledger_that_cannot_be_kept_is_said_once_and_files_move(self):
        with open(os.path.join(self.root, ".state"), "w"):
            pass   # the folder cannot be made
        ledger = self.ledger()
        self.add(ledger, self.record("a"))
        self.assertIsNone(ledger.fd)
        self.assertIn("ledger", " ".join(map(str, self.notices.said)))


class Layout(unittest.TestCase):
    """The file reads top to bottom: no definition uses one that stands below it."""

    def setUp(self):
        import ast
        with open(s3push.__file__) as handle:
            self.tree = ast.parse(handle.read())
        self.ast = ast

    def test_each_definition_uses_only_what_stands_above_it(self):
        ast, defined, later = self.ast, {}, []
        for node in self.tree.body:
            for name in self.names(node):
                defined.setdefault(name, node.lineno)
        for node in self.tree.body:
            own = self.names(node)
            for used in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}:
                if used in defined and used not in own and defined[used] > node.lineno:
                    later.append("%s (line %d) uses %s (line %d)"
                                 % (own[0], node.lineno, used, defined[used]))
        self.assertEqual(later, [])

    def test_main_last_and_few_imports_inside_functions(self):
        ast = self.ast
        definitions = [n for n in self.tree.body if isinstance(n, (ast.FunctionDef,
                                                                   ast.ClassDef))]
        self.assertEqual(definitions[-1].name, "main")
        inner = [n.lineno for f in definitions for n in ast.walk(f)
                 if isinstance(n, (ast.Import, ast.ImportFrom))]
        self.assertLessEqual(len(inner), 3, inner)

    def test_one_http_client(self):
        """Every request (S3, STS, the metadata services) goes through Connection.open: the
        one place that makes a connection (and Connection.secure the one that wraps it in
        TLS), so one proxy rule and one TLS trust."""
        ast, makers = self.ast, []
        for node in ast.walk(self.tree):
            if isinstance(node, ast.FunctionDef):
                for call in ast.walk(node):
                    if isinstance(call, ast.Attribute) and call.attr in (
                            "HTTPConnection", "HTTPSConnection", "urlopen", "create_connection",
                            "socket", "wrap_socket"):
                        makers.append((node.name, call.attr))
        self.assertEqual(makers, [("open", "create_connection"), ("secure", "wrap_socket")])

    def test_the_checksum_is_chosen_in_one_place(self):
        """No comparison with an algorithm's name, nor a multipart proof's: checksum_for
        picks Md5Check, Crc32Check or Sha256Check once, and everything else asks the
        object it picked (or the table of proofs by name, CHECKSUMS and OF_PARTS)."""
        ast, compared = self.ast, []
        names = ("md5", "crc32", "sha256", "md5_of_parts", "sha256_of_parts")
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Compare):
                for side in [node.left] + node.comparators:
                    if isinstance(side, ast.Str if sys.version_info < (3, 8) else
                                  ast.Constant) and getattr(side, "s", None) in names or \
                            isinstance(side, ast.Name) and side.id.endswith("_OF_PARTS"):
                        compared.append(node.lineno)
        self.assertEqual(compared, [])

    def test_one_road_for_warnings(self):
        """Every warning goes through Notices (said once, after the status line is
        cleared): no other place writes the words 'warning:' for the operator."""
        ast, places = self.ast, []
        for top in self.tree.body:
            for node in ast.walk(top):
                text = getattr(node, "s", None) if isinstance(
                    node, ast.Str if sys.version_info < (3, 8) else ast.Constant) else None
                if isinstance(text, str) and "warning:" in text:
                    places.append(self.names(top)[0])
        self.assertEqual(places, ["Notices"])

    def test_one_road_for_lines(self):
        """Every line the run prints goes through Notices.line (and so into --log-file,
        after the same redaction): no other function calls emit or writes to sys.stdout or
        sys.stderr, but the live status line's."""
        ast, places = self.ast, set()
        for function in ast.walk(self.tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", "")
                streams = [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
                           and n.attr in ("stdout", "stderr")]
                if name == "emit" or streams and name in ("write", "print_usage",
                                                          "print_help", "print"):
                    places.add(function.name)
        self.assertEqual(places, {"line", "clear_status", "show_status"})

    def names(self, node):
        ast = self.ast
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return [node.name]
        if isinstance(node, ast.Assign):
            return [t.id for t in node.targets if isinstance(t, ast.Name)] or [""]
        return [""]


class InternalErrors(unittest.TestCase):
    def test_the_line_named_is_ours_not_the_library_s(self):
        try:
            s3push.tls_context(5)   # fails inside ssl.py
        except TypeError as exc:
            error = str(s3push.internal_error(exc, None))
        with open(s3push.__file__) as handle:
            ours = [n for n, line in enumerate(handle, 1)
                    if "ssl.create_default_context(cafile=ca_bundle)" in line]
        self.assertIn(" at line %d:" % ours[0], error)


class Verification(unittest.TestCase):
    def test_etag_must_equal_md5(self):
        md5 = "5d41402abc4b2a76b9719d911017c592"   # of b"hello"
        self.assertTrue(s3push.etag_confirms('"%s"' % md5, md5))
        self.assertTrue(s3push.etag_confirms(md5.upper(), md5))
        self.assertFalse(s3push.etag_confirms('"5d41402abc4b2a76b9719d911017c593"', md5))
        self.assertFalse(s3push.etag_confirms("", md5))

    def test_non_md5_etag_rests_on_content_md5(self):
        self.assertTrue(s3push.etag_confirms('"abc-2"', "5d41402abc4b2a76b9719d911017c592"))

    def test_no_md5_available(self):
        self.assertTrue(s3push.etag_confirms('"5d41402abc4b2a76b9719d911017c593"', None))
        self.assertFalse(s3push.etag_confirms("", None))

    def test_errors_map_to_exit_codes(self):
        def answer(status, code):
            body = ("<Error><Code>%s</Code><Message>m</Message></Error>" % code).encode()
            return s3push.Response(status, "R", {"x-amz-request-id": "RID"}, body)
        cases = [(403, "AccessDenied", s3push.AccessError),
                 (403, "SignatureDoesNotMatch", s3push.AccessError),
                 (404, "NoSuchBucket", s3push.ConfigError),
                 (503, "SlowDown", s3push.TemporaryError),
                 (500, "InternalError", s3push.TemporaryError),
                 (400, "BadDigest", s3push.TemporaryError),
                 (400, "KeyTooLongError", s3push.FileError)]
        for status, code, kind in cases:
            error = s3push.error_from_response(answer(status, code), "s3://b/k")
            self.assertIsInstance(error, kind, code)
            self.assertIn(code, str(error))
            self.assertIn("request id RID", str(error))

    def test_error_body_that_is_not_xml(self):
        error = s3push.error_from_response(s3push.Response(502, "Bad Gateway", {}, b"<html>"),
                                           "s3://b/k")
        self.assertIsInstance(error, s3push.TemporaryError)
        self.assertIn("HTTP502: Bad Gateway", str(error))

    def test_crc32_combine_is_the_crc32_of_the_joined_bytes(self):
        import random
        import zlib
        rng = random.Random(5)
        for _ in range(200):
            a, b = (bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
                    for _ in range(2))
            self.assertEqual(s3push.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)),
                             zlib.crc32(a + b), (len(a), len(b)))
        crc = s3push.Crc32()   # as hashlib's hashes: journals keep hexdigest()
        for block in (b"he", b"", b"llo"):
            crc.update(block)
        self.assertEqual((crc.hexdigest(), crc.digest()), ("3610a686", b"\x36\x10\xa6\x86"))
        self.assertEqual(s3push.base64_text(crc.digest()), "NhCmhg==")

    def test_a_crc32_proves_only_when_echoed_as_sent(self):
        def check(**headers):
            answer = s3push.Response(200, "OK", {k.replace("_", "-"): v
                                                 for k, v in headers.items()}, b"")
            crc = bytes.fromhex("3610a686")   # of b"hello"
            s3push.check_echo(answer, "x-amz-checksum-crc32", "CRC32", crc)
        check(etag='"e"', x_amz_checksum_crc32="NhCmhg==")
        with self.assertRaises(s3push.TemporaryError):   # damaged on the way
            check(etag='"e"', x_amz_checksum_crc32="AAAAAA==")
        with self.assertRaises(s3push.ConfigError):   # a server that checks no CRC32
            check(etag='"e"')
        with self.assertRaises(s3push.TemporaryError):   # an answer cut short
            check()

    def test_a_sha256_check_is_the_signed_payload_s_hash_too(self):
        # Over plain http (or --sign-payload) the payload's SHA-256 is the check's value:
        # one hash per byte, not two.
        check, made = s3push.CHECKSUMS["sha256"], []
        real = s3push.hashlib.sha256

        def counted(*args):
            made.append(1)
            return real(*args)
        data = os.urandom(70000)
        with tempfile.TemporaryFile() as handle:
            handle.write(data)
            handle.flush()
            with unittest.mock.patch.object(s3push.hashlib, "sha256", counted):
                signed = s3push.digest_range(handle.fileno(), 0, len(data), check, True)
                unsigned = s3push.digest_range(handle.fileno(), 0, len(data), check)
        self.assertEqual(len(made), 2, "one SHA-256 a read")
        self.assertEqual(signed.value, hashlib.sha256(data).digest())
        self.assertEqual(signed.payload_hash, hashlib.sha256(data).hexdigest())
        self.assertEqual(unsigned.payload_hash, s3push.UNSIGNED_PAYLOAD)
        self.assertEqual(s3push.body_headers(signed, check)["x-amz-checksum-sha256"],
                         s3push.base64_text(hashlib.sha256(data).digest()))

    def test_a_multipart_sha256_is_the_composite_s3_echoes(self):
        check = s3push.CHECKSUMS["sha256"]
        parts = [b"a" * 10, b"b" * 3]
        values = [hashlib.sha256(part).digest() for part in parts]
        headers, expected = check.complete(values, [10, 3])
        composite = hashlib.sha256(b"".join(values)).digest()
        self.assertEqual(expected, composite.hex() + "-2")

        def proof(echo):
            body = ("<CompleteMultipartUploadResult><Key>k</Key><ETag>\"e-2\"</ETag>%s"
                    "</CompleteMultipartUploadResult>" % echo).encode()
            response = s3push.Response(200, "OK", {}, body)
            return check.proof(response.xml, response, "k", expected, "e-2", None)
        echoed = "<ChecksumSHA256>%s-2</ChecksumSHA256>" % s3push.base64_text(composite)
        self.assertEqual(proof(echoed), s3push.Proof("sha256_of_parts", expected, "e-2", ""))
        for wrong in ("", echoed.replace("-2<", "-3<"),
                      "<ChecksumSHA256>%s-2</ChecksumSHA256>" % s3push.base64_text(values[0])):
            with self.assertRaises(s3push.FileError):
                proof(wrong)

    def test_crc32_by_default_only_on_aws_endpoints(self):
        for url, expected in ((None, "crc32"), ("https://s3.eu-west-1.amazonaws.com", "crc32"),
                              ("https://s3-fips.us-gov-west-1.amazonaws.com.", "crc32"),
                              ("https://s3.cn-north-1.amazonaws.com.cn", "crc32"),
                              ("http://127.0.0.1:9000", "md5"),
                              ("https://minio.example.com", "md5"),
                              ("https://amazonaws.com.evil.example", "md5")):
            endpoint = s3push.endpoint_for(url, "eu-west-1", "bucket")
            self.assertEqual(s3push.checksum_for(None, endpoint).name, expected, url)
        local = s3push.endpoint_for("http://127.0.0.1:9000", "eu-west-1", "bucket")
        self.assertEqual(s3push.checksum_for("crc32", local).name, "crc32")
        aws = s3push.endpoint_for(None, "us-east-1", "b")
        self.assertEqual(s3push.checksum_for("md5", aws).name, "md5")

    def test_entities_are_never_expanded(self):
        body = (b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY a "aaaaaaaaaa">]>'
                b"<Error><Code>&a;</Code></Error>")
        self.assertEqual(s3push.Response(400, "", {}, body).error, ("", ""))

    def test_control_character_references_are_read(self):
        # As AWS S3 and LocalStack write a key holding control characters: XML 1.0 forbids
        # these references and expat refuses them, but the answer is read whole.
        start = (b'<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult>'
                 b"<Bucket>b</Bucket><Key>a&#x8;b&#1;c&#x1F;d&#x9;e&#65;</Key>"
                 b"<UploadId>id&#xb;1</UploadId></InitiateMultipartUploadResult>")
        root = s3push.parse_xml(start)
        self.assertEqual(s3push.xml_text(root, "Key"), "a\x08b\x01c\x1fd\teA")
        self.assertEqual(s3push.xml_text(root, "UploadId"), "id\x0b1")
        error = (b"<Error><Code>NoSuchUpload</Code><Message>no upload</Message>"
                 b"<Key>k&#x7;\x02</Key></Error>")   # a reference, and a raw byte
        self.assertEqual(s3push.Response(404, "", {}, error).error, ("NoSuchUpload", "no upload"))
        self.assertEqual(s3push.xml_text(s3push.parse_xml(error), "Key"), "k\x07\x02")

    def test_an_answer_that_does_not_parse_starts_no_upload_again(self):
        class Client(object):   # answers every request with this body, counting them
            requests = 0

            def __init__(self, body):
                self.body = body

            def request(self, *args, **kwargs):
                Client.requests += 1
                return s3push.Response(200, "OK", {}, self.body)
        upload = s3push.Sending({}, {}, True, False)
        self.assertEqual(s3push.create_multipart_upload(Client(
            b"<R><UploadId>id&#x8;</UploadId></R>"), "k", upload), "id\x08")
        for body, said in ((b"<R><UploadId>id&#xD800;</UploadId></R>",
                            "is not XML that parses"),
                           (b"<R><Key>k</Key></R>", "gave no UploadId")):
            with self.assertRaises(s3push.ConfigError) as caught:
                s3push.create_multipart_upload(Client(body), "k", upload)
            self.assertIn("POST ?uploads", str(caught.exception))
            self.assertIn(said, str(caught.exception))
            self.assertTrue(caught.exception.fatal)   # the run stops: no pile of uploads
        self.assertEqual(Client.requests, 3)


def in_a_thread(function):
    """function() run in a thread of its own (a thread's CPUs are its own: this one's stay
    as they were); returns what it returned, or raises what it raised."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as exc:
            outcome["error"] = exc
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@unittest.skipUnless(hasattr(os, "sched_setaffinity") and
                     len(os.sched_getaffinity(0)) > 1, "one CPU, or none can be chosen here")
class CpuPlacement(unittest.TestCase):
    """A run's threads on one CPU; a thread on a large body on all of them meanwhile."""

    def test_threads_started_after_narrow_share_its_one_cpu(self):
        placement = s3push.CpuPlacement()

        def narrowed():
            before = os.sched_getaffinity(0)
            placement.narrow()
            seen = {"narrowed": os.sched_getaffinity(0),
                    "child": in_a_thread(lambda: os.sched_getaffinity(0))}
            with placement.wide(s3push.WIDE_BODY_BYTES):
                seen["wide"] = os.sched_getaffinity(0)
                seen["child while wide"] = in_a_thread(lambda: os.sched_getaffinity(0))
            seen["after"] = os.sched_getaffinity(0)
            with placement.wide(s3push.WIDE_BODY_BYTES - 1):
                seen["small"] = os.sched_getaffinity(0)
            return before, seen
        before, seen = in_a_thread(narrowed)
        self.assertEqual(len(placement.one), 1)
        self.assertLessEqual(placement.one, before)
        self.assertEqual(placement.allowed, before)
        self.assertEqual(seen, {"narrowed": placement.one, "child": placement.one,
                                "wide": before, "child while wide": before,
                                "after": placement.one, "small": placement.one})

    def test_put_range_runs_a_large_body_on_every_cpu(self):
        seen = []

        class Client(object):   # confirms each body by its MD5, as a server does
            def request(self, method, key, headers, body, body_hash, query=(),
                        validate=None):
                seen.append(os.sched_getaffinity(0))
                md5 = base64.b64decode(headers["content-md5"]).hex()
                answer = s3push.Response(200, "OK", {"etag": '"%s"' % md5}, b"")
                validate(answer)
                return answer
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        sending = s3push.Sending({}, {}, True, False)

        def put(size):
            path = os.path.join(folder, str(size))
            with open(path, "wb") as handle:
                handle.write(b"x" * size)
            fd = os.open(path, os.O_RDONLY)
            try:
                s3push.put_range(Client(), "k", fd, 0, size, {}, sending)
            finally:
                os.close(fd)
        allowed = os.sched_getaffinity(0)
        placement, s3push.CPUS = s3push.CPUS, s3push.CpuPlacement()
        self.addCleanup(setattr, s3push, "CPUS", placement)

        def run():
            s3push.CPUS.narrow()
            for size in (4096, s3push.WIDE_BODY_BYTES):
                put(size)
            return os.sched_getaffinity(0)
        after = in_a_thread(run)
        one = s3push.CPUS.one
        self.assertEqual(len(one), 1)
        self.assertEqual(seen, [one, allowed])   # the small body on one, the large on all
        self.assertEqual(after, one)

    def test_where_cpus_cannot_be_chosen_nothing_changes(self):
        refused = OSError(errno.EPERM, "Operation not permitted")
        with unittest.mock.patch.object(os, "sched_setaffinity", side_effect=refused):
            placement = s3push.CpuPlacement()
            placement.narrow()
        self.assertIsNone(placement.one)
        self.assertIs(placement.wide(1 << 30), s3push.NO_PLACEMENT)
        with unittest.mock.patch.dict(os.__dict__):
            del os.sched_getaffinity, os.sched_setaffinity   # as on macOS and the BSDs
            placement = s3push.CpuPlacement()
            placement.narrow()
            self.assertIsNone(placement.one)
            with placement.wide(1 << 30):
                pass


class Workers(unittest.TestCase):
    """s3push.worker: a file stopped at its record is finished once the next small file
    went up, before a large one or a part, at once when there is nothing to take, and
    also when a bug crashed a later task: never left open, never left unreported."""

    class Task(object):
        """A task as worker sees it: a small or large file whose move stops after its
        upload (perform) until finish; fails: "perform" or "finish" raise a bug there."""

        def __init__(self, log, name, small=True, fails=None):
            self.log, self.name, self.small, self.fails = log, name, small, fails
            self.steps = None

        def brief(self):
            return self.small

        def perform(self, client):
            self.log.append("perform " + self.name)
            if self.fails == "perform":
                raise RuntimeError("a bug in " + self.name)
            self.steps = self.move()
            next(self.steps)
            return self

        def move(self):
            yield
            self.log.append("finish " + self.name)
            if self.fails == "finish":
                raise RuntimeError("a bug in " + self.name)

        def finish(self):
            next(self.steps, None)

    def run_worker(self, tasks, producing=False):
        """worker() over a queue holding tasks; (the log, the job). producing: the scan
        is still at work (the test ends it)."""
        crashes = []
        client = unittest.mock.Mock()
        job = unittest.mock.Mock(new_client=lambda: client, queue=s3push.WorkQueue(8))
        job.report.crashed.side_effect = crashes.append
        for task in tasks:
            job.queue.add_file(task)
        if not producing:
            job.queue.done_producing()
        thread = threading.Thread(target=s3push.worker, args=(job,), daemon=True)
        thread.start()
        return thread, job, crashes, client

    def finished(self, thread, tasks, client):
        thread.join(10)
        self.assertFalse(thread.is_alive())
        client.close.assert_called_once_with()
        for task in tasks:   # every move run to its end or closed: no file left open
            if task.steps is not None:
                self.assertEqual(inspect.getgeneratorstate(task.steps), "GEN_CLOSED")

    def test_a_file_waits_through_the_next_small_one_only(self):
        log = []
        tasks = [self.Task(log, "a"), self.Task(log, "b"), self.Task(log, "c", small=False)]
        thread, _, crashes, client = self.run_worker(tasks)
        self.finished(thread, tasks, client)
        self.assertEqual(log, ["perform a", "perform b", "finish a", "finish b", "perform c",
                               "finish c"])
        self.assertEqual(crashes, [])

    def test_nothing_to_take_finishes_the_waiting_file_before_the_worker_waits(self):
        log = []
        tasks = [self.Task(log, "a"), self.Task(log, "b")]
        thread, job, _, client = self.run_worker(tasks[:1], producing=True)
        deadline = time.monotonic() + 10
        while log != ["perform a", "finish a"] and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(log, ["perform a", "finish a"])   # the scan still at work
        job.queue.add_file(tasks[1])
        job.queue.done_producing()
        self.finished(thread, tasks, client)
        self.assertEqual(log, ["perform a", "finish a", "perform b", "finish b"])

    def test_an_upload_begun_once_the_run_stopped_sends_no_part(self):
        # Its create was in flight when the --deadline or a signal stopped the queue.
        queue = s3push.WorkQueue(8)
        queue.done_producing()
        parts = [unittest.mock.Mock(), unittest.mock.Mock()]
        queue.stop()
        queue.begin_upload(parts)
        for part in parts:
            part.abandon.assert_called_once_with()
        self.assertIsNone(queue.next_task())
        self.assertIsNone(queue.next_part())
        queue.end_upload()

    def test_a_worker_waits_while_a_file_taken_may_still_begin_an_upload(self):
        queue = s3push.WorkQueue(8)
        file_task = unittest.mock.Mock()
        queue.add_file(file_task)
        queue.done_producing()
        self.assertIs(queue.next_task(), file_task)
        self.assertIs(queue.next_task(wait=False), s3push.NOT_NOW)   # not None: it stays
        part = unittest.mock.Mock()
        queue.begin_upload([part])
        self.assertIs(queue.next_task(wait=False), part)
        queue.end_upload()
        queue.performed(file_task)
        self.assertIsNone(queue.next_task(wait=False))

    def test_a_bug_in_the_next_file_still_finishes_the_waiting_one(self):
        log = []
        tasks = [self.Task(log, "a"), self.Task(log, "b", fails="perform"),
                 self.Task(log, "c")]
        thread, job, crashes, client = self.run_worker(tasks)
        self.finished(thread, tasks, client)
        self.assertEqual(log, ["perform a", "perform b", "finish a"])   # c: never taken
        self.assertEqual([str(exc) for exc in crashes], ["a bug in b"])
        self.assertTrue(job.queue.stopped)

    def test_a_bug_in_a_finish_still_finishes_the_next_file(self):
        log = []
        tasks = [self.Task(log, "a", fails="finish"), self.Task(log, "b")]
        thread, job, crashes, client = self.run_worker(tasks)
        self.finished(thread, tasks, client)
        self.assertEqual(log, ["perform a", "perform b", "finish a", "finish b"])
        self.assertEqual([str(exc) for exc in crashes], ["a bug in a"])
        self.assertTrue(job.queue.stopped)


class CutAnswers(unittest.TestCase):
    """An answer shorter than its Content-Length is a broken connection, never a short
    body taken for a whole one."""

    def answer(self, raw):
        """What Connection.exchange makes of a server that answers raw and closes."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve():
            client, _ = listener.accept()
            client.recv(65536)
            client.sendall(raw)
            client.close()
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        connection = s3push.Connection("http", "127.0.0.1", listener.getsockname()[1], 10)
        try:
            return connection.exchange("POST", "/k?uploadId=u", {"host": "h"}, b"")
        finally:
            connection.close()
            thread.join(10)
            listener.close()

    def test_a_body_shorter_than_its_length_is_a_broken_connection(self):
        for status in (200, 500):
            with self.assertRaises(s3push.AnswerError) as caught:
                self.answer(b"HTTP/1.1 %d X\r\nContent-Length: 400\r\n\r\n" % status +
                            b'<?xml version="1.0" encoding="UTF-8"?>\n' + b" " * 40)
            self.assertEqual(s3push.describe_os_error(caught.exception),
                             "the answer was cut short after 79 bytes")

    def test_whole_bodies_are_read(self):
        self.assertEqual(self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").body,
                         b"ok")
        self.assertEqual(self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").body,
                         b"")
        self.assertEqual(self.answer(b"HTTP/1.1 500 X\r\nConnection: close\r\n\r\nto the end")
                         .body, b"to the end")


class IdleConnections(unittest.TestCase):
    """A kept-alive connection that the server ended while it was idle (its keep-alive
    timeout: a FIN, or a 408 said unasked first) is not used again: the next request goes
    on a new one, and costs no retry."""

    def test_an_ended_connection_is_replaced(self):
        for parting in (b"", b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n"):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(2)
            self.addCleanup(listener.close)
            parted, ended = threading.Event(), threading.Event()

            def serve():
                for number in (1, 2):
                    client, _ = listener.accept()
                    with client:
                        client.recv(65536)
                        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d"
                                       % number)
                        if number == 1:
                            client.sendall(parting)
                            client.shutdown(socket.SHUT_WR)
                            parted.set()
                            try:
                                client.recv(1)   # until the client closes its end
                            except ConnectionResetError:
                                pass   # closed with the 408 unread: a reset
                            ended.set()
                        else:
                            client.recv(65536)   # until the client closes
            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            connection = s3push.Connection("http", "127.0.0.1", listener.getsockname()[1], 10)
            try:
                self.assertEqual(connection.exchange("GET", "/k", {"host": "h"}, b"").body,
                                 b"1")
                # The server's FIN (and its 408) are in before the next request.
                self.assertTrue(parted.wait(10))
                self.assertTrue(select.select([connection.sock], [], [], 10)[0])
                self.assertEqual(connection.exchange("GET", "/k", {"host": "h"}, b"").body,
                                 b"2", parting)
                self.assertTrue(ended.wait(10))
            finally:
                connection.close()
                thread.join(10)


class AnswerParsing(unittest.TestCase):
    """Connection reads answers itself: over one end of a socketpair, the test's server
    writing raw answers on the other."""

    def setUp(self):
        self.connection = s3push.Connection("http", "h", 80, 10)
        ours, self.server = socket.socketpair()
        ours.settimeout(10)   # as Connection.open sets it: a test that breaks does not hang
        self.connection.sock, self.connection.reader = ours, ours.makefile("rb")
        self.addCleanup(self.connection.close)
        self.addCleanup(self.server.close)

    def serve(self, raw, close=False):
        """The server writes raw (from a thread: it may be more than a socket holds), then
        closes its side if asked."""
        server = self.server   # this one: setUp() may make another pair meanwhile

        def write():
            select.select([server], [], [], 10)   # once the request came, as a server does
            server.sendall(raw)
            if close:
                server.shutdown(socket.SHUT_WR)
        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)

    def exchange(self, method="GET", body=b""):
        return self.connection.exchange(method, "/k", {"host": "h"}, body)

    def kept(self):
        return self.connection.sock is not None

    def test_the_request_is_one_head_and_its_body(self):
        self.serve(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.connection.exchange("PUT", "/k?a=b", {"host": "h", "x-amz-meta-n": "\xe9"}, b"abc")
        self.assertEqual(self.server.recv(65536), b"PUT /k?a=b HTTP/1.1\r\nhost: h\r\n"
                         b"x-amz-meta-n: \xe9\r\n\r\nabc")

    def test_a_header_that_would_smuggle_a_line_is_refused(self):
        for name, value in (("x-amz-meta-a", "1\r\nx-evil: 1"), ("x-amz-meta-a", "a\x00"),
                            ("x-a\nb", "1"), ("x-a:b", "1")):
            with self.assertRaises(ValueError) as caught:
                self.connection.exchange("PUT", "/k", {"host": "h", name: value}, b"")
            self.assertIn(name, str(caught.exception))
            self.assertNotIn(value, str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            self.connection.exchange("GET", "/k HTTP/1.1\r\nx: y", {"host": "h"}, b"")
        self.assertIn("in its target", str(caught.exception))
        self.server.setblocking(False)
        with self.assertRaises(BlockingIOError):   # nothing was sent
            self.server.recv(1)

    def test_folded_and_repeated_headers(self):
        self.serve(b"HTTP/1.1 200 OK\r\nX-A: one\r\n  two\r\nX-B: 1\r\nx-b: 2\r\n"
                   b"ETag:  \"e\" \r\nContent-Length: 2\r\n\r\nok")
        answer = self.exchange()
        self.assertEqual((answer.status, answer.reason, answer.body), (200, "OK", b"ok"))
        self.assertEqual(answer.headers, {"x-a": "one two", "x-b": "1, 2", "etag": '"e"',
                                          "content-length": "2"})
        self.assertTrue(self.kept())

    def test_a_head_read_at_once_or_line_by_line_gives_the_same_fields(self):
        head = (b"HTTP/1.1 200 OK\r\nX-A: one\r\n  two\r\nX-B: 1\r\nx-b: 2\r\n"
                b"ETag:  \"e\" \r\nContent-Length: 2\r\n\r\nok")
        expected = {"x-a": "one two", "x-b": "1, 2", "etag": '"e"', "content-length": "2"}
        server = self.server

        def trickle():   # a byte at a time: the head is never held whole
            select.select([server], [], [], 10)   # once the request came
            for byte in range(len(head)):
                server.sendall(head[byte:byte + 1])
                time.sleep(0.002)
        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.assertEqual(self.exchange().headers, expected)
        for raw in (head, head.replace(b"\r\n", b"\n"), head.replace(b"1\r\n", b"1\n")):
            self.setUp()   # a fresh pair: the whole answer at once, with bare LFs too
            self.serve(raw)
            answer = self.exchange()
            self.assertEqual((answer.headers, answer.body), (expected, b"ok"), raw)

    def test_interim_answers_without_end_are_an_error(self):
        final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        self.serve(b"HTTP/1.1 100 Continue\r\n\r\n" * s3push.MAX_INTERIM_ANSWERS + final)
        self.assertEqual(self.exchange().body, b"ok")
        self.setUp()
        self.serve(b"HTTP/1.1 100 Continue\r\n\r\n" * (s3push.MAX_INTERIM_ANSWERS + 1) + final)
        with self.assertRaises(s3push.AnswerError):
            self.exchange()

    def test_bytes_past_one_answer_are_the_next_answer(self):
        self.serve(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
                   b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\ntwo")
        self.assertEqual(self.exchange().body, b"one")
        second = self.exchange()
        self.assertEqual((second.status, second.reason, second.body), (404, "Not Found", b"two"))
        self.assertTrue(self.kept())

    def test_a_chunked_body(self):
        self.serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n"
                   b"5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nTrailer: t\r\n\r\n"
                   b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.exchange().body, b"Wikipedia in\r\n\r\nchunks.")
        self.assertEqual(self.exchange().status, 204)
        self.assertTrue(self.kept())

    def test_a_cut_body_is_an_error(self):
        chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc"
        for raw, read in ((b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 3),
                          (chunked + b"\r\n5\r\nab", 5), (chunked + b"\r\n", 3),
                          (chunked + b"de\r\n0\r\n\r\n", 3)):
            self.setUp()
            self.serve(raw, close=True)
            with self.assertRaises(s3push.AnswerError) as caught:
                self.exchange()
            self.assertIsInstance(caught.exception, OSError)   # S3Client.attempt retries it
            self.assertIn("the answer was cut short after %d bytes" % read,
                          s3push.describe_os_error(caught.exception))

    def test_a_cut_or_missing_head_is_an_error(self):
        for raw, said in ((b"", "closed the connection without an answer"),
                          (b"HTTP/1.1 200 OK\r\nETag: \"e\"\r\n", "cut short in its head"),
                          (b"SSH-2.0-OpenSSH\r\n", "not HTTP/1.x"),
                          (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "header lines"),
                          (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "bytes")):
            self.setUp()
            self.serve(raw, close=True)
            with self.assertRaises(s3push.AnswerError) as caught:
                self.exchange()
            self.assertIn(said, str(caught.exception))

    def test_connection_close_closes(self):
        self.serve(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.exchange().body, b"ok")
        self.assertFalse(self.kept())

    def test_interim_answers_are_skipped(self):
        self.serve(b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
                   b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        answer = self.exchange("PUT", b"abc")
        self.assertEqual((answer.status, answer.body), (200, b"ok"))
        self.assertNotIn("x-interim", answer.headers)
        self.assertTrue(self.kept())

    def test_http_1_0_closes_unless_kept_alive(self):
        self.serve(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok"
                   b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.exchange().body, b"ok")
        self.assertTrue(self.kept())
        self.assertEqual(self.exchange().body, b"ok")
        self.assertFalse(self.kept())

    def test_no_body_where_http_says_none(self):
        self.serve(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
                   b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"
                   b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.exchange("HEAD").body, b"")
        self.assertEqual(self.exchange().status, 304)
        self.assertEqual(self.exchange().status, 200)
        self.assertTrue(self.kept())

    def test_a_body_longer_than_the_limit_closes(self):
        size = s3push.MAX_ERROR_BODY + 1000
        self.serve(b"HTTP/1.1 500 X\r\nContent-Length: %d\r\n\r\n" % size + b"e" * size)
        self.assertEqual(self.exchange().body, b"e" * s3push.MAX_ERROR_BODY)
        self.assertFalse(self.kept())
        self.setUp()
        self.serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" +
                   b"%x\r\n" % s3push.MAX_ANSWER_BODY + b"a" * s3push.MAX_ANSWER_BODY +
                   b"\r\n1\r\nb\r\n0\r\n\r\n")
        self.assertEqual(self.exchange().body, b"a" * s3push.MAX_ANSWER_BODY)
        self.assertFalse(self.kept())

    def test_a_body_without_length_runs_to_the_end_and_closes(self):
        self.serve(b"HTTP/1.1 200 OK\r\n\r\nall of it", close=True)
        self.assertEqual(self.exchange().body, b"all of it")
        self.assertFalse(self.kept())


class GzipSpool(unittest.TestCase):
    """--compress: the spool is the gzip of the file as read, and what is not is refused."""

    def setUp(self):
        import gzip
        self.gzip = gzip
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.data = b"".join(b"line %d of a log\n" % i for i in range(200000))
        path = os.path.join(self.tmp, "app.log")
        with open(path, "wb") as handle:
            handle.write(self.data)
        self.fd = os.open(path, os.O_RDONLY)
        self.folder = os.open(self.tmp, os.O_RDONLY)
        self.addCleanup(os.close, self.fd)
        self.addCleanup(os.close, self.folder)

    def spool(self, level=6):
        spool, info, _ = s3push.gzip_file(self.fd, os.fstat(self.fd), "app.log",
                                          self.folder, level)
        self.addCleanup(os.close, spool)
        return spool, os.pread(spool, info.st_size, 0)

    def test_the_gzip_gunzips_to_the_file_and_is_the_same_each_time(self):
        spool, body = self.spool()
        self.assertEqual(self.gzip.decompress(body), self.data)
        self.assertEqual(body, self.spool()[1])   # a retry or a resumed part: same bytes
        self.assertLess(len(self.spool(9)[1]), len(self.spool(1)[1]))
        self.assertEqual(os.listdir(self.tmp), ["app.log"])   # spools have no name

    def test_a_spool_that_is_not_the_file_s_gzip_is_refused(self):
        spool, body = self.spool()
        crc = s3push.zlib.crc32(self.data)
        s3push.gunzip_check(spool, crc, len(self.data))
        for offset, flip in ((len(body) // 2, 0x01), (len(body) - 3, 0x7f), (3, 0x08)):
            changed = body[:offset] + bytes([body[offset] ^ flip]) + body[offset + 1:]
            os.pwrite(spool, changed, 0)
            with self.assertRaises(s3push.FileError):
                s3push.gunzip_check(spool, crc, len(self.data))
        os.pwrite(spool, body, 0)
        with self.assertRaises(s3push.FileError):   # the file read had other bytes
            s3push.gunzip_check(spool, crc ^ 1, len(self.data))
        os.pwrite(spool, body + b"x", 0)
        with self.assertRaises(s3push.FileError):   # anything after the trailer
            s3push.gunzip_check(spool, crc, len(self.data))

    def test_compressed_already_by_name_or_first_bytes(self):
        self.assertTrue(s3push.compressed_already(b"a.LOG.GZ"))
        self.assertFalse(s3push.compressed_already(b"a.log.1"))
        path = os.path.join(self.tmp, "head")
        for head, inside in ((b"\x1f\x8b\x08", True), (b"RIFF\0\0\0\0WEBPVP8", True),
                             (b"\0\0\0\x18ftypisom", True), (b"plain text", False),
                             (b"", False)):
            with open(path, "wb") as handle:
                handle.write(head)
            fd = os.open(path, os.O_RDONLY)
            try:
                self.assertEqual(s3push.compressed_inside(fd), inside, head)
            finally:
                os.close(fd)


class PartsAndRetries(unittest.TestCase):
    MIB = 1024 * 1024

    def test_part_size_grows_to_fit_ten_thousand_parts(self):
        self.assertEqual(s3push.part_size_for(100 * self.MIB, 16 * self.MIB), 16 * self.MIB)
        five_tib = 5 * 1024 ** 4
        size = s3push.part_size_for(five_tib, 5 * self.MIB)
        self.assertLessEqual(-(-five_tib // size), 10000)
        self.assertEqual(size % self.MIB, 0)
        self.assertEqual(s3push.part_size_for(1, 1), 5 * self.MIB)

    def test_part_ranges(self):
        self.assertEqual(s3push.part_ranges(12, 5), [(1, 0, 5), (2, 5, 5), (3, 10, 2)])
        self.assertEqual(s3push.part_ranges(10, 5), [(1, 0, 5), (2, 5, 5)])

    def test_sizes(self):
        for text, value in (("123", 123), ("8M", 8 * self.MIB), ("8MiB", 8 * self.MIB),
                            ("1.5g", 3 * 512 * self.MIB), ("64 KB", 65536)):
            self.assertEqual(s3push.size_argument(text), value, text)
        for bad in ("", "M", "-1", "1X"):
            with self.assertRaises(argparse.ArgumentTypeError, msg=bad):
                s3push.size_argument(bad)
        with self.assertRaises(argparse.ArgumentTypeError):
            s3push.part_size_argument("4MiB")

    def test_backoff(self):
        self.assertEqual(s3push.backoff_delay(0, "", 0.0), 0.0)
        self.assertAlmostEqual(s3push.backoff_delay(0, "", 0.5), 0.1)
        self.assertAlmostEqual(s3push.backoff_delay(3, "", 0.999), 0.999 * 1.6)
        self.assertEqual(s3push.backoff_delay(30, "", 0.5), 10.0, "capped at 20 s")
        self.assertEqual(s3push.backoff_delay(5000, "", 0.5), 10.0, "--retries 5000")
        self.assertEqual(s3push.backoff_delay(0, "3", 0.5), 3.0, "Retry-After wins")
        self.assertEqual(s3push.backoff_delay(0, "9999", 0.5), 60.0)

    def test_retryable_answers(self):
        def answer(status, code=""):
            body = ("<Error><Code>%s</Code></Error>" % code).encode() if code else b""
            return s3push.Response(status, "", {}, body)
        for status, code in ((500, ""), (503, "SlowDown"), (429, ""), (400, "RequestTimeout"),
                             (400, "BadDigest")):
            self.assertTrue(s3push.is_retryable(answer(status, code)), (status, code))
        for status, code in ((200, ""), (403, "AccessDenied"), (400, "KeyTooLongError"),
                             (404, "NoSuchBucket"), (501, "NotImplemented")):
            self.assertFalse(s3push.is_retryable(answer(status, code)), (status, code))

    def test_complete_answer_with_an_error_inside_a_200(self):
        body = b"   \n<Error><Code>InternalError</Code><Message>m</Message></Error>"
        with self.assertRaises(s3push.TemporaryError):
            s3push.check_answer(s3push.Response(200, "OK", {}, body), "completing")
        s3push.check_answer(s3push.Response(200, "OK", {}, b"<CompleteMultipartUploadResult>"
                                            b"<ETag>x</ETag></CompleteMultipartUploadResult>"),
                            "completing")

    def test_only_a_complete_result_proves_a_multipart_object(self):
        def answer(body):
            return s3push.Response(200, "OK", {}, body)
        for body in (b"", b'<?xml version="1.0" encoding="UTF-8"?>\n   ',
                     b"<html><body>OK</body></html>",
                     b"<CompleteMultipartUpload><Part><ETag>e</ETag></Part>"
                     b"</CompleteMultipartUpload>"):
            with self.assertRaises(s3push.TemporaryError, msg=body):   # retried
                s3push.check_complete_result(answer(body))
        s3push.check_complete_result(answer(   # an <Error> is check_answer's to raise
            b"<Error><Code>InternalError</Code></Error>"))
        s3push.check_complete_result(answer(
            b'<CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            b"<ETag>&quot;e-2&quot;</ETag></CompleteMultipartUploadResult>"))

    def test_a_complete_result_proves_by_its_etag(self):
        def proof(etag_xml, etag, verify_md5=True, key=b"k"):
            root = s3push.parse_xml(b"<CompleteMultipartUploadResult><Key>%s</Key>%s"
                                    b"</CompleteMultipartUploadResult>" % (key, etag_xml))
            return s3push.MD5.proof(root, s3push.Response(200, "OK", {}, b""), "k", "ab-2",
                                    etag, s3push.Sending({}, {}, verify_md5, False))
        self.assertEqual(proof(b"<ETag>ab-2</ETag>", "ab-2").etag, "ab-2")
        with self.assertRaises(s3push.FileError):   # another object
            proof(b"<ETag>cd-2</ETag>", "cd-2")
        self.assertEqual(proof(b"<ETag>kms</ETag>", "kms", verify_md5=False).etag, "kms")
        for verify_md5 in (True, False):   # no ETag at all: nothing is proved
            with self.assertRaises(s3push.FileError):
                proof(b"", "", verify_md5)
        self.assertEqual(proof(b"<ETag></ETag>", "").etag, "")   # Ceph RGW 16.2's answer
        for empty in (b"<ETag></ETag>", b"<ETag/>", b"<ETag>&quot;&quot;</ETag>"):
            with self.assertRaises(s3push.FileError):   # but not for another key, or none
                proof(empty, "", key=b"other")


class SilenceRule(unittest.TestCase):
    """SilenceWatch: timeouts one after another for twice --timeout, with no answer
    between, make the endpoint silent; an answer or a reset ends the count."""
    WHERE = "http://127.0.0.1:9"

    def test_timeouts_over_twice_the_timeout_without_an_answer(self):
        watch = s3push.SilenceWatch(2)
        self.assertIsNone(watch.failed(socket.timeout(), self.WHERE, "k"))   # 2 s: retried
        watch.since -= 1.9   # 3.9 s of timeouts
        self.assertIsNone(watch.failed(socket.timeout(), self.WHERE, "k"))
        watch.since -= 0.2
        error = watch.failed(socket.timeout(), self.WHERE, "k")
        self.assertIsInstance(error, s3push.UnreachableError)
        self.assertTrue(error.fatal)
        self.assertEqual(error.exit_code, 75)
        self.assertIn("no answer from http://127.0.0.1:9 for 4 s", str(error))
        self.assertIn("(--timeout 2s)", str(error))
        with self.assertRaises(s3push.UnreachableError):   # nothing more is sent
            watch.check()
        self.assertTrue(watch.stopped.is_set())   # a wait before a retry ends
        self.assertIsNotNone(watch.failed(OSError("reset"), self.WHERE, "k"))

    def test_an_answer_or_a_reset_ends_the_count(self):
        watch = s3push.SilenceWatch(2)
        for ending in (watch.answered, lambda: watch.failed(ConnectionResetError(), "", "k")):
            watch.failed(socket.timeout(), self.WHERE, "k")
            watch.since -= 10
            ending()
            self.assertIsNone(watch.failed(socket.timeout(), self.WHERE, "k"))
        watch.check()

    def test_a_gateways_502_or_504_is_unanswered_from_its_own_time(self):
        watch = s3push.SilenceWatch(2)

        def got(status, key="k", request_id=None):
            return watch.got(argparse.Namespace(status=status, header=lambda name: {
                "x-amz-request-id": request_id}.get(name)), self.WHERE, key)
        for other in (200, 403, 500, 503):   # the endpoint answered, however it did
            got(504)
            watch.since -= 10
            self.assertIsNone(got(other))
            self.assertIsNone(watch.since)
        got(502)   # the endpoint's own 502 or 504 is an answer
        watch.since -= 10
        self.assertIsNone(got(504, "other", request_id="4442587FB7D0A2F9"))
        self.assertIsNone(watch.since)
        self.assertIsNone(got(502))
        self.assertGreater(watch.since, time.monotonic() - 1)   # not backdated a --timeout
        watch.since -= 10
        self.assertIsNone(got(504))   # one key alone: that file's failure
        watch.given_up("k")   # and once given up, out of the count
        self.assertIsNone(watch.since)
        self.assertIsNone(got(502, "next"))
        watch.since -= 10
        self.assertIsNone(got(502, "next"))
        watch.since += 6.1   # 3.9 s of gateway answers
        self.assertIsNone(got(504, "other"))
        watch.given_up("gone")   # a key not counted: nothing changes
        self.assertEqual(watch.keys, {"next", "other"})
        watch.since -= 0.2
        error = got(502, "third")
        self.assertIsInstance(error, s3push.UnreachableError)
        self.assertIn("no answer from http://127.0.0.1:9 for 4 s", str(error))
        self.assertIn("a gateway's 502 or 504", str(error))

    def test_counted_from_the_last_answer_at_the_earliest(self):
        watch = s3push.SilenceWatch(2)
        watch.answered()   # while the request that times out now was waiting
        watch.heard += 1
        watch.failed(socket.timeout(), self.WHERE, "k")
        self.assertEqual(watch.since, watch.heard)

    def test_requests_in_flight_end_at_once(self):
        watch = s3push.SilenceWatch(2)
        waiting, server = socket.socketpair()
        self.addCleanup(waiting.close)
        self.addCleanup(server.close)
        client, idle = s3push.S3Client(None, watch=watch), s3push.S3Client(None, watch=watch)
        client.connection = argparse.Namespace(sock=waiting)
        read = []
        reader = threading.Thread(target=lambda: read.append(waiting.recv(10)))
        reader.start()
        watch.failed(socket.timeout(), self.WHERE, "k")
        watch.since -= 5
        watch.failed(socket.timeout(), self.WHERE, "k")
        reader.join(5)
        self.assertEqual(read, [b""], "the request in flight was not cut")


class ManifestLines(unittest.TestCase):
    def test_where_the_last_whole_line_ends(self):
        block = s3push.BLOCK_BYTES
        for data, end in ((b"", 0), (b"a\n", 2), (b"a\nb", 2), (b"torn", 0),
                          (b"a\n" + b"x" * (2 * block + 5), 2),   # a tail over two blocks
                          (b"x" * block + b"\n" + b"y" * (block - 1), block + 1)):
            with tempfile.TemporaryFile() as handle:
                handle.write(data)
                handle.flush()
                self.assertEqual(s3push.whole_lines_end(handle.fileno(), len(data)), end,
                                 data[:20])

    def test_a_line_s_run(self):
        for line, run in ((b'{"run": "r1", "key": "k"}\n', "r1"), (b'{"key": "k"}\n', ""),
                          (b'{"run": "r1", "ke\n', None), (b"[1, 2]\n", None),
                          (b"[" * 100000 + b"\n", None), (b"\xff\n", None)):
            self.assertEqual(s3push.line_run(line), run, line[:20])


class Journals(unittest.TestCase):
    HEADER = (b'{"s3push_journal": 1, "key": "k", "upload_id": "u", "part_size": 5, '
              b'"headers": "h", "file": [1, 2, 3, 4], "steps": [], "name": "f", "created": 1.5}\n')
    PART = b'{"part": %d, "offset": 0, "length": 5, "md5": "00ff", "etag": "\\"e\\""}\n'

    def test_a_whole_journal(self):
        header, parts = s3push.parse_journal(self.HEADER + self.PART % 1 + self.PART % 2)
        self.assertEqual(header["upload_id"], "u")
        self.assertEqual(parts[2], s3push.JournalPart(0, 5, "00ff", '"e"'))

    def test_without_md5_crc32_uploads_still_keep_journals(self):
        # Where FIPS forbids MD5 (new_md5 gives None), only MD5 parts cannot be checked.
        tally = s3push.Report()
        opts = argparse.Namespace(resume_days=7, state_dir=tempfile.mkdtemp(), verbose=False,
                                  source="/src")
        self.addCleanup(shutil.rmtree, opts.state_dir)
        state = s3push.open_state_folder(opts.state_dir)
        self.addCleanup(os.close, state.fd)
        pair = s3push.pair_folder(state.path, opts.source, s3push.Destination("b", "p/"))
        real = s3push.new_md5
        s3push.new_md5 = lambda: None
        try:
            crc32, md5 = s3push.CHECKSUMS["crc32"], s3push.MD5
            self.assertIsNotNone(s3push.journals_for(opts, pair, state, tally, crc32))
            self.assertIsNone(s3push.journals_for(opts, pair, state, tally, md5))
        finally:
            s3push.new_md5 = real
        self.assertIsNotNone(s3push.journals_for(opts, pair, state, tally, md5))

    def test_a_crc32_journal(self):
        header = self.HEADER.replace(b'"created"', b'"checksum": "crc32", "created"')
        part = (self.PART % 1).replace(b'"md5": "00ff"', b'"crc32": "3610a686"')
        loaded, parts = s3push.parse_journal(header + part)
        self.assertEqual(loaded["checksum"], "crc32")
        self.assertEqual(parts[1].check_hex, "3610a686")
        self.assertEqual(s3push.parse_journal(self.HEADER)[0]["checksum"], "md5")
        for bad in (header + self.PART % 1, header.replace(b"crc32", b"sha1")):
            with self.assertRaises((ValueError, KeyError), msg=bad):
                s3push.parse_journal(bad)

    def test_a_last_line_cut_short_was_never_written(self):
        text = self.HEADER + self.PART % 1 + (self.PART % 2)[:-9]
        self.assertEqual(sorted(s3push.parse_journal(text)[1]), [1])
        self.assertEqual(s3push.parse_journal(self.HEADER)[1], {})

    def test_what_is_not_a_journal(self):
        for text in (b"", self.HEADER[:-9], b"[]\n", self.HEADER.replace(b": 1,", b": 2,"),
                     self.HEADER.replace(b'"u"', b"7"), self.HEADER + b"garbage\n",
                     self.HEADER + (self.PART % 1).replace(b"00ff", b"xyz"),
                     self.HEADER + b'{"part": 1}\n', b"\xff\n"):
            with self.assertRaises((ValueError, KeyError, TypeError), msg=text):
                s3push.parse_journal(text)

    def test_the_state_folder(self):
        self.assertEqual(s3push.default_state_dir({"XDG_STATE_HOME": "/s", "HOME": "/h"}),
                         "/s/s3push")
        self.assertEqual(s3push.default_state_dir({"XDG_STATE_HOME": "rel", "HOME": "/h"}),
                         "/h/.local/state/s3push")
        self.assertIsNone(s3push.default_state_dir({"HOME": ""}))

    def test_a_state_folder_inside_the_source_is_a_usage_error(self):
        options = argparse.Namespace(source="/src", **{attribute: None for attribute, _
                                                       in s3push.OUTPUT_FILES})
        selection = s3push.Selection(s3push.DEFAULT_EXCLUDES + ("skip",))
        for inside in ("/src", "/src/state", "/src/a/../state", "/src/a.log/state"):
            with self.assertRaises(s3push.UsageError, msg=inside):
                s3push.check_outside_scan(options, selection, inside)
        for outside in (None, "/", "/srcx", "/src/..", "/src/.local/state/s3push",
                        "/src/a/../..src", "/src/skip/state", "/src/a/skip"):
            s3push.check_outside_scan(options, selection, outside)   # never scanned

    def test_a_file_of_the_runs_own_inside_the_source_is_a_usage_error(self):
        selection = s3push.Selection(s3push.DEFAULT_EXCLUDES + ("*.log", "skip"),
                                     ("*.csv", "*.json"))
        for attribute, option in s3push.OUTPUT_FILES:
            for path, refused in (("/src/moved.json", True), ("/src/a/b/moved.json", True),
                                  ("/src/run.log", False), ("/src/.moved.json", False),
                                  ("/src/.d/moved.json", False), ("/src/moved.txt", False),
                                  ("/src/skip/moved.json", False), ("/srcx/moved.json", False),
                                  ("/out/moved.json", False)):
                options = argparse.Namespace(source="/src", **{a: None for a, _
                                                               in s3push.OUTPUT_FILES})
                setattr(options, attribute, path)
                if not refused:
                    s3push.check_outside_scan(options, selection, None)
                    continue
                with self.assertRaises(s3push.UsageError, msg=path) as caught:
                    s3push.check_outside_scan(options, selection, None)
                self.assertIn("the file %s (%s) is inside SOURCE_DIR" % (path, option),
                              str(caught.exception))


class Templates(unittest.TestCase):
    def test_expand(self):
        import datetime
        upload = datetime.datetime(2026, 11, 24, 6, 5, tzinfo=datetime.timezone.utc)
        mtime = datetime.datetime(2025, 1, 2, 3, tzinfo=datetime.timezone.utc).timestamp()
        self.assertEqual(s3push.expand_template("logs/{hostname}/{date}/{hour}/{mtime_year}/"
                                                "{mtime_month}-{mtime_day}/", "web1", upload,
                                                mtime),
                         "logs/web1/2026-11-24/06/2025/01-02/")
        self.assertEqual(s3push.expand_template("plain/", "h", upload, mtime), "plain/")

    def test_unknown(self):
        with self.assertRaisesRegex(s3push.UsageError, r"unknown placeholder \{when\}"):
            s3push.parse_destination("s3://bucket/{when}/")
        with self.assertRaisesRegex(s3push.UsageError, r"unknown placeholder \{name\}"):
            s3push.check_template("{name}", "--metadata")   # the key's alone

    def test_whole_key_templates(self):
        import datetime
        prefix = s3push.parse_destination("s3://bucket/logs/{hostname}/")
        self.assertEqual((prefix.prefix, prefix.whole_key), ("logs/{hostname}/", False))
        whole = s3push.parse_destination(
            "s3://bucket/{hostname}/{mtime_date}/{dir}/{stem}.{mtime_epoch}{ext}")
        self.assertTrue(whole.whole_key)
        template = s3push.Template(whole.prefix, whole_key=True)
        template.hostname = "web1"
        template.upload_time = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
        mtime = 1700000000 * 10 ** 9 + 5
        info = s3push.ScanStat(1, 77, 5, mtime, mtime)
        directory = s3push.Directory("app/", (("app", 1, 2),))
        self.assertEqual(template.key_for(s3push.Found(directory, "app.log.1", info)),
                         "web1/2023-11-14/app/app.log.1700000000.1")
        top = s3push.Found(s3push.Directory("", ()), "{size}.log", info)   # never expanded
        self.assertEqual(template.key_for(top), "web1/2023-11-14/{size}.1700000000.log")
        sized = s3push.Template("{path}-{size}-{inode}", whole_key=True)
        self.assertEqual(sized.key_for(s3push.Found(directory, "x", info)), "app/x-5-77")

    def test_templates_fill_in_the_escaped_name(self):
        info = s3push.ScanStat(1, 77, 5, -1500000000, -1500000000)   # 1969-12-31T23:59:58.5
        odd = s3push.Found(s3push.Directory(os.fsdecode(b"d\xff/"), ()),
                           os.fsdecode(b"caf\xe9.csv"), info)
        parts = s3push.Template("{dir}|{name}|{stem}|{ext}|{path}|{mtime_epoch}",
                                whole_key=True)
        self.assertEqual(parts.key_for(odd), "d\u201bFF|caf\u201bE9.csv|caf\u201bE9|.csv|"
                                             "d\u201bFF/caf\u201bE9.csv|-2")
        self.assertEqual(s3push.Template("p/").key_for(odd), "p/d\u201bFF/caf\u201bE9.csv")
        # A U+201B of the name doubled once, whatever the key goes through next.
        marked = s3push.Found(s3push.Directory("d\u201b/", ()), "a\u201bE9.log", info)
        self.assertEqual(parts.key_for(marked), "d\u201b\u201b|a\u201b\u201bE9.log|"
                         "a\u201b\u201bE9|.log|d\u201b\u201b/a\u201b\u201bE9.log|-2")
        key = s3push.Template("p/").key_for(marked)
        self.assertEqual(key, "p/d\u201b\u201b/a\u201b\u201bE9.log")
        self.assertEqual(s3push.gzip_key(key), key + ".gz")
        self.assertEqual(list(s3push.candidate_keys(key, "number"))[:2],
                         [key, "p/d\u201b\u201b/a\u201b\u201bE9.1.log"])

    def test_the_key_limit_is_the_key_s(self):
        info = s3push.ScanStat(1, 77, 5, -1500000000, -1500000000)   # 1969-12-31T23:59:58.5
        deep = s3push.Directory("d" * 1100 + "/", ())
        named = s3push.Template("t/{mtime_date}/{name}", whole_key=True)
        self.assertEqual(named.key_for(s3push.Found(deep, "f", info)), "t/1969-12-31/f")
        whole = s3push.Template("t/{path}", whole_key=True)
        with self.assertRaisesRegex(s3push.FileError, "the key would be 1104 bytes"):
            whole.key_for(s3push.Found(deep, "f", info))

    def test_mtime_placeholders_from_whole_seconds(self):
        # 2023-11-14T23:59:59.999999999: as a float it is the next day.
        mtime = 1700006399999999999
        info = s3push.ScanStat(1, 77, 5, mtime, mtime)
        template = s3push.Template("{mtime_date}/{mtime_hour}/")
        self.assertEqual(template.key_for(s3push.Found(s3push.Directory("", ()), "f", info)),
                         "2023-11-14/23/f")


class ProxyRules(unittest.TestCase):
    def test_no_proxy_matching(self):
        rules = ["example.com", ".internal", "10.0.0.1", "s3.local:9000"]
        for host, port, expected in (("example.com", 443, True), ("a.example.com", 80, True),
                                     ("badexample.com", 80, False), ("x.internal", 1, True),
                                     ("10.0.0.1", 9000, True), ("s3.local", 9000, True),
                                     ("s3.local", 443, False), ("other", 80, False)):
            self.assertEqual(s3push.bypasses_proxy(host, port, rules), expected, host)
        self.assertTrue(s3push.bypasses_proxy("anything", 1, ["*"]))

    def test_proxy_for(self):
        proxies = s3push.proxy_settings({"HTTPS_PROXY": "http://u:p%40w@proxy:3128",
                                         "no_proxy": "localhost"})
        self.assertEqual(s3push.proxy_for(proxies, "https", "s3.amazonaws.com", 443),
                         ("proxy", 3128, "Basic dTpwQHc="))
        self.assertIsNone(s3push.proxy_for(proxies, "http", "s3.amazonaws.com", 80))
        self.assertIsNone(s3push.proxy_for(proxies, "https", "localhost", 443))
        with self.assertRaises(s3push.ConfigError) as caught:
            s3push.proxy_for({"https": "socks5://u:secret@p:1"}, "https", "h", 443)
        self.assertNotIn("secret", str(caught.exception))


if __name__ == "__main__":
    unittest.main()

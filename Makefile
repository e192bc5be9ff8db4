# The newcomer's entry point.  `make test` installs everything the tests need and runs them all.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: all compile debug test-deps test quicktest lint bench clean

all: compile

compile:            ## build the Cython parser in place (editable install)
	MSILO_BUILD_CYTHON_ALWAYS=1 $(PIP) install -q -e '.[test]'

debug:              ## debug build: annotate HTML, line tracing, invariant checks
	MSILO_DEBUG=1 $(PIP) install -q -e '.[test]'

# Debian packages the tests drive, as command:package (a missing command installs its
# package): sipp, sipsak, dnsmasq (SRV), baresip and linphonec (real clients), stdbuf (their
# line-buffered output), ip and nft (a NAT in network namespaces), promtool (alert rules and
# dashboard queries), sngrep (reads our HEP export), systemd-analyze (the unit file),
# chromium (the browser tests, driven by Playwright's Python package: no browser download)
# and npm (the JsSIP and SIP.js those tests load, pinned in tests/clients/web),
# mariadbd and mariadb-install-db (the MySQL backend's tests start a throwaway MariaDB).
# Not kamailio: no test runs it (tests/test_migrate.py reads bench/e2e/kamailio.cfg, the
# schema tests write Kamailio's DDL themselves); bench/e2e installs it when it runs it.
TEST_TOOLS = sipp:sip-tester sipsak:sipsak dnsmasq:dnsmasq-base baresip:baresip-core \
             linphonec:linphone-cli stdbuf:coreutils ip:iproute2 nft:nftables \
             promtool:prometheus sngrep:sngrep systemd-analyze:systemd \
             chromium:chromium npm:npm mariadbd:mariadb-server mariadb-install-db:mariadb-server
WEB_TESTS = tests/clients/web

test-deps:          ## Python test dependencies, the Debian tools the tests drive (when missing), npm packages
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PIP) install -q -e '.[test]'
	@missing=""; for pair in $(TEST_TOOLS); do \
	    command -v "$${pair%%:*}" >/dev/null || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	    if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	        missing=$$(printf '%s\n' $$missing | sort -u | tr '\n' ' '); \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	    else \
	        echo "install these Debian packages:$$missing"; exit 1; \
	    fi; \
	fi
	cd $(WEB_TESTS) && npm ci --loglevel=error   # exactly the lock file's versions

test: test-deps     ## install the test dependencies and run the whole suite
	$(PYTHON) -m pytest

quicktest:          ## run the suite without installing anything
	$(PYTHON) -m pytest -x -q

lint:
	ruff check .
	ruff format --check msilo tests bench tools

# bench runs this checkout in place (PYTHONPATH), whatever msilo is installed: it never
# reinstalls the package, so a user's install stays as it was.
BENCH_ENV = PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}

bench:              ## micro and storage benchmarks (slow; not part of the test suite)
	$(PIP) install -q 'pytest-benchmark>=4' 'sippy>=2.0'
	MSILO_BUILD_CYTHON_ALWAYS=1 $(PYTHON) setup.py -q build_ext --inplace
	$(BENCH_ENV) $(PYTHON) -m pytest bench/bench_parse.py bench/bench_build.py --benchmark-only -p no:cacheprovider
	$(BENCH_ENV) $(PYTHON) bench/bench_store.py --dsn $${MSILO_BENCH_DSN:-postgres://postgres@127.0.0.1:5432/postgres}

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks
	rm -f msilo/*.so msilo/*.c msilo/*.html

.PHONY: bench-e2e
bench-e2e:          ## end-to-end msilo vs Kamailio (sipp, PostgreSQL on 127.0.0.1); ARGS=--quick for a smoke run
	$(PYTHON) -m bench.e2e $(ARGS)

# Set-up is the project's job: `make serve` and `make test` on a fresh Debian 12 machine
# install what they need (Debian packages, a venv built from /usr/bin/python3) and run.
#
# The venv must be made from /usr/bin/python3: nbdkit's Python plugin embeds Debian's
# libpython3.11, so everything the plugin imports (our package, the cffi extension)
# has to be importable by that interpreter (README.md, first section; docs/serving.md).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# Debian packages: build (gcc, headers, cffi), serving (nbdkit + python plugin) and the
# real clients the tests drive (libnbd, qemu-img/qemu-io, fio, nbdfuse, e2fsprogs, libfiu,
# strace), the sanitizer runtimes the ASan/UBSan and TSan builds load (tests/test_tsan.py,
# tests/test_corrupt.py; they fail instead of skipping without them under CI), TLS tools
# (gnutls-bin: psktool, certtool), systemd-socket-activate, and GlusterFS (a single-node
# volume the scale-out tests mount twice as two "hosts", tests/glusterfs.py).
DEB_PACKAGES := python3-venv python3-dev python3-cffi python3-setuptools python3-pip gcc make \
	nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin qemu-utils fio fiu-utils \
	fuse3 e2fsprogs util-linux strace libasan8 libubsan1 libtsan2 gnutls-bin systemd \
	glusterfs-server glusterfs-client

.PHONY: venv test test-long serve bench bench-shared clean deps lint

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "need root to install: $$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml cffi_build.py $(wildcard btt_core/*.c btt_core/*.h)
	@$(MAKE) --no-print-directory deps
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

# The gates CI runs before the tests (.ci/run): ruff (pyflakes, pycodestyle, bugbear, isort)
# and mypy, configured in pyproject.toml. Versions are pinned so a finding means the code
# changed, not the linter.
LINT_TOOLS := ruff==0.17.6 mypy==2.4.1

lint: venv
	@$(PY) -c "import ruff, mypy" 2>/dev/null || $(PY) -m pip install -q $(LINT_TOOLS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: venv
	PATH=/usr/bin:$$PATH $(PY) -m pytest $(PYTEST_ARGS)

test-long: venv
	PATH=/usr/bin:$$PATH BTT_LONG=1 $(PY) -m pytest -m "long or not long" $(PYTEST_ARGS)

serve: venv
	PATH=/usr/bin:$$PATH $(VENV)/bin/bttctl serve $(ARGS)

bench: venv
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q 'matplotlib>=3.6'
	PATH=/usr/bin:$$PATH $(PY) tools/bench.py $(ARGS)

# The BTT against nbdkit's file plugin on a shared file system (a single-node GlusterFS
# volume it makes and removes, as root; ARGS="--dir DIR" for one you mounted): ratios in
# docs/bench/shared.md, cited by docs/scale-out.md.
bench-shared: venv
	PATH=/usr/bin:$$PATH $(PY) tools/bench_shared.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info btt_core/_btt_cffi*.so btt_core/_btt_cffi*.c .pytest_cache .hypothesis

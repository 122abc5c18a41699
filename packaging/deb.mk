# Debian package targets (included by the top Makefile).
#   make deb-deps          install the packaging tools that are missing
#   make deb               dist/pushrelay_<version>_amd64.deb
#   make deb-lint          cheap checks: unit verify + security score, nginx -t
#                          on the snippets, example config; then lintian
#   make deb-check         everything, including the install / upgrade / purge
#                          test in a debootstrap root
#   make bench-subscribers nginx memory per idle EventSource subscriber

DEB_TOOLS := lintian:lintian systemd-analyze:systemd debootstrap:debootstrap \
	go-md2man:go-md2man dpkg-deb:dpkg nginx:nginx-light strace:strace
DEB_VERSION ?= $(shell packaging/debversion.sh $(VERSION))
DEB_FILE := dist/pushrelay_$(DEB_VERSION)_amd64.deb

.PHONY: deb deb-deps deb-lint deb-check bench-subscribers

deb-deps:
	@need=""; for t in $(DEB_TOOLS); do command -v $${t%%:*} >/dev/null || need="$$need $${t#*:}"; done; \
	[ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || need="$$need libnginx-mod-nchan"; \
	if [ -n "$$need" ]; then \
		echo "deb-deps: installing$$need"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$need >/dev/null; \
	fi

deb: deb-deps
	VERSION='$(VERSION)' DEB_VERSION='$(DEB_VERSION)' GO='$(GO)' bash packaging/build-deb.sh

deb-lint: deb-deps build
	PUSHRELAY_BIN=$(CURDIR)/bin/pushrelay PUSHRELAY_LINTIAN=1 $(GO) test -count=1 -timeout 10m -v ./packaging/

deb-check: deb-deps build
	PUSHRELAY_BIN=$(CURDIR)/bin/pushrelay PUSHRELAY_LINTIAN=1 PUSHRELAY_DEB_INSTALL_TEST=1 \
		$(GO) test -count=1 -timeout 20m -v ./packaging/

# no-nchan (nginx alone holding the same request, via the echo module)
# shows nginx's own share of the cost.
bench-subscribers: deb-deps
	@[ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ] || { \
		export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q --no-install-recommends libnginx-mod-http-echo >/dev/null; }
	$(GO) build -o bin/idlesubs ./integration/cmd/idlesubs
	bin/idlesubs -n 10000 -variants untuned,shipped,no-nchan
	bin/idlesubs -n 10000 -channels 1 -variants untuned,shipped,no-nchan
	bin/idlesubs -n 10000 -channels 1 -variants no-nchan -extra 'request_pool_size 512;'

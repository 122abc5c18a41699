# nginx with the HTTP Push Stream module, for the tests (included by the top
# Makefile). Debian ships Nchan but not Push Stream, so the integration and
# packaging tests run Push Stream on nginx 1.26.3 + nginx-push-stream-module
# 0.6.0 built statically from the pinned tarballs in ../shared/vendor.
#   make pushstream   build into .build/pushstream/ (ignored by git), or
#                     reuse the build when its inputs are unchanged
# Without ../shared/vendor nothing is built and the Push Stream tests skip.

PUSHSTREAM_VENDOR ?= $(abspath $(CURDIR)/../shared/vendor)
PUSHSTREAM_BUILD  := $(CURDIR)/.build/pushstream
PUSHSTREAM_NGINX_VERSION := 1.26.3
PUSHSTREAM_VERSION := 0.6.0
PUSHSTREAM_CONFIGURE := --with-http_stub_status_module
# This file is the recipe: a change to it rebuilds.
PUSHSTREAM_MK := $(lastword $(MAKEFILE_LIST))

.PHONY: pushstream pushstream-clean

# The stamp holds every input: the tarballs' checksums, the configure flags
# and this recipe's checksum. A build whose stamp matches is reused (~20 s
# saved per `make test`); anything else rebuilds from fresh sources.
pushstream: deps
	@set -euo pipefail; \
	v='$(PUSHSTREAM_VENDOR)'; b='$(PUSHSTREAM_BUILD)'; \
	ngx=nginx-$(PUSHSTREAM_NGINX_VERSION).tar.gz; mod=nginx-push-stream-module-$(PUSHSTREAM_VERSION).tar.gz; \
	[ -f "$$v/SHA256SUMS" ] || { echo "pushstream: $$v/SHA256SUMS not found: nothing to build, Push Stream tests will skip"; exit 0; }; \
	(cd "$$v" && grep -E " ($$ngx|$$mod)\$$" SHA256SUMS | sha256sum --check --quiet --strict -) || \
		{ echo "pushstream: checksum mismatch in $$v" >&2; exit 1; }; \
	[ "$$(grep -cE " ($$ngx|$$mod)\$$" "$$v/SHA256SUMS")" = 2 ] || \
		{ echo "pushstream: $$v/SHA256SUMS does not list $$ngx and $$mod" >&2; exit 1; }; \
	key="$$(grep -E " ($$ngx|$$mod)\$$" "$$v/SHA256SUMS"; echo 'configure $(PUSHSTREAM_CONFIGURE)'; sha256sum < '$(PUSHSTREAM_MK)')"; \
	if [ -x "$$b/nginx/sbin/nginx" ] && [ "$$(cat "$$b/stamp" 2>/dev/null)" = "$$key" ]; then \
		echo "pushstream: up to date ($$b/nginx/sbin/nginx)"; exit 0; fi; \
	echo "pushstream: building nginx $(PUSHSTREAM_NGINX_VERSION) + push-stream $(PUSHSTREAM_VERSION) in $$b"; \
	rm -rf "$$b"; mkdir -p "$$b/src"; \
	tar -xzf "$$v/$$ngx" -C "$$b/src"; tar -xzf "$$v/$$mod" -C "$$b/src"; \
	src="$$(dirname "$$(find "$$b/src" -maxdepth 3 -path '*/auto/configure' -print -quit)")"; src="$${src%/auto}"; \
	psd="$$(dirname "$$(find "$$b/src" -maxdepth 2 -name config -path '*push-stream*' -print -quit)")"; \
	[ -x "$$src/auto/configure" ] && [ -f "$$psd/config" ] || { echo "pushstream: unexpected tarball layout under $$b/src" >&2; exit 1; }; \
	cd "$$src" && ./auto/configure --prefix="$$b/nginx" --add-module="$$psd" $(PUSHSTREAM_CONFIGURE) > "$$b/configure.log" 2>&1 || \
		{ tail -20 "$$b/configure.log" >&2; exit 1; }; \
	make -j2 > "$$b/make.log" 2>&1 && make install >> "$$b/make.log" 2>&1 || { tail -30 "$$b/make.log" >&2; exit 1; }; \
	"$$b/nginx/sbin/nginx" -v; \
	printf '%s\n' "$$key" > "$$b/stamp"

pushstream-clean:
	rm -rf $(PUSHSTREAM_BUILD)

# `make test` and `make integration` build it first where the sources are.
ifneq ($(wildcard $(PUSHSTREAM_VENDOR)/SHA256SUMS),)
test integration: pushstream
endif

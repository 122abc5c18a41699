# pushrelay — see README.md. Every target that needs services installs and
# starts them (scripts/deps.sh), so a fresh Debian machine needs only Go.

SHELL   := /bin/bash
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/pushrelay/pushrelay/sidecar/version.Version=$(VERSION)
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: all build deps test unit integration demo bench vet fmt clean fuzz mutants-check

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/pushrelay ./sidecar/cmd/pushrelay

deps:
	@bash scripts/deps.sh

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...

unit:
	$(GO) test -count=1 ./sidecar/... ./ebpf/...

integration: deps build
	PUSHRELAY_BIN=$(CURDIR)/bin/pushrelay $(GO) test -p 1 -count=1 -timeout 30m ./integration/...

# -p 1: the integration tests close every AMQP connection on the broker and
# the probe tests count the host's TCP connections; packages must not overlap.
test: deps vet build mutants-check
	PUSHRELAY_BIN=$(CURDIR)/bin/pushrelay $(GO) test -p 1 -count=1 -timeout 40m ./...
	$(MAKE) --no-print-directory fuzz FUZZTIME=200000x

# Every mutant under scripts/mutants/ still applies, builds and names
# tests that exist: a change to the code must carry its mutants along.
# (scripts/mutants.sh without -check runs them, which takes an hour.)
mutants-check:
	@bash scripts/mutants.sh -check

# Fuzz targets of the code that reads outside input, as package:target
# (go test -fuzz takes one of each per run). make test runs each for
# 200,000 executions (a few seconds): a count, not a duration, because
# with a duration go test -fuzz now and then fails "context deadline
# exceeded" when the time runs out mid-minimization (seen in CI).
FUZZ_TARGETS := ./sidecar/message:FuzzParse ./sidecar/config:FuzzParse ./sidecar/config:FuzzRedact ./sidecar/publish:FuzzAnswers
FUZZTIME     ?= 2m

fuzz:
	@for t in $(FUZZ_TARGETS); do \
		echo "==> $${t%%:*} $${t#*:} for $(FUZZTIME)"; \
		$(GO) test -run='^$$' -fuzz="^$${t#*:}\$$" -fuzztime=$(FUZZTIME) $${t%%:*} || exit 1; \
	done

demo: deps build
	PUSHRELAY_BIN=$(CURDIR)/bin/pushrelay $(GO) run ./integration/cmd/demo

# Figures and ratios against a raw consumer measured in the same run; asserts
# nothing. BENCH_FLAGS="-backlog 50000 -duration 5s" for a quicker look.
bench: deps build
	PUSHRELAY_BIN=$(CURDIR)/bin/pushrelay $(GO) run ./integration/cmd/bench $(BENCH_FLAGS)

clean:
	rm -rf bin dist

# Targets owned by other parts of the tree.
-include ebpf/probes.mk
-include packaging/deb.mk
-include integration/pushstream.mk

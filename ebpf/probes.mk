# eBPF socket probes (ebpf/). Included by the top Makefile.
#
# The bpf2go output (ebpf/probe/bpf_*_bpfel.{go,o}) is committed, so `go build`
# and the tests need no clang. Regenerating needs Debian 12's clang-14 and
# llvm-14 (llvm-strip-14): the objects are byte-for-byte reproducible with that
# exact toolchain, which is what ebpf-check relies on.

BPF_CLANG ?= clang-14

.PHONY: ebpf-deps ebpf-generate ebpf-check bench-probes

ebpf-deps:
	@command -v $(BPF_CLANG) >/dev/null && command -v llvm-strip-14 >/dev/null || { \
	  echo "ebpf-deps: installing clang-14 llvm-14"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends clang-14 llvm-14 >/dev/null; }

ebpf-generate: ebpf-deps
	cd ebpf/probe && $(GO) generate ./...

# Regenerates when the pinned clang is present and fails if the committed
# output differs (or a generated file is missing from git).
ebpf-check:
	@if ! command -v $(BPF_CLANG) >/dev/null || ! command -v llvm-strip-14 >/dev/null; then \
	  echo "ebpf-check: skipped: $(BPF_CLANG)/llvm-strip-14 not installed (make ebpf-deps)"; exit 0; fi; \
	cd ebpf/probe && $(GO) generate ./... && cd ../.. && \
	if [ -n "$$(git status --porcelain -- 'ebpf/probe/bpf_*')" ]; then \
	  echo "ebpf-check: generated files differ from the committed ones:"; git status --short -- 'ebpf/probe/bpf_*'; \
	  git --no-pager diff --stat -- 'ebpf/probe/bpf_*'; exit 1; fi; \
	echo "ebpf-check: generated eBPF objects match the sources"

# Figures, not assertions: per-program ns/event and the ABBA throughput ratio
# next to an A/A run. Root only; about two minutes. The reset and retransmit
# programs run in a network namespace of their own, where dropping every
# packet on lo for a second (to make retransmits) harms nothing else.
bench-probes: deps
	$(GO) run ./ebpf/cmd/probebench $(BENCH_PROBES_FLAGS)
	$(GO) test -run '^$$' -bench ProgramsPerEvent -benchtime 20000x ./ebpf/probe/
	$(GO) test -c -o .build/probe.test ./ebpf/probe/
	unshare --net sh -c 'ip link set lo up && cd ebpf/probe && ../../.build/probe.test -test.run "^$$" -test.bench TCPEventsPerEvent -test.benchtime 1000x'

package probe

//go:generate go tool bpf2go -cc clang-14 -strip llvm-strip-14 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -tags linux -target amd64,arm64 -type counters bpf ../bpf/probes.bpf.c -- -I../bpf/include -I../bpf

package probe

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// tcpEstablished is the "st" value of an ESTABLISHED socket in /proc/net/tcp.
const tcpEstablished = 0x01

// countEstablished counts the ESTABLISHED TCP sockets (IPv4 and IPv6) of the
// reader's network namespace whose local port is in ports. It is the seed of
// the eBPF gauge and the whole gauge in /proc mode.
//
// The files are streamed, not split into fields, because a frontend holds a
// million sockets and this runs on the relay's own CPU.
func countEstablished(procRoot string, ports map[uint16]bool) (map[uint16]int64, error) {
	counts := make(map[uint16]int64, len(ports))
	for p := range ports {
		counts[p] = 0
	}
	for _, name := range []string{"net/tcp", "net/tcp6"} {
		f, err := os.Open(filepath.Join(procRoot, name))
		if errors.Is(err, os.ErrNotExist) && name == "net/tcp6" {
			continue // IPv6 disabled
		}
		if err != nil {
			return nil, fmt.Errorf("count established: %w", err)
		}
		err = scanTCPTable(f, ports, counts)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("count established: %s: %w", name, err)
		}
	}
	return counts, nil
}

// scanTCPTable reads one /proc/net/tcp{,6} table. A line looks like
// "   0: 0100007F:0050 00000000:0000 0A ..." (local, remote, state).
func scanTCPTable(r io.Reader, ports map[uint16]bool, counts map[uint16]int64) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 64*1024)
	first := true
	for sc.Scan() {
		if first { // header
			first = false
			continue
		}
		line := sc.Bytes()
		local, rest, ok := nextField(line) // "sl:"
		if !ok {
			continue
		}
		local, rest, ok = nextField(rest)
		if !ok {
			continue
		}
		_, rest, ok = nextField(rest) // remote
		if !ok {
			continue
		}
		st, _, ok := nextField(rest)
		if !ok {
			continue
		}
		state, err := strconv.ParseUint(string(st), 16, 8)
		if err != nil || state != tcpEstablished {
			continue
		}
		colon := bytes.LastIndexByte(local, ':')
		if colon < 0 {
			return fmt.Errorf("malformed local address %q", local)
		}
		port, err := strconv.ParseUint(string(local[colon+1:]), 16, 16)
		if err != nil {
			return fmt.Errorf("malformed local port %q: %w", local, err)
		}
		if ports[uint16(port)] {
			counts[uint16(port)]++
		}
	}
	return sc.Err()
}

// nextField returns the first space-separated field of b and what follows.
func nextField(b []byte) (field, rest []byte, ok bool) {
	b = bytes.TrimLeft(b, " ")
	if len(b) == 0 {
		return nil, nil, false
	}
	if i := bytes.IndexByte(b, ' '); i >= 0 {
		return b[:i], b[i:], true
	}
	return b, nil, true
}

// hostFigures are the whole-host TCP/IP counters the kernel keeps anyway:
// what /metrics can still say when eBPF is not allowed, and the cross-check
// of the eBPF figures when it is.
type hostFigures struct {
	PassiveOpens uint64 // Tcp: PassiveOpens (accepted handshakes)
	ActiveOpens  uint64 // Tcp: ActiveOpens
	CurrEstab    uint64 // Tcp: CurrEstab (a gauge)
	InSegs       uint64 // Tcp: InSegs
	OutSegs      uint64 // Tcp: OutSegs
	InOctets     uint64 // IpExt: InOctets
	OutOctets    uint64 // IpExt: OutOctets
	ListenDrops  uint64 // TcpExt: ListenDrops

	ListenOverflows uint64 // TcpExt: ListenOverflows (also in ListenDrops)
	OutRsts         uint64 // Tcp: OutRsts, the tests' cross-check of resets sent
	EstabResets     uint64 // Tcp: EstabResets, ... and of resets received
	RetransSegs     uint64 // Tcp: RetransSegs, ... and of retransmits
}

// readHostFigures parses /proc/net/snmp and /proc/net/netstat, whose
// sections come as a header line of names followed by a line of values.
func readHostFigures(procRoot string) (hostFigures, error) {
	var h hostFigures
	snmp, err := readSNMPFile(filepath.Join(procRoot, "net/snmp"))
	if err != nil {
		return h, err
	}
	netstat, err := readSNMPFile(filepath.Join(procRoot, "net/netstat"))
	if err != nil {
		return h, err
	}
	fields := []struct {
		dst           *uint64
		section, name string
		m             map[string]map[string]uint64
	}{
		{&h.PassiveOpens, "Tcp", "PassiveOpens", snmp},
		{&h.ActiveOpens, "Tcp", "ActiveOpens", snmp},
		{&h.CurrEstab, "Tcp", "CurrEstab", snmp},
		{&h.InSegs, "Tcp", "InSegs", snmp},
		{&h.OutSegs, "Tcp", "OutSegs", snmp},
		{&h.InOctets, "IpExt", "InOctets", netstat},
		{&h.OutOctets, "IpExt", "OutOctets", netstat},
		{&h.ListenDrops, "TcpExt", "ListenDrops", netstat},
		{&h.ListenOverflows, "TcpExt", "ListenOverflows", netstat},
		{&h.OutRsts, "Tcp", "OutRsts", snmp},
		{&h.EstabResets, "Tcp", "EstabResets", snmp},
		{&h.RetransSegs, "Tcp", "RetransSegs", snmp},
	}
	for _, f := range fields {
		v, ok := f.m[f.section][f.name]
		if !ok {
			return h, fmt.Errorf("host figures: %s %s missing", f.section, f.name)
		}
		*f.dst = v
	}
	return h, nil
}

// readSNMPFile returns section → name → value of a /proc/net/snmp-style file.
func readSNMPFile(path string) (map[string]map[string]uint64, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("host figures: %w", err)
	}
	out := make(map[string]map[string]uint64)
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	for i := 0; i+1 < len(lines); i += 2 {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) != len(values) || len(names) == 0 || names[0] != values[0] {
			return nil, fmt.Errorf("host figures: %s: mismatched lines %d and %d", path, i+1, i+2)
		}
		section := strings.TrimSuffix(names[0], ":")
		m := make(map[string]uint64, len(names)-1)
		for j := 1; j < len(names); j++ {
			// Tcp MaxConn is -1; every figure used here is unsigned.
			if v, err := strconv.ParseUint(values[j], 10, 64); err == nil {
				m[names[j]] = v
			}
		}
		out[section] = m
	}
	return out, nil
}

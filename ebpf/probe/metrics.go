package probe

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/telemetry"
)

// snapshot is every figure of one read, written as is by /metrics, so a
// scrape never waits for a /proc scan.
type snapshot struct {
	modes   map[string]string
	ports   []portFigures // sorted by port
	host    hostFigures
	hasHost bool
	progs   []progFigures // sorted by name

	// packetsSilent: connections were accepted for silentAfter reads in a
	// row while the packet programs counted nothing (see silence).
	packetsSilent bool
}

// lifetimeBounds are the upper bounds, in seconds, of the lifetime buckets:
// lifetime_bound_ms in probes.bpf.c, whose last bucket is +Inf.
var lifetimeBounds = []float64{0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600, 7200, 21600, 86400}

type portFigures struct {
	port        uint16
	c           bpfCounters
	established int64
	hasEst      bool
}

type progFigures struct {
	name     string
	runTime  time.Duration
	runCount uint64
}

// Families written by writeMetrics. Labels are bounded: port (≤ 64 watched),
// direction (rx, tx), probe and mode (a handful each), program (≤ 6 attached
// at once), le (16).
var families = []struct{ name, typ, help string }{
	{"pushrelay_probe_mode", "gauge", "1 for the mode each probe runs in (conn: tp_btf, raw_tp, tracepoint or proc; packets: cgroup_skb, tcx or none; tcp_events: tp_btf, raw_tp, tracepoint or none); the log says why it fell back."},
	{"pushrelay_probe_packets_silent", "gauge", "1 while connections are accepted on the watched ports but the packet probe counts nothing (e.g. Nginx's sockets were made outside the configured cgroup); the log says so once."},
	{"pushrelay_tcp_accepted_connections_total", "counter", "TCP connections accepted on the port (handshake completed, SYN_RECV to ESTABLISHED), counted by eBPF."},
	{"pushrelay_tcp_closed_connections_total", "counter", "TCP connections on the port that reached CLOSE (not counting listeners and failed connects), counted by eBPF."},
	{"pushrelay_tcp_established_connections", "gauge", "TCP connections on the port in ESTABLISHED state: seeded from /proc/net/tcp then kept by eBPF, or polled from /proc in proc mode."},
	{"pushrelay_tcp_connection_lifetime_seconds", "histogram", "Lifetime of the TCP connections accepted on the port, from ESTABLISHED to CLOSE, observed at CLOSE by eBPF; connections accepted before the probes started are not observed."},
	{"pushrelay_tcp_resets_total", "counter", "TCP resets received (rx: a socket of the port was reset) and sent (tx: aborts by the port's sockets, and refusals of segments to the port that found no socket), counted by eBPF."},
	{"pushrelay_tcp_retransmitted_segments_total", "counter", "TCP segments retransmitted by the port's sockets, counted by eBPF as /proc/net/snmp Tcp RetransSegs counts them."},
	{"pushrelay_packets_total", "counter", "TCP segments to (rx) or from (tx) the port in Nginx's cgroup, counted by eBPF; a GSO/GRO batch counts as its segments."},
	{"pushrelay_bytes_total", "counter", "IP bytes (headers included) of the segments counted by pushrelay_packets_total."},
	{"pushrelay_payload_bytes_total", "counter", "TCP payload bytes of the segments counted by pushrelay_packets_total."},
	{"pushrelay_probe_program_run_seconds_total", "counter", "Time the kernel spent running the probe program (kernel run-time stats; 0 when they are off)."},
	{"pushrelay_probe_program_runs_total", "counter", "Times the kernel ran the probe program (kernel run-time stats; 0 when they are off)."},
	{"pushrelay_host_tcp_passive_opens_total", "counter", "Whole host: TCP connections accepted (/proc/net/snmp Tcp PassiveOpens)."},
	{"pushrelay_host_tcp_active_opens_total", "counter", "Whole host: TCP connections initiated (/proc/net/snmp Tcp ActiveOpens)."},
	{"pushrelay_host_tcp_established_connections", "gauge", "Whole host: TCP connections in ESTABLISHED or CLOSE_WAIT (/proc/net/snmp Tcp CurrEstab)."},
	{"pushrelay_host_tcp_segments_total", "counter", "Whole host: TCP segments received (rx) and sent (tx) (/proc/net/snmp Tcp InSegs, OutSegs)."},
	{"pushrelay_host_ip_bytes_total", "counter", "Whole host: IP bytes received (rx) and sent (tx) (/proc/net/netstat IpExt InOctets, OutOctets)."},
	{"pushrelay_host_tcp_listen_drops_total", "counter", "Whole host: connections dropped at a full accept queue or SYN backlog (/proc/net/netstat TcpExt ListenDrops)."},
	{"pushrelay_tcp_listen_overflows_total", "counter", "Whole host (the kernel does not count it per port): handshakes dropped because a listener's accept queue was full (/proc/net/netstat TcpExt ListenOverflows)."},
	{"pushrelay_tcp_listen_drops_total", "counter", "Whole host (the kernel does not count it per port): handshakes dropped at a listener for any reason, overflows included (/proc/net/netstat TcpExt ListenDrops; the same figure as pushrelay_host_tcp_listen_drops_total)."},
}

func describe(reg *telemetry.Registry) {
	for _, f := range families {
		reg.Describe(f.name, f.typ, f.help)
	}
}

// writeMetrics writes the latest snapshot; families are kept contiguous, as
// the registry's HELP placement needs.
func (p *Probes) writeMetrics(w io.Writer) {
	p.snapMu.Lock()
	s := p.snap
	p.snapMu.Unlock()
	s.write(w)
}

func (s *snapshot) write(w io.Writer) {
	if s.modes == nil {
		return // closed
	}
	probes := make([]string, 0, len(s.modes))
	for probe := range s.modes {
		probes = append(probes, probe)
	}
	slices.Sort(probes)
	for _, probe := range probes {
		fmt.Fprintf(w, "pushrelay_probe_mode{probe=%q,mode=%q} 1\n", probe, s.modes[probe])
	}
	connKernel := s.modes[ProbeConn] != ModeProc
	pktKernel := s.modes[ProbePackets] != ModeNone
	evMode, evKernel := s.modes[ProbeTCPEvents]
	evKernel = evKernel && evMode != ModeNone
	if connKernel && pktKernel {
		fmt.Fprintf(w, "pushrelay_probe_packets_silent %d\n", b2i(s.packetsSilent))
	}
	perPort := func(name string, ok bool, v func(f *portFigures) string) {
		if !ok {
			return
		}
		for i := range s.ports {
			f := &s.ports[i]
			fmt.Fprintf(w, "%s{port=\"%d\"} %s\n", name, f.port, v(f))
		}
	}
	u := func(v uint64) string { return strconv.FormatUint(v, 10) }
	perPort("pushrelay_tcp_accepted_connections_total", connKernel, func(f *portFigures) string { return u(f.c.Accepted) })
	perPort("pushrelay_tcp_closed_connections_total", connKernel, func(f *portFigures) string { return u(f.c.Closed) })
	for i := range s.ports {
		if f := &s.ports[i]; f.hasEst {
			fmt.Fprintf(w, "pushrelay_tcp_established_connections{port=\"%d\"} %d\n", f.port, f.established)
		}
	}
	if connKernel {
		for i := range s.ports {
			f := &s.ports[i]
			var cum uint64
			for b, le := range lifetimeBounds {
				cum += f.c.Lifetime[b]
				fmt.Fprintf(w, "pushrelay_tcp_connection_lifetime_seconds_bucket{port=\"%d\",le=\"%s\"} %d\n", f.port, strconv.FormatFloat(le, 'g', -1, 64), cum)
			}
			cum += f.c.Lifetime[len(lifetimeBounds)]
			fmt.Fprintf(w, "pushrelay_tcp_connection_lifetime_seconds_bucket{port=\"%d\",le=\"+Inf\"} %d\n", f.port, cum)
			fmt.Fprintf(w, "pushrelay_tcp_connection_lifetime_seconds_sum{port=\"%d\"} %s\n", f.port, strconv.FormatFloat(float64(f.c.LifetimeNs)/1e9, 'g', -1, 64))
			fmt.Fprintf(w, "pushrelay_tcp_connection_lifetime_seconds_count{port=\"%d\"} %d\n", f.port, cum)
		}
	}
	perDir := func(name string, ok bool, rx, tx func(f *portFigures) uint64) {
		if !ok {
			return
		}
		for i := range s.ports {
			f := &s.ports[i]
			fmt.Fprintf(w, "%s{port=\"%d\",direction=\"rx\"} %d\n", name, f.port, rx(f))
			fmt.Fprintf(w, "%s{port=\"%d\",direction=\"tx\"} %d\n", name, f.port, tx(f))
		}
	}
	perDir("pushrelay_tcp_resets_total", evKernel, func(f *portFigures) uint64 { return f.c.RstReceived }, func(f *portFigures) uint64 { return f.c.RstSent })
	perPort("pushrelay_tcp_retransmitted_segments_total", evKernel, func(f *portFigures) string { return u(f.c.RetransSegs) })
	perDir("pushrelay_packets_total", pktKernel, func(f *portFigures) uint64 { return f.c.RxPackets }, func(f *portFigures) uint64 { return f.c.TxPackets })
	perDir("pushrelay_bytes_total", pktKernel, func(f *portFigures) uint64 { return f.c.RxBytes }, func(f *portFigures) uint64 { return f.c.TxBytes })
	perDir("pushrelay_payload_bytes_total", pktKernel, func(f *portFigures) uint64 { return f.c.RxPayload }, func(f *portFigures) uint64 { return f.c.TxPayload })
	for _, pr := range s.progs {
		fmt.Fprintf(w, "pushrelay_probe_program_run_seconds_total{program=%q} %s\n", pr.name, strconv.FormatFloat(pr.runTime.Seconds(), 'g', -1, 64))
	}
	for _, pr := range s.progs {
		fmt.Fprintf(w, "pushrelay_probe_program_runs_total{program=%q} %d\n", pr.name, pr.runCount)
	}
	if !s.hasHost {
		return
	}
	h := &s.host
	fmt.Fprintf(w, "pushrelay_host_tcp_passive_opens_total %d\n", h.PassiveOpens)
	fmt.Fprintf(w, "pushrelay_host_tcp_active_opens_total %d\n", h.ActiveOpens)
	fmt.Fprintf(w, "pushrelay_host_tcp_established_connections %d\n", h.CurrEstab)
	fmt.Fprintf(w, "pushrelay_host_tcp_segments_total{direction=\"rx\"} %d\n", h.InSegs)
	fmt.Fprintf(w, "pushrelay_host_tcp_segments_total{direction=\"tx\"} %d\n", h.OutSegs)
	fmt.Fprintf(w, "pushrelay_host_ip_bytes_total{direction=\"rx\"} %d\n", h.InOctets)
	fmt.Fprintf(w, "pushrelay_host_ip_bytes_total{direction=\"tx\"} %d\n", h.OutOctets)
	fmt.Fprintf(w, "pushrelay_host_tcp_listen_drops_total %d\n", h.ListenDrops)
	fmt.Fprintf(w, "pushrelay_tcp_listen_overflows_total %d\n", h.ListenOverflows)
	fmt.Fprintf(w, "pushrelay_tcp_listen_drops_total %d\n", h.ListenDrops)
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

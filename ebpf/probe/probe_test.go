package probe

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/pushrelay/pushrelay/sidecar/nginxstats/nginxtest"
)

// Known traffic against a real Nginx in its own cgroup.
const (
	earlyConns   = 20   // open before the probes start: the gauge's seed
	shortConns   = 1000 // one request each, Nginx closes first
	heldConns    = 50   // idle, open until the end
	kaConns      = 10   // keep-alive connections ...
	kaRequests   = 100  // ... of this many requests each
	otherNetConn = 300  // made to the same port number in another netns
)

const nginxServer = `
location /short { return 200 "short answer\n"; }
location /ka { return 200 "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"; }
`

// Every combination of modes must give the same exact figures.
func TestCountsAreExactAgainstKnownNginxTraffic(t *testing.T) {
	if !inOwnNetns(t) {
		return
	}
	for _, tc := range []struct {
		conn, packets string
		skip          []string
	}{
		{ModeTpBTF, ModeCgroupSKB, nil},
		{ModeRawTp, ModeTCX, []string{ModeTpBTF, ModeCgroupSKB}},
		{ModeTracepoint, ModeCgroupSKB, []string{ModeTpBTF, ModeRawTp}},
	} {
		t.Run(tc.conn+"+"+tc.packets, func(t *testing.T) {
			runExactScenario(t, tc.conn, tc.packets, tc.skip)
		})
	}
}

func runExactScenario(t *testing.T, wantConn, wantPackets string, skip []string) {
	cgroup, cgfd := newCgroup(t)
	ngx := nginxtest.Start(t, nginxtest.Options{Server: nginxServer, CgroupFD: cgfd})
	port := ngx.Port

	closeEarly := holdConnections(t, ngx.Addr, earlyConns)
	p, reg, _ := startProbes(t, Config{Ports: []uint16{port}, Cgroup: cgroup}, skip...)
	if got := p.Modes(); got[ProbeConn] != wantConn || got[ProbePackets] != wantPackets {
		if wantConn == ModeTracepoint && got[ProbeConn] == ModeProc {
			t.Skip("the kernel refuses the classic tracepoint here (no tracefs)")
		}
		t.Fatalf("modes = %v, want conn=%s packets=%s", got, wantConn, wantPackets)
	}
	m := scrape(t, p, reg)
	if got := m[portSample("pushrelay_tcp_established_connections", port)]; got != earlyConns {
		t.Fatalf("established right after start = %v, want the %d connections /proc showed", got, earlyConns)
	}

	snmp0 := mustHostFigures(t)
	other := startOtherNetnsTraffic(t, port)
	var tr traffic
	tr.add(shortConnections(t, ngx.Addr, shortConns))
	closeHeld := holdConnections(t, ngx.Addr, heldConns)
	tr.add(keepAlive(t, ngx.Addr, kaConns, kaRequests))
	closeEarly()
	if err := other.Wait(); err != nil {
		t.Fatalf("traffic in the other network namespace: %v", err)
	}

	wantAccepted := float64(shortConns + heldConns + kaConns)
	wantClosed := float64(shortConns + kaConns + earlyConns)
	m = waitFor(t, p, reg, func(m map[string]float64) bool {
		return m[portSample("pushrelay_tcp_closed_connections_total", port)] >= wantClosed &&
			m[portSample("pushrelay_tcp_established_connections", port)] <= heldConns
	})
	snmp1 := mustHostFigures(t)
	expect := func(what, sample string, want float64) {
		t.Helper()
		if got := m[sample]; got != want {
			t.Errorf("%s: %s = %v, want %v", what, sample, got, want)
		}
	}
	expect("handshakes completed (the other netns's are not counted)", portSample("pushrelay_tcp_accepted_connections_total", port), wantAccepted)
	expect("connections closed, including those open before the start", portSample("pushrelay_tcp_closed_connections_total", port), wantClosed)
	expect("held connections", portSample("pushrelay_tcp_established_connections", port), heldConns)
	expect("request payload", portSample("pushrelay_payload_bytes_total", port, "rx"), float64(tr.sent))
	expect("response payload", portSample("pushrelay_payload_bytes_total", port, "tx"), float64(tr.received))

	// The same figures from the kernel's own MIB counters of this netns,
	// where the test is the only traffic. Both ends of every connection are
	// local, so PassiveOpens counts our accepts, and every segment and IP
	// byte on lo is received once, either by Nginx (rx) or by a client (tx).
	d := func(a, b uint64) float64 { return float64(b - a) }
	if got, want := wantAccepted, d(snmp0.PassiveOpens, snmp1.PassiveOpens); got != want {
		t.Errorf("accepted %v, /proc/net/snmp PassiveOpens delta %v", got, want)
	}
	// CurrEstab counts both ends of the held connections, and nothing else
	// is open once every close has been counted.
	if got, want := float64(snmp1.CurrEstab), 2*m[portSample("pushrelay_tcp_established_connections", port)]; got != want {
		t.Errorf("/proc/net/snmp CurrEstab = %v, want both ends of the %v established", got, want/2)
	}
	pkts := m[portSample("pushrelay_packets_total", port, "rx")] + m[portSample("pushrelay_packets_total", port, "tx")]
	bytes := m[portSample("pushrelay_bytes_total", port, "rx")] + m[portSample("pushrelay_bytes_total", port, "tx")]
	missed, missedBytes := d(snmp0.InSegs, snmp1.InSegs)-pkts, d(snmp0.InOctets, snmp1.InOctets)-bytes
	if wantPackets == ModeTCX {
		// tcx sees every packet on lo.
		if missed != 0 || missedBytes != 0 {
			t.Errorf("tcx: packets rx+tx = %v and IP bytes %v, but InSegs grew by %v and InOctets by %v",
				pkts, bytes, pkts+missed, bytes+missedBytes)
		}
	} else {
		// cgroup_skb runs for Nginx's own sockets only. When Nginx closes
		// first, its socket may already be a TIME_WAIT mini-socket when the
		// client's FIN arrives; that FIN and the ACK the kernel answers with
		// are not seen. So at most one segment per direction per such
		// connection is missed, and every missed one is a bare segment:
		// 20 bytes of IP + 32 of TCP with timestamps, no payload (which is
		// why the payload figures above are exact in every mode).
		const bare = 52
		if missed < 0 || missed > 2*shortConns || missedBytes != bare*missed {
			t.Errorf("cgroup_skb: %v segments (%v IP bytes) not counted of InSegs +%v (InOctets +%v); want 0..%d bare %d-byte segments",
				missed, missedBytes, pkts+missed, bytes+missedBytes, 2*shortConns, bare)
		}
	}
	t.Logf("accepted %v closed %v packets rx %v tx %v, bytes rx %v tx %v; snmp: InSegs +%v InOctets +%v; not seen %v",
		m[portSample("pushrelay_tcp_accepted_connections_total", port)], m[portSample("pushrelay_tcp_closed_connections_total", port)],
		m[portSample("pushrelay_packets_total", port, "rx")], m[portSample("pushrelay_packets_total", port, "tx")],
		m[portSample("pushrelay_bytes_total", port, "rx")], m[portSample("pushrelay_bytes_total", port, "tx")],
		d(snmp0.InSegs, snmp1.InSegs), d(snmp0.InOctets, snmp1.InOctets), missed)

	closeHeld()
	m = waitFor(t, p, reg, func(m map[string]float64) bool {
		return m[portSample("pushrelay_tcp_established_connections", port)] == 0 &&
			m[portSample("pushrelay_tcp_closed_connections_total", port)] >= wantClosed+heldConns
	})
	expect("established after closing the held ones", portSample("pushrelay_tcp_established_connections", port), 0)
	expect("closed after closing the held ones", portSample("pushrelay_tcp_closed_connections_total", port), wantClosed+heldConns)
}

func mustHostFigures(t *testing.T) hostFigures {
	t.Helper()
	h, err := readHostFigures("/proc")
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// startOtherNetnsTraffic runs, in a further network namespace, a listener on
// the same port number and otherNetConn connections to it: the tracepoint
// sees them, and the netns filter must drop them.
func startOtherNetnsTraffic(t *testing.T, port uint16) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), envHelper+"=other-netns", fmt.Sprintf("PORT=%d", port), fmt.Sprintf("CONNS=%d", otherNetConn))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start other-netns traffic: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func TestPortsChangeAtRuntime(t *testing.T) {
	if !inOwnNetns(t) {
		return
	}
	cgroup, cgfd := newCgroup(t)
	a := nginxtest.Start(t, nginxtest.Options{Server: nginxServer, CgroupFD: cgfd})
	b := nginxtest.Start(t, nginxtest.Options{Server: nginxServer, CgroupFD: cgfd})
	p, reg, _ := startProbes(t, Config{Ports: []uint16{a.Port}, Cgroup: cgroup})

	shortConnections(t, b.Addr, 10)
	holdConnections(t, b.Addr, 3)
	m := scrape(t, p, reg)
	if _, ok := m[portSample("pushrelay_tcp_accepted_connections_total", b.Port)]; ok {
		t.Fatalf("port %d is reported before it is watched", b.Port)
	}

	if err := p.SetPorts([]uint16{b.Port}); err != nil {
		t.Fatal(err)
	}
	shortConnections(t, b.Addr, 7)
	shortConnections(t, a.Addr, 5)
	m = waitFor(t, p, reg, func(m map[string]float64) bool {
		return m[portSample("pushrelay_tcp_closed_connections_total", b.Port)] >= 7
	})
	if got := m[portSample("pushrelay_tcp_accepted_connections_total", b.Port)]; got != 7 {
		t.Errorf("accepted on the new port = %v, want 7 (counted from the reload on)", got)
	}
	if got := m[portSample("pushrelay_tcp_established_connections", b.Port)]; got != 3 {
		t.Errorf("established on the new port = %v, want the 3 held, seeded from /proc", got)
	}
	for k := range m {
		if strings.Contains(k, fmt.Sprintf("port=\"%d\"", a.Port)) {
			t.Errorf("the unwatched port is still reported: %s", k)
		}
	}
	if err := p.SetPorts(make([]uint16, maxPorts+1)); err == nil {
		t.Error("SetPorts accepted port 0 and more ports than slots")
	}
}

func TestStartRejectsBadConfig(t *testing.T) {
	for _, cfg := range []Config{
		{Ports: []uint16{80}, Interval: 0},
		{Ports: []uint16{0}, Interval: 1},
		{Ports: func() []uint16 {
			var ps []uint16
			for i := 1; i <= maxPorts+1; i++ {
				ps = append(ps, uint16(i))
			}
			return ps
		}(), Interval: 1},
	} {
		if _, err := Start(t.Context(), cfg, nil, nil); err == nil {
			t.Errorf("Start(%+v) = nil error", cfg)
		}
	}
}

// helperOtherNetns runs in its own network namespace: a listener and
// CONNS connections to it.
func helperOtherNetns() int {
	if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "ip link set lo up: %v: %s\n", err, out)
		return 1
	}
	return runListenerAndConnect(os.Getenv("PORT"), os.Getenv("CONNS"))
}

// systemd removes and recreates nginx.service's cgroup when Nginx restarts,
// which detaches cgroup_skb programs; the probes must follow the new one.
func TestPacketsFollowNginxIntoARecreatedCgroup(t *testing.T) {
	if !inOwnNetns(t) {
		return
	}
	cgroup, cgfd := newCgroup(t)
	first := nginxtest.Start(t, nginxtest.Options{Server: nginxServer, CgroupFD: cgfd})
	port := first.Port
	p, reg, _ := startProbes(t, Config{Ports: []uint16{port}, Cgroup: cgroup})
	if p.Modes()[ProbePackets] != ModeCgroupSKB {
		t.Fatalf("modes = %v, want cgroup_skb packets", p.Modes())
	}
	before := shortConnections(t, first.Addr, 10)

	first.Stop()
	if err := os.Remove(cgroup); err != nil {
		t.Fatalf("remove the cgroup as systemd does at stop: %v", err)
	}
	scrape(t, p, reg) // the poller notices the cgroup is gone
	if err := os.Mkdir(cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	fd, err := syscall.Open(cgroup, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	second := nginxtest.Start(t, nginxtest.Options{Server: nginxServer, CgroupFD: fd, Port: port})
	syscall.Close(fd)
	scrape(t, p, reg) // ... and that it is back
	after := shortConnections(t, second.Addr, 10)

	want := float64(before.received + after.received)
	m := waitFor(t, p, reg, func(m map[string]float64) bool {
		return m[portSample("pushrelay_payload_bytes_total", port, "tx")] >= want
	})
	if got := m[portSample("pushrelay_payload_bytes_total", port, "tx")]; got != want {
		t.Errorf("response payload across the restart = %v, want %v (before %d + after %d)", got, want, before.received, after.received)
	}
}

package probe

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/pushrelay/pushrelay/sidecar/nginxstats/nginxtest"
	"github.com/pushrelay/pushrelay/sidecar/telemetry"
)

// The tcp_events programs in each mode they can fall back to; the packet
// probe stays on cgroup_skb (an empty cgroup of the test's own where Nginx
// is not involved), so nothing but the programs under test differs.
var tcpEventModes = []struct {
	mode string
	skip []string
}{
	{ModeTpBTF, nil},
	{ModeRawTp, []string{ModeTpBTF}},
	{ModeTracepoint, []string{ModeTpBTF, ModeRawTp}},
}

func eachTCPEventMode(t *testing.T, run func(t *testing.T, skip []string)) {
	for _, m := range tcpEventModes {
		t.Run(m.mode, func(t *testing.T) {
			run(t, m.skip)
		})
	}
}

func requireModes(t *testing.T, p *Probes, skip []string) {
	t.Helper()
	want := ModeTpBTF
	if len(skip) > 0 {
		want = tcpEventModes[len(skip)].mode
	}
	got := p.Modes()
	if got[ProbeTCPEvents] != want || got[ProbeConn] != want {
		if want == ModeTracepoint && (got[ProbeTCPEvents] == ModeNone || got[ProbeConn] == ModeProc) {
			t.Skip("the kernel refuses the classic tracepoint here (no tracefs)")
		}
		t.Fatalf("modes = %v, want conn and tcp_events %s", got, want)
	}
}

// Resets of three known kinds, each phase checked exactly against the
// netns's own Tcp OutRsts and EstabResets, where the test is the only
// traffic:
//   - clients abort keep-alive connections to Nginx (SO_LINGER 0): Nginx's
//     sockets receive the resets; OutRsts counts the clients' aborts, and
//     EstabResets both ends, so received = EstabResets − OutRsts;
//   - connects to a watched port nobody listens on: each SYN is refused by
//     a reset that has no socket (the port comes from the segment);
//   - a server on a watched port aborts what it accepts: resets sent by
//     full sockets.
func TestResetsAreExactAgainstKnownTraffic(t *testing.T) {
	if !inOwnNetns(t) {
		return
	}
	const aborts, refused, serverAborts = 50, 40, 30
	cgroup, cgfd := newCgroup(t)
	ngx := nginxtest.Start(t, nginxtest.Options{Server: nginxServer, CgroupFD: cgfd})
	closed := nginxtest.FreePort(t)
	abortL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { abortL.Close() })
	go func() {
		for {
			c, err := abortL.Accept()
			if err != nil {
				return
			}
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
	}()
	abortPort := uint16(abortL.Addr().(*net.TCPAddr).Port)

	eachTCPEventMode(t, func(t *testing.T, skip []string) {
		p, reg, _ := startProbes(t, Config{Ports: []uint16{ngx.Port, closed, abortPort}, Cgroup: cgroup}, skip...)
		requireModes(t, p, skip)
		rx := func(m map[string]float64, port uint16) float64 {
			return m[portSample("pushrelay_tcp_resets_total", port, "rx")]
		}
		tx := func(m map[string]float64, port uint16) float64 {
			return m[portSample("pushrelay_tcp_resets_total", port, "tx")]
		}

		h0 := mustHostFigures(t)
		for i := 0; i < aborts; i++ {
			c, err := net.Dial("tcp", ngx.Addr)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(c, "GET /ka HTTP/1.1\r\nHost: t\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
		m := waitFor(t, p, reg, func(m map[string]float64) bool { return rx(m, ngx.Port) >= aborts })
		h1 := mustHostFigures(t)
		if got := rx(m, ngx.Port); got != aborts {
			t.Errorf("resets received by Nginx = %v, want the %d clients' aborts", got, aborts)
		}
		if got, want := rx(m, ngx.Port), float64(h1.EstabResets-h0.EstabResets)-float64(h1.OutRsts-h0.OutRsts); got != want {
			t.Errorf("resets received by Nginx = %v, but the netns's EstabResets − OutRsts = %v", got, want)
		}
		if got := tx(m, ngx.Port); got != 0 {
			t.Errorf("resets sent by Nginx = %v, want 0", got)
		}

		for i := 0; i < refused; i++ {
			c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", closed))
			if err == nil {
				c.Close()
				t.Fatalf("port %d accepted a connection; it was meant to be closed", closed)
			}
			if !errors.Is(err, unix.ECONNREFUSED) {
				t.Fatalf("connect to the closed port: %v, want ECONNREFUSED", err)
			}
		}
		m = waitFor(t, p, reg, func(m map[string]float64) bool { return tx(m, closed) >= refused })
		h2 := mustHostFigures(t)
		if got := tx(m, closed); got != refused {
			t.Errorf("resets sent for the closed port = %v, want %d", got, refused)
		}
		if got, want := tx(m, closed), float64(h2.OutRsts-h1.OutRsts); got != want {
			t.Errorf("resets sent for the closed port = %v, but the netns's OutRsts grew by %v", got, want)
		}

		for i := 0; i < serverAborts; i++ {
			c, err := net.Dial("tcp", abortL.Addr().String())
			if errors.Is(err, unix.ECONNRESET) {
				continue // the abort came before connect looked at the socket
			}
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.Read(make([]byte, 1)); !errors.Is(err, unix.ECONNRESET) {
				t.Fatalf("read from the aborting server: %v, want ECONNRESET", err)
			}
			c.Close()
		}
		m = waitFor(t, p, reg, func(m map[string]float64) bool { return tx(m, abortPort) >= serverAborts })
		h3 := mustHostFigures(t)
		if got := tx(m, abortPort); got != serverAborts {
			t.Errorf("resets sent by the aborting server = %v, want %d", got, serverAborts)
		}
		if got, want := tx(m, abortPort), float64(h3.OutRsts-h2.OutRsts); got != want {
			t.Errorf("resets sent by the aborting server = %v, but the netns's OutRsts grew by %v", got, want)
		}
		if got := rx(m, abortPort) + rx(m, closed); got != 0 {
			t.Errorf("resets received on the closed and aborting ports = %v, want 0 (the clients received them)", got)
		}
		t.Logf("resets: Nginx rx %v; closed port tx %v; aborting server tx %v; netns OutRsts +%d EstabResets +%d",
			rx(m, ngx.Port), tx(m, closed), tx(m, abortPort), h3.OutRsts-h0.OutRsts, h3.EstabResets-h0.EstabResets)
	})
}

// dropLoopbackIngress drops every packet arriving on lo (the test's netns
// has no other traffic) until the returned function is called: a sender's
// segments leave the socket without error and are lost on the way, so each
// retransmission is a successful one, as RetransSegs and the tracepoint
// both count it. (There is no netem nor iptables on this machine kind.)
func dropLoopbackIngress(t *testing.T) (restore func()) {
	t.Helper()
	return dropLoopbackIngressB(t)
}

func dropLoopbackIngressB(t testing.TB) (restore func()) {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "MIT",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2 /* TC_ACT_SHOT */), asm.Return()},
	})
	if err != nil {
		t.Fatalf("load the drop program: %v", err)
	}
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: lo.Index, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		prog.Close()
		t.Fatalf("attach the drop program: %v", err)
	}
	done := false
	restore = func() {
		if !done {
			done = true
			l.Close()
			prog.Close()
		}
	}
	t.Cleanup(restore)
	return restore
}

// A server on a watched port writes while lo drops everything for a
// second, then the client reads it all: the server's retransmits (tail loss
// probe, RTO and its backoffs, then the recovery of the rest) must equal
// the netns's Tcp RetransSegs delta, the only sender being that server.
func TestRetransmitsMatchTheKernelCount(t *testing.T) {
	if !inOwnNetns(t) {
		return
	}
	const payload = 256 << 10
	cgroup, _ := newCgroup(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	// The server writes when the test says so, not when the client asks:
	// a request would be lost with the rest.
	write := func(c net.Conn) {
		go c.Write(make([]byte, payload))
	}

	eachTCPEventMode(t, func(t *testing.T, skip []string) {
		p, reg, _ := startProbes(t, Config{Ports: []uint16{port}, Cgroup: cgroup}, skip...)
		requireModes(t, p, skip)
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		sc, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer sc.Close()
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		// One exchange without loss first, so the connection has an RTT.
		write(sc)
		if _, err := io.ReadFull(c, make([]byte, payload)); err != nil {
			t.Fatal(err)
		}

		h0 := mustHostFigures(t)
		restore := dropLoopbackIngress(t)
		write(sc)
		time.Sleep(1200 * time.Millisecond)
		restore()
		if _, err := io.ReadFull(c, make([]byte, payload)); err != nil {
			t.Fatalf("read after the loss: %v", err)
		}
		// The client sends nothing but ACKs, which are never retransmitted;
		// its socket says so, to be sure RetransSegs is the server's alone.
		clientRetrans := tcpInfoRetrans(t, c)
		m := scrape(t, p, reg)
		h1 := mustHostFigures(t)
		got := m[portSample("pushrelay_tcp_retransmitted_segments_total", port)]
		kernel := float64(h1.RetransSegs-h0.RetransSegs) - float64(clientRetrans)
		t.Logf("retransmitted segments: probe %v; netns RetransSegs +%d of which the client's %d", got, h1.RetransSegs-h0.RetransSegs, clientRetrans)
		if got != kernel {
			t.Errorf("retransmitted segments of the server = %v, but the netns's RetransSegs says %v", got, kernel)
		}
		if got < 2 {
			t.Errorf("retransmitted segments of the server = %v, want at least 2 (a probe or RTO and the recovery) for a second of loss", got)
		}
	})
}

// tcpInfoRetrans returns the segments a connection has retransmitted in
// total (tcpi_total_retrans), which RetransSegs counted too.
func tcpInfoRetrans(t *testing.T, c net.Conn) uint32 {
	t.Helper()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	var ierr error
	raw.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if ierr != nil {
		t.Fatal(ierr)
	}
	return info.Total_retrans
}

// Connections held for known times land in the right lifetime buckets;
// those open before the probes started are not observed; and the map of
// start times is empty once every connection is closed.
func TestConnectionLifetimesLandInTheirBuckets(t *testing.T) {
	if !inOwnNetns(t) {
		return
	}
	const early, short, medium, long = 3, 20, 10, 5
	const mediumHold, longHold = 250 * time.Millisecond, 2500 * time.Millisecond
	cgroup, cgfd := newCgroup(t)
	ngx := nginxtest.Start(t, nginxtest.Options{Server: nginxServer, CgroupFD: cgfd})
	port := ngx.Port

	eachTCPEventMode(t, func(t *testing.T, skip []string) {
		closeEarly := holdConnections(t, ngx.Addr, early)
		p, reg, _ := startProbes(t, Config{Ports: []uint16{port}, Cgroup: cgroup}, skip...)
		requireModes(t, p, skip)

		start := time.Now()
		closeMedium := holdConnections(t, ngx.Addr, medium)
		closeLong := holdConnections(t, ngx.Addr, long)
		shortConnections(t, ngx.Addr, short)
		closeEarly()
		time.Sleep(mediumHold - time.Since(start))
		closeMedium()
		time.Sleep(longHold - time.Since(start))
		closeLong()

		bucket := func(m map[string]float64, le string) float64 {
			return m[fmt.Sprintf("pushrelay_tcp_connection_lifetime_seconds_bucket{port=\"%d\",le=%q}", port, le)]
		}
		count := fmt.Sprintf("pushrelay_tcp_connection_lifetime_seconds_count{port=\"%d\"}", port)
		m := waitFor(t, p, reg, func(m map[string]float64) bool {
			return m[portSample("pushrelay_tcp_closed_connections_total", port)] >= early+short+medium+long
		})
		if got := m[portSample("pushrelay_tcp_closed_connections_total", port)]; got != early+short+medium+long {
			t.Errorf("closed = %v, want %d", got, early+short+medium+long)
		}
		// Each hold is the client's; the server's socket lives from the
		// handshake to the last ACK of the close, a little longer, and the
		// buckets around each hold are wide enough for that.
		for _, c := range []struct {
			le   string
			want float64
		}{
			{"0.1", short},
			{"0.5", short + medium},
			{"1", short + medium},
			{"5", short + medium + long},
			{"+Inf", short + medium + long},
		} {
			if got := bucket(m, c.le); got != c.want {
				t.Errorf("bucket le=%s = %v, want %v", c.le, got, c.want)
			}
		}
		if got := m[count]; got != short+medium+long {
			t.Errorf("count = %v, want %d (the %d connections open before the start are not observed)", got, short+medium+long, early)
		}
		sum := m[fmt.Sprintf("pushrelay_tcp_connection_lifetime_seconds_sum{port=\"%d\"}", port)]
		lo := medium*mediumHold.Seconds()*0.9 + long*longHold.Seconds()*0.95
		hi := medium*(mediumHold.Seconds()+0.2) + long*(longHold.Seconds()+0.2) + short*0.1
		if sum < lo || sum > hi {
			t.Errorf("sum = %vs, want %v..%v", sum, lo, hi)
		}
		var k uint64
		var v uint64
		it := p.k.estAt.Iterate()
		n := 0
		for it.Next(&k, &v) {
			n++
		}
		if n != 0 {
			t.Errorf("%d start times left in est_at after every connection closed", n)
		}
		t.Logf("lifetimes: count %v sum %.3fs; buckets 0.01:%v 0.1:%v 0.5:%v 1:%v 5:%v", m[count], sum,
			bucket(m, "0.01"), bucket(m, "0.1"), bucket(m, "0.5"), bucket(m, "1"), bucket(m, "5"))
	})
}

// A listener with backlog 1 that never accepts holds two handshaken
// connections (the queue is full past backlog); each further SYN is then
// dropped as an overflow, once, until its first retransmission a second
// later. So flood connects made well within that second overflow exactly.
func TestListenOverflowsAreExact(t *testing.T) {
	if !inOwnNetns(t) {
		return
	}
	const queued, flood = 2, 8
	p, reg, _ := startProbes(t, Config{Ports: []uint16{80}})
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	addr := &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	if err := unix.Bind(fd, addr); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 1); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr.Port = sa.(*unix.SockaddrInet4).Port

	m0 := scrape(t, p, reg)
	h0 := mustHostFigures(t)
	for i := 0; i < queued; i++ {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", addr.Port))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	begin := time.Now()
	for i := 0; i < flood; i++ {
		c, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Connect(c, addr); !errors.Is(err, unix.EINPROGRESS) {
			t.Fatalf("non-blocking connect: %v, want EINPROGRESS", err)
		}
		// Closing in SYN_SENT sends nothing, so no SYN is retransmitted.
		defer unix.Close(c)
	}
	// Let the SYNs be processed, far from the 1 s retransmission.
	time.Sleep(100 * time.Millisecond)
	m := scrape(t, p, reg)
	h1 := mustHostFigures(t)
	if time.Since(begin) > 800*time.Millisecond {
		t.Skip("too slow to stay before the first SYN retransmission; the counts would not be exact")
	}
	d := func(name string) float64 { return m[name] - m0[name] }
	if got := d("pushrelay_tcp_listen_overflows_total"); got != flood {
		t.Errorf("listen overflows +%v, want +%d", got, flood)
	}
	if got := d("pushrelay_tcp_listen_drops_total"); got != flood {
		t.Errorf("listen drops +%v, want +%d", got, flood)
	}
	if got, want := d("pushrelay_tcp_listen_overflows_total"), float64(h1.ListenOverflows-h0.ListenOverflows); got != want {
		t.Errorf("listen overflows +%v, netns /proc/net/netstat ListenOverflows +%v", got, want)
	}
	if got, want := d("pushrelay_tcp_listen_drops_total"), float64(h1.ListenDrops-h0.ListenDrops); got != want {
		t.Errorf("listen drops +%v, netns /proc/net/netstat ListenDrops +%v", got, want)
	}
}

// Nginx started in one cgroup and then moved into the watched one, as when
// it was running before the cgroup was made: its listening socket keeps the
// old cgroup, so cgroup_skb sees none of its packets. The probes must say
// so once, in the log and /metrics, rather than serve zeros; and must not
// say so when Nginx was born in the watched cgroup.
func TestSilentPacketProbeIsDetected(t *testing.T) {
	if !inOwnNetns(t) {
		return
	}
	silent := "pushrelay_probe_packets_silent"
	traffic := func(t *testing.T, p *Probes, reg *telemetry.Registry, addr string) map[string]float64 {
		var m map[string]float64
		for i := 0; i < silentAfter+2; i++ {
			shortConnections(t, addr, 5)
			m = scrape(t, p, reg)
		}
		return m
	}

	t.Run("moved into the cgroup", func(t *testing.T) {
		_, bornFD := newCgroup(t)
		watched, _ := newCgroup(t)
		ngx := nginxtest.Start(t, nginxtest.Options{Server: nginxServer, CgroupFD: bornFD})
		moveProcs(t, bornFD, watched)
		p, reg, logs := startProbes(t, Config{Ports: []uint16{ngx.Port}, Cgroup: watched})
		if p.Modes()[ProbePackets] != ModeCgroupSKB {
			t.Fatalf("modes = %v, want cgroup_skb packets", p.Modes())
		}
		m := traffic(t, p, reg, ngx.Addr)
		if got := m[portSample("pushrelay_tcp_accepted_connections_total", ngx.Port)]; got != 5*(silentAfter+2) {
			t.Fatalf("accepted = %v, want %d", got, 5*(silentAfter+2))
		}
		if got := m[portSample("pushrelay_packets_total", ngx.Port, "rx")]; got != 0 {
			t.Fatalf("packets = %v; the test needs Nginx's sockets outside the watched cgroup", got)
		}
		if m[silent] != 1 {
			t.Errorf("%s = %v, want 1", silent, m[silent])
		}
		if n := strings.Count(logs.String(), "packet counters stand still"); n != 1 {
			t.Errorf("the silence is logged %d times, want once:\n%s", n, logs)
		}
	})
	t.Run("born in the cgroup", func(t *testing.T) {
		watched, fd := newCgroup(t)
		ngx := nginxtest.Start(t, nginxtest.Options{Server: nginxServer, CgroupFD: fd})
		p, reg, logs := startProbes(t, Config{Ports: []uint16{ngx.Port}, Cgroup: watched})
		m := traffic(t, p, reg, ngx.Addr)
		if m[silent] != 0 || strings.Contains(logs.String(), "stand still") {
			t.Errorf("%s = %v with packets rx %v; want 0 and no log line", silent, m[silent], m[portSample("pushrelay_packets_total", ngx.Port, "rx")])
		}
	})
}

// moveProcs moves every process of the cgroup open at fromFD into the
// cgroup directory to.
func moveProcs(t *testing.T, fromFD int, to string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc/self/fd", strconv.Itoa(fromFD), "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	pids := strings.Fields(string(b))
	if len(pids) == 0 {
		t.Fatal("no process in Nginx's first cgroup")
	}
	for _, pid := range pids {
		if err := os.WriteFile(filepath.Join(to, "cgroup.procs"), []byte(pid), 0o644); err != nil {
			t.Fatalf("move %s: %v", pid, err)
		}
	}
}

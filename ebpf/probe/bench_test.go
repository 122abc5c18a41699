package probe

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pushrelay/pushrelay/sidecar/nginxstats/nginxtest"
	"github.com/pushrelay/pushrelay/sidecar/telemetry"
)

// BenchmarkProgramsPerEvent reports the kernel's run time per event of each
// program, for every mode the fallbacks can land on, under b.N short
// connections to nginx in its own cgroup. ns/op is the client's time per
// connection; the figures that matter are the <program>-ns/event metrics.
func BenchmarkProgramsPerEvent(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: loads eBPF and makes a cgroup")
	}
	root, err := Cgroup2Mount()
	if err != nil {
		b.Skipf("no cgroup v2 mount: %v", err)
	}
	dir := filepath.Join(root, "pushrelay-probe-bench")
	if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
		b.Fatal(err)
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	ngx := nginxtest.Start(b, nginxtest.Options{Server: nginxServer, CgroupFD: fd})
	unix.Close(fd)
	b.Cleanup(func() { ngx.Stop(); os.Remove(dir) })

	for _, tc := range []struct {
		name string
		skip []string
	}{
		{ModeTpBTF + "+" + ModeCgroupSKB, nil},
		{ModeRawTp + "+" + ModeTCX, []string{ModeTpBTF, ModeCgroupSKB}},
		{ModeTracepoint, []string{ModeTpBTF, ModeRawTp, ModeCgroupSKB, ModeTCX}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			skip := map[string]bool{}
			for _, s := range tc.skip {
				skip[s] = true
			}
			log := slog.New(slog.NewTextHandler(io.Discard, nil))
			p, err := start(b.Context(), Config{Ports: []uint16{ngx.Port}, Cgroup: dir, Interval: time.Hour}, telemetry.New(), log, startOptions{skip: skip})
			if err != nil {
				b.Fatal(err)
			}
			defer p.Close()
			if p.Modes()[ProbeConn] == ModeProc {
				b.Skip("the classic tracepoint did not attach (tracefs is not mounted on this host)")
			}
			req := []byte("GET /short HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
			var buf bytes.Buffer
			b.ResetTimer()
			for range b.N {
				c, err := net.Dial("tcp", ngx.Addr)
				if err != nil {
					b.Fatal(err)
				}
				c.Write(req)
				buf.Reset()
				buf.ReadFrom(c)
				c.Close()
			}
			b.StopTimer()
			for name, prog := range p.k.progs {
				st, err := prog.Stats()
				if err != nil || st.RunCount == 0 {
					continue
				}
				b.ReportMetric(float64(st.Runtime.Nanoseconds())/float64(st.RunCount), name+"-ns/event")
			}
		})
	}
}

// BenchmarkTCPEventsPerEvent reports the run time per event of the reset and
// retransmit programs (and of the connection program, which the lifetime
// histogram made longer) in each mode. Resets: each op aborts one keep-alive
// connection to nginx (SO_LINGER 0: nginx receives a reset, the client sends
// one) and makes one connect to a closed watched port (refused by a reset
// without a socket). Retransmits: ops are connections, up to 200 at a time,
// whose server writes while every packet on lo is dropped for a second; that
// needs a network namespace of its own, as `make bench-probes` runs it
// (unshare --net), and is skipped elsewhere rather than blackhole the host.
func BenchmarkTCPEventsPerEvent(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: loads eBPF and makes a cgroup")
	}
	root, err := Cgroup2Mount()
	if err != nil {
		b.Skipf("no cgroup v2 mount: %v", err)
	}
	dir := filepath.Join(root, fmt.Sprintf("pushrelay-probe-bench-events-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
		b.Fatal(err)
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	ngx := nginxtest.Start(b, nginxtest.Options{Server: nginxServer, CgroupFD: fd})
	unix.Close(fd)
	b.Cleanup(func() { ngx.Stop(); os.Remove(dir) })
	closed := nginxtest.FreePort(b)
	ifaces, _ := net.Interfaces()
	ownNetns := len(ifaces) == 1 && ifaces[0].Flags&net.FlagLoopback != 0

	srv, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { srv.Close() })
	srvPort := uint16(srv.Addr().(*net.TCPAddr).Port)

	for _, tc := range []struct {
		name string
		skip []string
	}{
		{ModeTpBTF, nil},
		{ModeRawTp, []string{ModeTpBTF}},
		{ModeTracepoint, []string{ModeTpBTF, ModeRawTp}},
	} {
		start := func(b *testing.B) *Probes {
			skip := map[string]bool{}
			for _, s := range tc.skip {
				skip[s] = true
			}
			log := slog.New(slog.NewTextHandler(io.Discard, nil))
			p, err := start(b.Context(), Config{Ports: []uint16{ngx.Port, closed, srvPort}, Cgroup: dir, Interval: time.Hour}, telemetry.New(), log, startOptions{skip: skip})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { p.Close() })
			if p.Modes()[ProbeTCPEvents] == ModeNone || p.Modes()[ProbeConn] == ModeProc {
				b.Skip("the classic tracepoint did not attach (tracefs is not mounted here)")
			}
			return p
		}
		b.Run(tc.name+"/resets", func(b *testing.B) {
			p := start(b)
			req := []byte("GET /ka HTTP/1.1\r\nHost: t\r\n\r\n")
			buf := make([]byte, 4096)
			b.ResetTimer()
			for range b.N {
				c, err := net.Dial("tcp", ngx.Addr)
				if err != nil {
					b.Fatal(err)
				}
				c.Write(req)
				c.Read(buf) // the whole short response, in one segment
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
				if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", closed)); err == nil {
					c.Close()
				}
			}
			b.StopTimer()
			reportPerEvent(b, p)
		})
		b.Run(tc.name+"/retransmits", func(b *testing.B) {
			if !ownNetns {
				b.Skip("drops every packet on lo for a second: run it in a network namespace of its own (make bench-probes does)")
			}
			p := start(b)
			const batch = 200
			payload := make([]byte, 64<<10)
			b.ResetTimer()
			for done := 0; done < b.N; done += batch {
				n := min(batch, b.N-done)
				clients := make([]net.Conn, n)
				servers := make([]net.Conn, n)
				for i := range n {
					c, err := net.Dial("tcp", srv.Addr().String())
					if err != nil {
						b.Fatal(err)
					}
					s, err := srv.Accept()
					if err != nil {
						b.Fatal(err)
					}
					clients[i], servers[i] = c, s
				}
				restore := dropLoopbackIngressB(b)
				for _, s := range servers {
					go s.Write(payload)
				}
				time.Sleep(1200 * time.Millisecond)
				restore()
				for _, c := range clients {
					c.SetReadDeadline(time.Now().Add(30 * time.Second))
					if _, err := io.ReadFull(c, make([]byte, len(payload))); err != nil {
						b.Fatal(err)
					}
					c.Close()
				}
				for _, s := range servers {
					s.Close()
				}
			}
			b.StopTimer()
			reportPerEvent(b, p)
		})
	}
}

func reportPerEvent(b *testing.B, p *Probes) {
	for name, prog := range p.k.progs {
		st, err := prog.Stats()
		if err != nil || st.RunCount == 0 {
			continue
		}
		b.ReportMetric(float64(st.Runtime.Nanoseconds())/float64(st.RunCount), name+"-ns/event")
		b.ReportMetric(float64(st.RunCount)/float64(b.N), name+"-events/op")
	}
}

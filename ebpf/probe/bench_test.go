package probe

import (
	"bytes"
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

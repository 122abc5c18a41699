package probe

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pushrelay/pushrelay/sidecar/telemetry"
)

// The root tests re-run themselves in a fresh network and mount namespace,
// so that /proc/net/snmp holds only their own traffic (an exact ground
// truth on a shared machine) and a tracefs mount stays private to them.
const envInNetns = "PUSHRELAY_PROBE_TEST_NETNS"

// envHelper selects a helper role when the test binary runs as a child.
const envHelper = "PUSHRELAY_PROBE_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(envHelper) {
	case "":
		os.Exit(m.Run())
	case "other-netns":
		os.Exit(helperOtherNetns())
	default:
		fmt.Fprintln(os.Stderr, "unknown helper", os.Getenv(envHelper))
		os.Exit(2)
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CI runs as root): loads eBPF, makes cgroups and network namespaces")
	}
}

// inOwnNetns returns true in the child that should run the test body. In
// the parent it runs the child, relays its output and verdict, and returns
// false.
func inOwnNetns(t *testing.T) bool {
	t.Helper()
	requireRoot(t)
	if os.Getenv(envInNetns) == "1" {
		setupChildNamespaces(t)
		return true
	}
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1", "-test.timeout=100s")
	cmd.Env = append(os.Environ(), envInNetns+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	t.Logf("child in its own network namespace:\n%s", out)
	switch {
	case err != nil && strings.Contains(err.Error(), "operation not permitted"):
		t.Skipf("the kernel refuses a new network namespace: %v", err)
	case err != nil:
		t.Fatalf("child failed: %v", err)
	case bytes.Contains(out, []byte("--- SKIP: "+t.Name())):
		t.Skip("child skipped (see its output)")
	case !bytes.Contains(out, []byte("--- PASS: "+t.Name())):
		t.Fatal("child did not run the test")
	}
	return false
}

func setupChildNamespaces(t *testing.T) {
	t.Helper()
	if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip link set lo up: %v: %s", err, out)
	}
	// Mounts made here must not leak to the host.
	if err := unix.Mount("none", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		t.Fatalf("make mounts private: %v", err)
	}
	// The classic tracepoint needs tracefs, which this machine kind does not
	// mount; this mount lives and dies with the child's mount namespace.
	var st unix.Statfs_t
	if unix.Statfs("/sys/kernel/tracing", &st) == nil && st.Type != unix.TRACEFS_MAGIC {
		if err := unix.Mount("nodev", "/sys/kernel/tracing", "tracefs", 0, ""); err != nil {
			t.Logf("mount tracefs: %v (tracepoint mode will fall back)", err)
		}
	}
}

// newCgroup makes a child cgroup v2 and removes it at cleanup, once the
// processes in it are gone.
func newCgroup(t *testing.T) (dir string, fd int) {
	t.Helper()
	root, err := Cgroup2Mount()
	if err != nil {
		t.Skipf("no cgroup v2 mount: %v", err)
	}
	dir = filepath.Join(root, fmt.Sprintf("pushrelay-probe-test-%d-%d", os.Getpid(), time.Now().UnixNano()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("make cgroup: %v", err)
	}
	fd, err = unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unix.Close(fd)
		for i := 0; ; i++ {
			err := unix.Rmdir(dir)
			if err == nil || i == 100 {
				if err != nil {
					t.Errorf("remove cgroup %s: %v", dir, err)
				}
				return
			}
			time.Sleep(50 * time.Millisecond) // EBUSY until the last worker has exited
		}
	})
	return dir, fd
}

// startProbes starts the probes with a short interval and closes them at
// cleanup.
func startProbes(t *testing.T, cfg Config, skip ...string) (*Probes, *telemetry.Registry, *bytes.Buffer) {
	t.Helper()
	if cfg.Interval == 0 {
		cfg.Interval = 50 * time.Millisecond
	}
	reg := telemetry.New()
	var logBuf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&lockedWriter{w: io.MultiWriter(&logBuf, testWriter{t})}, nil))
	opts := startOptions{skip: map[string]bool{}}
	for _, s := range skip {
		opts.skip[s] = true
	}
	p, err := start(t.Context(), cfg, reg, log, opts)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return p, reg, &logBuf
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// scrape returns every sample of the registry's /metrics text by its
// name{labels}.
func scrape(t *testing.T, p *Probes, reg *telemetry.Registry) map[string]float64 {
	t.Helper()
	p.refresh()
	var buf bytes.Buffer
	reg.WritePrometheus(&buf)
	out := map[string]float64{}
	for _, line := range strings.Split(buf.String(), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad sample %q", line)
		}
		out[line[:i]] = v
	}
	return out
}

func portSample(name string, port uint16, direction ...string) string {
	if len(direction) > 0 {
		return fmt.Sprintf("%s{port=\"%d\",direction=%q}", name, port, direction[0])
	}
	return fmt.Sprintf("%s{port=\"%d\"}", name, port)
}

// waitFor polls the metrics until want holds, and returns the last scrape;
// the caller then asserts exact values, so a timeout shows what was seen.
func waitFor(t *testing.T, p *Probes, reg *telemetry.Registry, want func(m map[string]float64) bool) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		m := scrape(t, p, reg)
		if want(m) || time.Now().After(deadline) {
			return m
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// traffic is what the client side of a test sent and received, in TCP
// payload bytes, the figure both ends agree on exactly.
type traffic struct{ sent, received int64 }

func (a *traffic) add(b traffic) { a.sent += b.sent; a.received += b.received }

type countingConn struct {
	net.Conn
	tr *traffic
}

func (c countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.tr.received += int64(n)
	return n, err
}

func (c countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.tr.sent += int64(n)
	return n, err
}

// shortConnections makes n connections, one request each with
// "Connection: close": Nginx answers and closes first.
func shortConnections(t *testing.T, addr string, n int) traffic {
	t.Helper()
	var tr traffic
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		cc := countingConn{c, &tr}
		fmt.Fprintf(cc, "GET /short HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
		if _, err := io.Copy(io.Discard, cc); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		c.Close()
	}
	return tr
}

// keepAlive runs conns connections of reqs requests each, and closes them.
func keepAlive(t *testing.T, addr string, conns, reqs int) traffic {
	t.Helper()
	var tr traffic
	for i := 0; i < conns; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		cc := countingConn{c, &tr}
		br := bufio.NewReader(cc)
		for j := 0; j < reqs; j++ {
			fmt.Fprintf(cc, "GET /ka HTTP/1.1\r\nHost: t\r\n\r\n")
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("keep-alive request %d/%d: %v", i, j, err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if br.Buffered() != 0 {
				t.Fatal("response longer than its Content-Length")
			}
		}
		c.Close()
	}
	return tr
}

// holdConnections opens n idle connections and returns a function that
// closes them.
func holdConnections(t *testing.T, addr string, n int) (closeAll func()) {
	t.Helper()
	conns := make([]net.Conn, 0, n)
	closeAll = func() {
		for _, c := range conns {
			c.Close()
		}
		conns = nil
	}
	t.Cleanup(closeAll)
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	return closeAll
}

package probe

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/pushrelay/pushrelay/sidecar/nginxstats/nginxtest"
)

const (
	envUnprivPort   = "PUSHRELAY_PROBE_TEST_PORT"
	envUnprivCgroup = "PUSHRELAY_PROBE_TEST_CGROUP"
	envUnprivModes  = "PUSHRELAY_PROBE_TEST_WANT_MODES"
)

// The loader runs as an unprivileged user with only the capabilities the
// systemd unit grants, and with none at all.
func TestLoaderWithDroppedPrivileges(t *testing.T) {
	if !inOwnNetns(t) {
		return
	}
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("setpriv (util-linux) is not installed")
	}
	cgroup, cgfd := newCgroup(t)
	ngx := nginxtest.Start(t, nginxtest.Options{Server: nginxServer, CgroupFD: cgfd})
	bin := copyTestBinary(t)

	for _, tc := range []struct {
		name, caps, modes string
	}{
		{"CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN", "+bpf,+perfmon,+net_admin", ModeTpBTF + "," + ModeCgroupSKB},
		{"no capabilities", "", ModeProc + "," + ModeNone},
	} {
		t.Run(tc.name, func(t *testing.T) {
			caps := "-all"
			if tc.caps != "" {
				caps += "," + tc.caps
			}
			cmd := exec.Command("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
				"--inh-caps="+caps, "--ambient-caps="+caps,
				bin, "-test.run=^TestHelperUnprivilegedLoader$", "-test.v", "-test.count=1", "-test.timeout=60s")
			cmd.Env = append(os.Environ(),
				envUnprivPort+"="+strconv.Itoa(int(ngx.Port)),
				envUnprivCgroup+"="+cgroup,
				envUnprivModes+"="+tc.modes,
				"GOCACHE=/tmp", "HOME=/tmp")
			cmd.Dir = filepath.Dir(bin)
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			out, err := cmd.CombinedOutput()
			t.Logf("loader as nobody with %s:\n%s", tc.name, out)
			if err != nil {
				t.Fatalf("loader as nobody: %v", err)
			}
			if !strings.Contains(string(out), "--- PASS: TestHelperUnprivilegedLoader") {
				t.Fatal("the unprivileged loader did not run")
			}
		})
	}
}

// TestHelperUnprivilegedLoader is the child of TestLoaderWithDroppedPrivileges.
func TestHelperUnprivilegedLoader(t *testing.T) {
	portStr := os.Getenv(envUnprivPort)
	if portStr == "" {
		t.Skip("runs only as the child of TestLoaderWithDroppedPrivileges")
	}
	if os.Geteuid() == 0 {
		t.Fatal("the helper must run without root")
	}
	port, _ := strconv.Atoi(portStr)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	want := strings.Split(os.Getenv(envUnprivModes), ",")

	p, reg, logs := startProbes(t, Config{Ports: []uint16{uint16(port)}, Cgroup: os.Getenv(envUnprivCgroup)})
	// The reset and retransmit programs need what the connection program
	// needs, so they land in the same mode, or none with it in proc.
	wantEvents := want[0]
	if wantEvents == ModeProc {
		wantEvents = ModeNone
	}
	if got := p.Modes(); got[ProbeConn] != want[0] || got[ProbePackets] != want[1] || got[ProbeTCPEvents] != wantEvents {
		t.Fatalf("modes = %v, want conn=%s packets=%s tcp_events=%s", got, want[0], want[1], wantEvents)
	}
	m := scrape(t, p, reg)
	for _, probe := range []string{ProbeConn, ProbePackets, ProbeTCPEvents} {
		sample := fmt.Sprintf("pushrelay_probe_mode{probe=%q,mode=%q}", probe, p.Modes()[probe])
		if m[sample] != 1 {
			t.Errorf("/metrics lacks %s 1", sample)
		}
	}
	if want[0] == ModeProc && !strings.Contains(logs.String(), "missing CAP_BPF") {
		t.Errorf("the fallback log line does not name the missing capability:\n%s", logs)
	}

	holdConnections(t, addr, 10)
	tr := shortConnections(t, addr, 100)
	m = waitFor(t, p, reg, func(m map[string]float64) bool {
		return m[portSample("pushrelay_tcp_established_connections", uint16(port))] == 10 &&
			(want[0] == ModeProc || m[portSample("pushrelay_tcp_closed_connections_total", uint16(port))] >= 100)
	})
	if got := m[portSample("pushrelay_tcp_established_connections", uint16(port))]; got != 10 {
		t.Errorf("established = %v, want 10", got)
	}
	if want[0] == ModeProc {
		if _, ok := m[portSample("pushrelay_tcp_accepted_connections_total", uint16(port))]; ok {
			t.Error("proc mode reports per-port accepted connections it cannot know")
		}
		if m["pushrelay_host_tcp_passive_opens_total"] < 110 {
			t.Errorf("host passive opens = %v, want at least the 110 connections made", m["pushrelay_host_tcp_passive_opens_total"])
		}
		return
	}
	if got := m[portSample("pushrelay_tcp_accepted_connections_total", uint16(port))]; got != 110 {
		t.Errorf("accepted = %v, want 110", got)
	}
	if got := m[portSample("pushrelay_payload_bytes_total", uint16(port), "tx")]; got != float64(tr.received) {
		t.Errorf("tx payload = %v, want %d", got, tr.received)
	}
}

// copyTestBinary puts this test binary where nobody can run it (go test's
// build directory is private to root).
func copyTestBinary(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "pushrelay-probe-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	bin := filepath.Join(dir, "probe.test")
	dst, err := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	return bin
}

// runListenerAndConnect listens on 127.0.0.1:port and makes conns
// connections to itself, each closed by the server after one byte.
func runListenerAndConnect(port, conns string) int {
	n, _ := strconv.Atoi(conns)
	l, err := net.Listen("tcp", "127.0.0.1:"+port)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		return 1
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte{'x'})
			c.Close()
		}
	}()
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			fmt.Fprintln(os.Stderr, "dial:", err)
			return 1
		}
		io.Copy(io.Discard, c)
		c.Close()
	}
	return 0
}

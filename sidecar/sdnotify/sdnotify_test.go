package sdnotify

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// listen opens a real unixgram socket, as systemd does for NOTIFY_SOCKET.
func listen(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listen %s: %v", name, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func receive(t *testing.T, conn *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	if err := conn.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("read notification: %v", err)
	}
	return string(buf[:n])
}

func TestSendsEachStateAsOneDatagram(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn := listen(t, path)
	t.Setenv("NOTIFY_SOCKET", path)
	n := FromEnv()

	for _, tc := range []struct {
		send func() error
		want string
	}{
		{n.Ready, "READY=1"},
		{n.Stopping, "STOPPING=1"},
		{n.Watchdog, "WATCHDOG=1"},
		{func() error { return n.Status("draining 3 shards") }, "STATUS=draining 3 shards"},
	} {
		if err := tc.send(); err != nil {
			t.Fatalf("send %s: %v", tc.want, err)
		}
		if got := receive(t, conn); got != tc.want {
			t.Errorf("got %q, want %q", got, tc.want)
		}
	}
}

func TestReloadingCarriesMonotonicTimestamp(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn := listen(t, path)
	if err := New(path).Reloading(); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(receive(t, conn), "\n")
	if len(lines) != 2 || lines[0] != "RELOADING=1" || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") {
		t.Fatalf("got %q, want RELOADING=1 then MONOTONIC_USEC=…", lines)
	}
	usec, err := strconv.ParseInt(strings.TrimPrefix(lines[1], "MONOTONIC_USEC="), 10, 64)
	if err != nil || usec <= 0 {
		t.Fatalf("MONOTONIC_USEC %q is not a positive integer: %v", lines[1], err)
	}
}

func TestAbstractSocket(t *testing.T) {
	name := "@pushrelay-sdnotify-test-" + strconv.Itoa(os.Getpid())
	conn := listen(t, name)
	if err := New(name).Ready(); err != nil {
		t.Fatal(err)
	}
	if got := receive(t, conn); got != "READY=1" {
		t.Fatalf("got %q", got)
	}
}

func TestNoSocketIsANoOp(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n := FromEnv()
	if n.Enabled() {
		t.Fatal("enabled without NOTIFY_SOCKET")
	}
	if err := n.Ready(); err != nil {
		t.Fatalf("Ready without a socket: %v", err)
	}
	var nilN *Notifier
	if err := nilN.Stopping(); err != nil {
		t.Fatalf("nil Notifier: %v", err)
	}
}

func TestMissingSocketIsAnError(t *testing.T) {
	err := New(filepath.Join(t.TempDir(), "gone.sock")).Ready()
	if err == nil {
		t.Fatal("no error for a socket nobody listens on")
	}
}

func TestWatchdogInterval(t *testing.T) {
	t.Setenv("WATCHDOG_USEC", "")
	t.Setenv("WATCHDOG_PID", "")
	if _, ok := WatchdogInterval(); ok {
		t.Fatal("watchdog enabled without WATCHDOG_USEC")
	}
	t.Setenv("WATCHDOG_USEC", "30000000")
	if d, ok := WatchdogInterval(); !ok || d != 15*time.Second {
		t.Fatalf("got %v %v, want 15s true", d, ok)
	}
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()+1))
	if _, ok := WatchdogInterval(); ok {
		t.Fatal("watchdog enabled for another pid")
	}
}

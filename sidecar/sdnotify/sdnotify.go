// Package sdnotify tells systemd about the relay's state (sd_notify(3)) so
// the unit can be Type=notify: `systemctl start` returns only once the relay
// is really relaying, and `systemctl reload` shows a reload in progress.
//
// Outside systemd (NOTIFY_SOCKET unset) every call is a no-op, so the relay
// and its tests run the same way from a shell.
package sdnotify

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// Notifier sends state lines to the socket systemd handed the process. The
// zero value, and a nil *Notifier, send nothing.
type Notifier struct {
	addr string
}

// FromEnv returns a Notifier for $NOTIFY_SOCKET. It reads the environment
// once, so a later os.Unsetenv by some library does not silence it.
func FromEnv() *Notifier {
	return &Notifier{addr: os.Getenv("NOTIFY_SOCKET")}
}

// New returns a Notifier for an explicit socket path ("@name" is abstract).
func New(addr string) *Notifier { return &Notifier{addr: addr} }

// Enabled reports whether a socket is configured.
func (n *Notifier) Enabled() bool { return n != nil && n.addr != "" }

// Ready says start-up (or a reload) has finished.
func (n *Notifier) Ready() error { return n.Notify("READY=1") }

// Reloading says a reload (SIGHUP) has begun; send Ready when it is done.
// MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) tell this reload
// from an earlier one.
func (n *Notifier) Reloading() error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return fmt.Errorf("sdnotify: monotonic clock: %w", err)
	}
	usec := ts.Sec*1_000_000 + ts.Nsec/1_000
	return n.Notify("RELOADING=1\nMONOTONIC_USEC=" + strconv.FormatInt(usec, 10))
}

// Stopping says shutdown (draining) has begun.
func (n *Notifier) Stopping() error { return n.Notify("STOPPING=1") }

// Status sets the free-form line `systemctl status` shows.
func (n *Notifier) Status(s string) error { return n.Notify("STATUS=" + s) }

// Watchdog pings the service watchdog (WatchdogSec= in the unit).
func (n *Notifier) Watchdog() error { return n.Notify("WATCHDOG=1") }

// Notify sends one datagram of newline-separated VAR=value assignments.
func (n *Notifier) Notify(state string) error {
	if !n.Enabled() {
		return nil
	}
	// A fresh socket per call: notifications are rare (start, reload,
	// stop, a watchdog tick), and it keeps Notifier free of state to close.
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: n.addr, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sdnotify: dial %s: %w", n.addr, err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("sdnotify: send: %w", err)
	}
	return nil
}

// WatchdogInterval returns how often to call Watchdog: half of
// $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises, and false when the
// unit sets no watchdog or the variables are meant for another process.
func WatchdogInterval() (time.Duration, bool) {
	usec, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64)
	if err != nil || usec <= 0 {
		return 0, false
	}
	if pid := os.Getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return 0, false
	}
	return time.Duration(usec) * time.Microsecond / 2, true
}

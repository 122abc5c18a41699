package stack

import (
	"bytes"
	"cmp"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// RelayConfig are the config values the tests, demo and benchmarks vary.
type RelayConfig struct {
	Host        string
	AMQPURL     string // one URL, or several comma-separated: amqp.urls
	Exchange    string
	Queue       string // [amqp] queue; empty: the relay's default, pushrelay.<host>
	Publish     string // [push] url
	Dialect     string // [push] dialect; default "nchan"
	Prefetch    int    // default 1024
	Connections int    // default 4
	Pipeline    int    // default 16
	MaxBody     int    // default 32768
	PushTimeout string // [push] timeout; default "2s"
	Probes      string // the [probes] table's keys; default "enabled = false"
	AMQP        string // more [amqp] keys, e.g. heartbeat = "5s"
	Push        string // more [push] keys, e.g. retry_budget = "3s"
	StateDir    string // state_dir; default the config file's directory
	Extra       string // more TOML, appended as is
}

// TOML renders the config file.
func (c RelayConfig) TOML(metricsAddr string) string {
	def := func(v, d int) int {
		if v == 0 {
			return d
		}
		return v
	}
	queue := ""
	if c.Queue != "" {
		queue = fmt.Sprintf("queue = %q\n", c.Queue)
	}
	return fmt.Sprintf(`host = %q
state_dir = %q
shutdown_timeout = "10s"
[amqp]
%s
exchange = %q
%sprefetch = %d
%s
[push]
dialect = %q
url = %q
connections = %d
pipeline = %d
timeout = %q
retry_max = "500ms"
max_body = %d
%s
[metrics]
listen = %q
[log]
level = "info"
format = "text"
[probes]
%s
%s`, c.Host, c.StateDir, amqpURLKey(c.AMQPURL), c.Exchange, queue, def(c.Prefetch, 1024), c.AMQP, cmp.Or(c.Dialect, "nchan"), c.Publish, def(c.Connections, 4), def(c.Pipeline, 16),
		cmp.Or(c.PushTimeout, "2s"), def(c.MaxBody, 32768), c.Push, metricsAddr, cmp.Or(c.Probes, "enabled = false"), c.Extra)
}

// amqpURLKey renders the broker as amqp.url, or as amqp.urls for a
// comma-separated list of cluster nodes.
func amqpURLKey(urls string) string {
	if !strings.Contains(urls, ",") {
		return fmt.Sprintf("url = %q", urls)
	}
	var quoted []string
	for _, u := range strings.Split(urls, ",") {
		quoted = append(quoted, strconv.Quote(u))
	}
	return "urls = [" + strings.Join(quoted, ", ") + "]"
}

// Relay is the pushrelay binary running with a generated config.
type Relay struct {
	Bin string
	// Wrapper runs before Bin, e.g. setpriv to drop privileges.
	Wrapper     []string
	Config      string // path of the TOML file
	MetricsAddr string
	cmd         *exec.Cmd
	exited      chan struct{}
	log         lockedBuffer
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// NewRelay writes cfg into dir; Start runs it.
func NewRelay(bin, dir string, cfg RelayConfig) (*Relay, error) {
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	r := &Relay{Bin: bin, Config: filepath.Join(dir, "pushrelay.toml"), MetricsAddr: fmt.Sprintf("127.0.0.1:%d", port)}
	return r, r.WriteConfig(cfg)
}

// WriteConfig replaces the config file; Reload makes the relay read it.
func (r *Relay) WriteConfig(cfg RelayConfig) error {
	if cfg.StateDir == "" {
		cfg.StateDir = filepath.Dir(r.Config) // a test's own, never /var/lib
	}
	return os.WriteFile(r.Config, []byte(cfg.TOML(r.MetricsAddr)), 0o644)
}

// Start runs the binary and waits until /readyz says it is consuming and
// Nginx answers.
func (r *Relay) Start() error { return r.start(func(code int) bool { return code == 200 }) }

// Launch runs the binary and waits until it serves /readyz, ready or not:
// for a relay that is meant to stand by, or to start broken.
func (r *Relay) Launch() error { return r.start(func(int) bool { return true }) }

func (r *Relay) start(ready func(code int) bool) error {
	args := append(append([]string{}, r.Wrapper...), r.Bin, "run", "-config", r.Config)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = &r.log, &r.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start relay: %w", err)
	}
	r.cmd = cmd
	r.exited = make(chan struct{})
	go func(exited chan struct{}) { cmd.Wait(); close(exited) }(r.exited)
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-r.exited:
			r.cmd = nil
			return fmt.Errorf("relay exited at start:\n%s", r.Log())
		default:
		}
		if resp, err := http.Get("http://" + r.MetricsAddr + "/readyz"); err == nil {
			resp.Body.Close()
			if ready(resp.StatusCode) {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("relay not ready after 20s:\n%s", r.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop sends SIGTERM and waits for the graceful stop.
func (r *Relay) Stop() error { return r.signalAndWait(syscall.SIGTERM) }

// Kill sends SIGKILL: no ack of what is in flight, no cleanup.
func (r *Relay) Kill() error { return r.signalAndWait(syscall.SIGKILL) }

func (r *Relay) signalAndWait(sig syscall.Signal) error {
	if r.cmd == nil {
		return nil
	}
	defer func() { r.cmd = nil }()
	r.cmd.Process.Signal(sig)
	select {
	case <-r.exited:
		return nil
	case <-time.After(20 * time.Second):
		r.cmd.Process.Kill()
		<-r.exited
		return fmt.Errorf("relay did not stop within 20s of %v", sig)
	}
}

// Reload sends SIGHUP, as `systemctl reload pushrelay` does.
func (r *Relay) Reload() error {
	if r.cmd == nil {
		return errStopped
	}
	return r.cmd.Process.Signal(syscall.SIGHUP)
}

// Pid is the relay's process id, or 0 when stopped.
func (r *Relay) Pid() int {
	if r.cmd == nil {
		return 0
	}
	return r.cmd.Process.Pid
}

// Metrics returns the /metrics text.
func (r *Relay) Metrics() (string, error) {
	resp, err := http.Get("http://" + r.MetricsAddr + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// Metric returns the value of one sample of /metrics, or -1 if absent.
func (r *Relay) Metric(sample string) float64 {
	text, err := r.Metrics()
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return -1
}

// Log is what the relay wrote so far.
func (r *Relay) Log() string { return r.log.String() }

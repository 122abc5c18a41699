// Package integration tests pushrelay as it runs in production: the real
// binary as a process, RabbitMQ on 127.0.0.1:5672, Debian's Nginx with the
// Nchan module and the project's own nginx/ snippet, and real EventSource,
// WebSocket and long-poll subscribers. Nothing here is mocked.
package integration

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/sidecar/shard"
)

const amqpURL = "amqp://guest:guest@127.0.0.1:5672/"

// repoRoot is the checkout this test file lives in.
func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

var relayBin string // set by TestMain; read-only afterwards

func TestMain(m *testing.M) {
	relayBin = os.Getenv("PUSHRELAY_BIN")
	if relayBin == "" {
		dir, err := os.MkdirTemp("", "pushrelay-bin")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		relayBin = filepath.Join(dir, "pushrelay")
		build := exec.Command("go", "build", "-o", relayBin, "./sidecar/cmd/pushrelay")
		build.Dir = repoRoot()
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build pushrelay:", err)
			os.Exit(1)
		}
		defer os.RemoveAll(dir)
	}
	os.Exit(m.Run())
}

// freePort returns a loopback TCP port nobody listens on right now.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func waitFor(t testing.TB, what string, timeout time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ---------------------------------------------------------------- Nginx

// Nginx is a Debian nginx + Nchan instance on a loopback port, serving the
// project's nginx/pushrelay-nchan.conf.
type Nginx struct {
	t      testing.TB
	Port   int
	prefix string
	cmd    *exec.Cmd
	exited chan struct{}
}

const nchanModule = "/usr/lib/nginx/modules/ngx_nchan_module.so"

func startNginx(t testing.TB) *Nginx {
	t.Helper()
	if _, err := os.Stat(nchanModule); err != nil {
		t.Fatalf("Nchan module missing (%v): run `make deps` (apt-get install libnginx-mod-nchan)", err)
	}
	n := &Nginx{t: t, Port: freePort(t), prefix: t.TempDir()}
	conf := fmt.Sprintf(`load_module %s;
daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 20000;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log notice;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path %[2]s/body;
    server {
        listen 127.0.0.1:%[3]d;
        include %[4]s;
    }
}
`, nchanModule, n.prefix, n.Port, filepath.Join(repoRoot(), "nginx", "pushrelay-nchan.conf"))
	if err := os.WriteFile(filepath.Join(n.prefix, "nginx.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	n.Start()
	t.Cleanup(n.Stop)
	return n
}

// Start runs nginx and waits until it answers.
func (n *Nginx) Start() {
	n.t.Helper()
	n.cmd = exec.Command("nginx", "-p", n.prefix, "-c", filepath.Join(n.prefix, "nginx.conf"))
	n.cmd.Stderr = os.Stderr
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := n.cmd.Start(); err != nil {
		n.t.Fatalf("start nginx: %v", err)
	}
	exited := make(chan struct{})
	n.exited = exited
	go func(cmd *exec.Cmd) { cmd.Wait(); close(exited) }(n.cmd)
	waitFor(n.t, "nginx to answer", 10*time.Second, func() bool {
		resp, err := http.Get(n.URL("/channels-stats"))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
}

// Stop shuts nginx down fast (SIGTERM) and waits for every process of it.
func (n *Nginx) Stop() {
	if n.cmd == nil {
		return
	}
	n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.exited:
	case <-time.After(10 * time.Second):
		syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
		<-n.exited
	}
	n.cmd = nil
}

func (n *Nginx) URL(path string) string { return fmt.Sprintf("http://127.0.0.1:%d%s", n.Port, path) }

// PublishURL is the relay's [push] url for this instance.
func (n *Nginx) PublishURL() string { return n.URL("/pub?id={channel}") }

// ---------------------------------------------------------------- relay

// RelayProc is the pushrelay binary running with a generated config.
type RelayProc struct {
	t           testing.TB
	Config      string // path of the TOML file
	MetricsAddr string
	cmd         *exec.Cmd
	exited      chan struct{}
	log         *lockedBuffer
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

// RelayOptions are the config values tests vary.
type RelayOptions struct {
	Host     string
	Exchange string
	Publish  string // [push] url
	MaxBody  int
	Extra    string // more TOML, appended as is
	Queue    string // [amqp] queue; empty: the relay's default, pushrelay.<host>
}

func relayConfig(o RelayOptions, metricsAddr string) string {
	maxBody := o.MaxBody
	if maxBody == 0 {
		maxBody = 32768
	}
	queue := ""
	if o.Queue != "" {
		queue = fmt.Sprintf("queue = %q\n", o.Queue)
	}
	return fmt.Sprintf(`host = %q
shutdown_timeout = "10s"
[amqp]
url = %q
exchange = %q
%sprefetch = 1024
[push]
dialect = "nchan"
url = %q
connections = 4
timeout = "2s"
retry_max = "500ms"
max_body = %d
[metrics]
listen = %q
[log]
level = "info"
format = "text"
[probes]
enabled = false
%s`, o.Host, amqpURL, o.Exchange, queue, o.Publish, maxBody, metricsAddr, o.Extra)
}

func startRelay(t testing.TB, o RelayOptions) *RelayProc {
	t.Helper()
	r := &RelayProc{
		t:           t,
		Config:      filepath.Join(t.TempDir(), "pushrelay.toml"),
		MetricsAddr: fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		log:         &lockedBuffer{},
	}
	if err := os.WriteFile(r.Config, []byte(relayConfig(o, r.MetricsAddr)), 0o644); err != nil {
		t.Fatal(err)
	}
	r.Start()
	t.Cleanup(func() {
		r.Stop()
		if t.Failed() {
			t.Logf("relay %s log:\n%s", o.Host, r.log.String())
		}
	})
	return r
}

// WriteConfig replaces the relay's config file, for a Reload to read; the
// metrics address stays the one the running process listens on.
func (r *RelayProc) WriteConfig(o RelayOptions) {
	r.t.Helper()
	if err := os.WriteFile(r.Config, []byte(relayConfig(o, r.MetricsAddr)), 0o644); err != nil {
		r.t.Fatal(err)
	}
}

// Start runs the binary and waits until /readyz says it is consuming and
// Nginx answers.
func (r *RelayProc) Start() {
	r.t.Helper()
	r.cmd = exec.Command(relayBin, "run", "-config", r.Config)
	r.cmd.Stdout, r.cmd.Stderr = r.log, r.log
	if err := r.cmd.Start(); err != nil {
		r.t.Fatalf("start relay: %v", err)
	}
	exited := make(chan struct{})
	r.exited = exited
	go func(cmd *exec.Cmd) { cmd.Wait(); close(exited) }(r.cmd)
	waitFor(r.t, "relay /readyz", 20*time.Second, func() bool {
		select {
		case <-exited:
			r.t.Fatalf("relay exited at start:\n%s", r.log.String())
		default:
		}
		resp, err := http.Get("http://" + r.MetricsAddr + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
}

// Stop sends SIGTERM and waits for the graceful stop.
func (r *RelayProc) Stop() { r.signalAndWait(syscall.SIGTERM) }

// Kill sends SIGKILL: no ack of what is in flight, no cleanup.
func (r *RelayProc) Kill() { r.signalAndWait(syscall.SIGKILL) }

func (r *RelayProc) signalAndWait(sig syscall.Signal) {
	if r.cmd == nil {
		return
	}
	r.cmd.Process.Signal(sig)
	select {
	case <-r.exited:
	case <-time.After(20 * time.Second):
		r.cmd.Process.Kill()
		<-r.exited
		r.t.Errorf("relay did not stop within 20s of %v", sig)
	}
	r.cmd = nil
}

// Reload sends SIGHUP, as `systemctl reload pushrelay` does.
func (r *RelayProc) Reload() { r.cmd.Process.Signal(syscall.SIGHUP) }

// Metric returns the value of one sample of /metrics, or -1 if absent.
func (r *RelayProc) Metric(sample string) float64 {
	resp, err := http.Get("http://" + r.MetricsAddr + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return -1
}

// Log is what the relay wrote so far.
func (r *RelayProc) Log() string { return r.log.String() }

// ---------------------------------------------------------------- RabbitMQ

// Broker is a test's connection to RabbitMQ, with a confirm-mode channel
// for publishing as the web tier does. It reconnects by itself, so a test
// can close every connection on the broker under it.
type Broker struct {
	t        testing.TB
	Exchange string

	mu       sync.Mutex
	conn     *amqp.Connection
	ch       *amqp.Channel
	confirms chan amqp.Confirmation
	Resent   int // messages published again after a lost connection
}

// newBroker connects and names a test-private exchange, so that tests never
// see each other's messages. The relay declares it; the test removes it
// and the queues it names at the end.
func newBroker(t testing.TB, queues ...string) *Broker {
	t.Helper()
	b := &Broker{t: t, Exchange: fmt.Sprintf("pushrelay.test.%s.%d", strings.ReplaceAll(t.Name(), "/", "."), time.Now().UnixNano())}
	if err := b.connect(); err != nil {
		t.Fatalf("RabbitMQ at %s: %v (run `make deps`)", amqpURL, err)
	}
	b.deleteQueues(queues)
	t.Cleanup(func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.connect() == nil {
			b.deleteQueues(queues)
			b.ch.ExchangeDelete(b.Exchange, false, false)
			b.conn.Close()
		}
	})
	return b
}

func (b *Broker) connect() error {
	if b.conn != nil {
		b.conn.Close()
	}
	conn, err := amqp.Dial(amqpURL)
	if err != nil {
		return err
	}
	ch, err := conn.Channel()
	if err != nil {
		conn.Close()
		return err
	}
	if err := ch.Confirm(false); err != nil {
		conn.Close()
		return err
	}
	b.conn, b.ch = conn, ch
	b.confirms = ch.NotifyPublish(make(chan amqp.Confirmation, 65536))
	return nil
}

func (b *Broker) deleteQueues(queues []string) {
	for _, q := range queues {
		if _, err := b.ch.QueueDelete(q, false, false, false); err != nil {
			b.connect() // a failed delete closes the channel
		}
	}
}

// Msg is one message as the web tier publishes it.
type Msg struct {
	Channel string // "" publishes without the channel header
	Body    []byte
	ID      string
	Type    string
	Headers amqp.Table // extra headers
	Count   int        // shard count, default 1024
}

// Publish sends messages and returns once the broker confirmed them all.
// If the connection is lost on the way, it reconnects and sends the whole
// batch again: at least once, as a real producer would.
func (b *Broker) Publish(msgs ...Msg) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	var err error
	for attempt := 0; attempt < 20; attempt++ {
		if attempt > 0 {
			b.Resent += len(msgs)
			time.Sleep(100 * time.Millisecond)
			if err := b.connect(); err != nil {
				continue
			}
		}
		if err = b.publishOnce(msgs); err == nil {
			return nil
		}
	}
	return err
}

func (b *Broker) publishOnce(msgs []Msg) error {
	for _, m := range msgs {
		count := m.Count
		if count == 0 {
			count = shard.DefaultCount
		}
		headers := amqp.Table{"published_at": time.Now().UnixMicro()}
		if m.Channel != "" {
			headers["channel"] = m.Channel
		}
		for k, v := range m.Headers {
			headers[k] = v
		}
		key := strconv.Itoa(shard.Of(m.Channel, count))
		err := b.ch.PublishWithContext(context.Background(), b.Exchange, key, false, false, amqp.Publishing{
			Headers: headers, MessageId: m.ID, Type: m.Type, ContentType: "text/plain",
			DeliveryMode: amqp.Persistent, Body: m.Body,
		})
		if err != nil {
			return fmt.Errorf("publish: %w", err)
		}
	}
	for range msgs {
		select {
		case c, ok := <-b.confirms:
			if !ok {
				return fmt.Errorf("channel closed before confirms")
			}
			if !c.Ack {
				return fmt.Errorf("broker nacked message %d", c.DeliveryTag)
			}
		case <-time.After(30 * time.Second):
			return fmt.Errorf("no publisher confirm within 30s")
		}
	}
	return nil
}

// MustPublish is Publish for the test goroutine.
func (b *Broker) MustPublish(msgs ...Msg) {
	b.t.Helper()
	if err := b.Publish(msgs...); err != nil {
		b.t.Fatal(err)
	}
}

// QueueDepth returns the number of ready messages in queue.
func (b *Broker) QueueDepth(queue string) int {
	b.mu.Lock()
	ch, err := b.conn.Channel()
	b.mu.Unlock()
	if err != nil {
		b.t.Fatal(err)
	}
	defer ch.Close()
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	if err != nil {
		return -1
	}
	return q.Messages
}

// Drain takes every message from queue without waiting for more.
func (b *Broker) Drain(queue string) []amqp.Delivery {
	b.mu.Lock()
	ch, err := b.conn.Channel()
	b.mu.Unlock()
	if err != nil {
		b.t.Fatal(err)
	}
	defer ch.Close()
	var out []amqp.Delivery
	for {
		d, ok, err := ch.Get(queue, true)
		if err != nil {
			b.t.Fatalf("get %s: %v", queue, err)
		}
		if !ok {
			return out
		}
		out = append(out, d)
	}
}

func rabbitmqctl(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.Command("rabbitmqctl", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("rabbitmqctl %v: %v\n%s", args, err, out)
	}
}

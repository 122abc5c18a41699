// Package integration tests pushrelay as it runs in production: the real
// binary as a process, RabbitMQ on 127.0.0.1:5672, Nginx with the project's
// own nginx/ snippets for each publisher module (Debian's Nginx + Nchan, and
// nginx + Push Stream built by `make pushstream`), and real EventSource,
// WebSocket and long-poll subscribers. Nothing here is mocked.
package integration

import (
	"cmp"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/integration/stack"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

const amqpURL = "amqp://guest:guest@127.0.0.1:5672/"

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
		build.Dir = stack.RepoRoot()
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build pushrelay:", err)
			os.Exit(1)
		}
		defer os.RemoveAll(dir)
	}
	os.Exit(m.Run())
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

// The processes come from integration/stack, as for the demo and the
// benchmarks; these wrappers only turn their errors into test failures
// and stop them at the end of the test.

// Nginx is an nginx instance on a loopback port running one publisher
// module with the project's nginx/pushrelay-<module>*.conf.
type Nginx struct {
	*stack.Nginx
	t    testing.TB
	Port int
}

// modules are the publisher modules every integration test runs against.
var modules = []stack.Module{stack.Nchan, stack.PushStream}

// eachModule runs f as one subtest per module, named after it. A module
// that cannot run here is skipped with one line saying why.
func eachModule(t *testing.T, f func(t *testing.T, m stack.Module)) {
	for _, m := range modules {
		t.Run(string(m), func(t *testing.T) {
			if why := moduleUnavailable(m); why != "" {
				t.Skip(why)
			}
			f(t, m)
		})
	}
}

// moduleUnavailable says why module m cannot run here, or "". Push Stream
// needs the nginx that `make pushstream` builds from ../shared/vendor (make
// test builds it first); Nchan is Debian's and always installed by deps.
func moduleUnavailable(m stack.Module) string {
	if _, err := m.Nginx(); err != nil {
		return err.Error()
	}
	return ""
}

func startNginx(t testing.TB) *Nginx { return startNginxModule(t, stack.Nchan) }

// startNginxModule starts an instance of module m, stopped at cleanup.
func startNginxModule(t testing.TB, m stack.Module) *Nginx {
	t.Helper()
	return startNginxWith(t, stack.NginxOptions{Module: m})
}

// startNginxWith starts an instance shaped by o (in a directory of the
// test's own unless o says), stopped at cleanup.
func startNginxWith(t testing.TB, o stack.NginxOptions) *Nginx {
	t.Helper()
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	o.PublisherLog = true // nginxOutage reads it
	n, err := stack.StartNginx(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Stop)
	_, port, _ := net.SplitHostPort(n.Addr)
	p, _ := strconv.Atoi(port)
	return &Nginx{Nginx: n, t: t, Port: p}
}

// Start restarts a stopped instance on the same port.
func (n *Nginx) Start() {
	n.t.Helper()
	if err := n.Nginx.Start(); err != nil {
		n.t.Fatal(err)
	}
}

// RelayOptions are the config values tests vary; the broker is always the
// local one.
type RelayOptions = stack.RelayConfig

// RelayProc is the pushrelay binary running with a generated config.
type RelayProc struct {
	*stack.Relay
	t testing.TB
}

func startRelay(t testing.TB, o RelayOptions) *RelayProc {
	t.Helper()
	o.AMQPURL = amqpURL
	sr, err := stack.NewRelay(relayBin, t.TempDir(), o)
	if err != nil {
		t.Fatal(err)
	}
	r := &RelayProc{Relay: sr, t: t}
	r.Start()
	t.Cleanup(func() {
		r.Stop()
		if t.Failed() {
			t.Logf("relay %s log:\n%s", o.Host, r.Log())
		}
	})
	return r
}

// WriteConfig replaces the relay's config file, for a Reload to read; the
// metrics address stays the one the running process listens on.
func (r *RelayProc) WriteConfig(o RelayOptions) {
	r.t.Helper()
	o.AMQPURL = amqpURL
	if err := r.Relay.WriteConfig(o); err != nil {
		r.t.Fatal(err)
	}
}

// Start runs the binary and waits until /readyz says it is consuming and
// Nginx answers.
func (r *RelayProc) Start() {
	r.t.Helper()
	if err := r.Relay.Start(); err != nil {
		r.t.Fatal(err)
	}
}

// Stop sends SIGTERM and waits for the graceful stop.
func (r *RelayProc) Stop() {
	if err := r.Relay.Stop(); err != nil {
		r.t.Error(err)
	}
}

// Kill sends SIGKILL: no ack of what is in flight, no cleanup.
func (r *RelayProc) Kill() {
	if err := r.Relay.Kill(); err != nil {
		r.t.Error(err)
	}
}

// Reload sends SIGHUP, as `systemctl reload pushrelay` does.
func (r *RelayProc) Reload() {
	if err := r.Relay.Reload(); err != nil {
		r.t.Error(err)
	}
}

// ---------------------------------------------------------------- RabbitMQ

// Broker is a test's connection to RabbitMQ, with a confirm-mode channel
// for publishing as the web tier does. It reconnects by itself, so a test
// can close every connection on the broker under it.
type Broker struct {
	t        testing.TB
	Exchange string
	url      string // the node it publishes through; "" is amqpURL

	mu       sync.Mutex
	conn     *amqp.Connection
	ch       *amqp.Channel
	confirms chan amqp.Confirmation
	Resent   int // messages published again after a lost connection
}

// newBroker connects and names a test-private exchange, so that tests never
// see each other's messages. The relay declares it; the test removes it
// and the queues it names at the end.
func newBroker(t testing.TB, queues ...string) *Broker { return newBrokerAt(t, amqpURL, queues...) }

// newBrokerAt is newBroker publishing through the node at url, e.g. one
// of a test cluster's.
func newBrokerAt(t testing.TB, url string, queues ...string) *Broker {
	t.Helper()
	b := &Broker{t: t, url: url, Exchange: fmt.Sprintf("pushrelay.test.%s.%d", strings.ReplaceAll(t.Name(), "/", "."), time.Now().UnixNano())}
	if err := b.connect(); err != nil {
		t.Fatalf("RabbitMQ at %s: %v (run `make deps`)", url, err)
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
	conn, err := amqp.Dial(cmp.Or(b.url, amqpURL))
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
	// ContentType is the content_type property: "" sends text/plain, as
	// most producers do; noContentType sends none, to test the relay's
	// default.
	ContentType string
	// Properties a producer may set that the relay passes on to a
	// dead-letter copy untouched.
	Timestamp       time.Time
	AppID           string
	ContentEncoding string
}

// noContentType as Msg.ContentType publishes without a content_type.
const noContentType = "-"

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
		contentType := m.ContentType
		switch contentType {
		case "":
			contentType = "text/plain"
		case noContentType:
			contentType = ""
		}
		key := strconv.Itoa(shard.Of(m.Channel, count))
		err := b.ch.PublishWithContext(context.Background(), b.Exchange, key, false, false, amqp.Publishing{
			Headers: headers, MessageId: m.ID, Type: m.Type, ContentType: contentType,
			Timestamp: m.Timestamp, AppId: m.AppID, ContentEncoding: m.ContentEncoding,
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

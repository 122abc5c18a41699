package producer

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/sidecar/message"
)

// pythonWithPika returns a Python 3 that can import pika: Debian's own
// first (python3-pika installs there, and scripts/deps.sh installs it), then
// whatever python3 is on PATH (a pyenv or virtualenv shim may come first and
// not see Debian's packages).
func pythonWithPika() (string, bool) {
	candidates := []string{"/usr/bin/python3"}
	if p, err := exec.LookPath("python3"); err == nil {
		candidates = append(candidates, p)
	}
	for _, p := range candidates {
		if exec.Command(p, "-c", "import pika").Run() == nil {
			return p, true
		}
	}
	return "", false
}

// TestPythonProducer runs the Python producer's unittest suite
// (producer/python), so that go test ./... and make test cover it: the shared
// validation table, the contract's shard vectors and publishing to the real
// broker. The suite sees this process's environment: CI (the shard vectors
// must then be present) and PUSHRELAY_TEST_AMQP_URL.
func TestPythonProducer(t *testing.T) {
	python, ok := pythonWithPika()
	if !ok {
		if os.Getenv("CI") != "" {
			t.Fatal("no python3 with pika, and CI is set: the Python producer is untested (make deps installs python3-pika)")
		}
		t.Skip("no python3 with pika (make deps installs python3-pika); the Python producer is not tested")
	}
	root := repoRoot(t)
	cmd := exec.CommandContext(t.Context(), python, "-m", "unittest", "discover", "-s", filepath.Join("producer", "python"), "-v")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1") // no __pycache__ in the tree
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s -m unittest discover -s producer/python: %v\n%s", python, err, out)
	}
	// A green run that ran nothing, or skipped the broker, says so.
	if !regexp.MustCompile(`(?m)^Ran [1-9][0-9]* tests? in`).Match(out) {
		t.Fatalf("the Python suite ran no tests:\n%s", out)
	}
	t.Logf("%s", out)
	if m := regexp.MustCompile(`(?m)^OK \(skipped=\d+\)$`).Find(out); m != nil {
		t.Logf("the Python suite skipped tests: %s", m)
	}
}

// TestPythonPublishesWhatTheRelayParses publishes through the Python module
// and reads the deliveries with the relay's own message.Parse: the header
// types pika picks (published_at must arrive as an integer, channel as a
// string) are checked by the code that consumes them, not by pika.
func TestPythonPublishesWhatTheRelayParses(t *testing.T) {
	python, ok := pythonWithPika()
	if !ok {
		t.Skip("no python3 with pika (make deps installs python3-pika)")
	}
	url := os.Getenv("PUSHRELAY_TEST_AMQP_URL")
	if url == "" {
		url = "amqp://guest:guest@127.0.0.1:5672/"
	}
	conn, err := amqp.Dial(url)
	if err != nil {
		t.Skipf("RabbitMQ not reachable at %s (make deps starts it): %v", url, err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	const count = 64
	exchange := fmt.Sprintf("pushrelay.test.%s.%d", t.Name(), rand.Uint64())
	if err := ch.ExchangeDeclare(exchange, "direct", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	defer ch.ExchangeDelete(exchange, false, false)
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for s := range count {
		if err := ch.QueueBind(q.Name, strconv.Itoa(s), exchange, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}

	script := `
import sys
sys.path.insert(0, sys.argv[1])
import pushrelay_producer as pp
with pp.Publisher(sys.argv[2], sys.argv[3], int(sys.argv[4])) as p:
    p.publish(pp.Message("thread:1", '{"text":"hé"}', type="comment", id="c-17", content_type="application/json"))
    p.publish(pp.Message("x", b""))
`
	before := time.Now().UnixMicro()
	cmd := exec.CommandContext(t.Context(), python, "-c", script,
		filepath.Join(repoRoot(t), "producer", "python"), url, exchange, strconv.Itoa(count))
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("python: %v\n%s", err, out)
	}
	after := time.Now().UnixMicro()

	for _, want := range []struct {
		key string
		m   message.Message
	}{
		{"32", message.Message{Channel: "thread:1", ID: "c-17", Type: "comment", ContentType: "application/json", Body: []byte(`{"text":"hé"}`)}},
		{"7", message.Message{Channel: "x"}},
	} {
		var d amqp.Delivery
		select {
		case d = <-deliveries:
		case <-time.After(5 * time.Second):
			t.Fatal("no message arrived within 5s")
		}
		m, r := message.Parse(&d, DefaultMaxBody)
		if r != message.OK {
			t.Fatalf("relay's Parse refused the Python producer's message: %s (%+v)", r, d)
		}
		if d.RoutingKey != want.key || m.Channel != want.m.Channel || m.ID != want.m.ID || m.Type != want.m.Type ||
			m.ContentType != want.m.ContentType || string(m.Body) != string(want.m.Body) {
			t.Errorf("key %s, message %+v; want key %s, %+v", d.RoutingKey, m, want.key, want.m)
		}
		if _, ok := d.Headers["published_at"].(int64); !ok {
			t.Errorf("published_at arrived as %T, want int64", d.Headers["published_at"])
		}
		if m.PublishedAt < before || m.PublishedAt > after {
			t.Errorf("published_at %d not in [%d, %d]", m.PublishedAt, before, after)
		}
		if len(d.Headers) != 2 || d.DeliveryMode != amqp.Persistent {
			t.Errorf("headers %v, delivery mode %d; want channel and published_at only, persistent", d.Headers, d.DeliveryMode)
		}
	}
}

package producer_test

import (
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/producer"
)

// hungNode listens like a SIGSTOPped broker: TCP connections are accepted,
// and nothing is ever said on them. It returns its URL and how many
// connections it took.
func hungNode(t *testing.T) (string, *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int32
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			mu.Lock()
			conns = append(conns, c) // held open, silent, until the test ends
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			_ = c.Close()
		}
	})
	return "amqp://guest:guest@" + ln.Addr().String() + "/", &accepted
}

// A hung node before a working one: each attempt must give up on its own
// (amqp091-go would wait 30 s for the handshake), so Dial reaches the
// working node in about one dial timeout.
func TestDialPassesAHungNode(t *testing.T) {
	conn := dial(t) // skips without a broker
	exchange, _ := testExchange(t, conn, 4)
	hung, accepted := hungNode(t)
	// Dial starts at a random node: dial until an attempt went through
	// the hung one first.
	for try := 0; try < 30 && accepted.Load() == 0; try++ {
		began := time.Now()
		p, err := producer.Dial(hung+","+brokerURL(), exchange, 4)
		took := time.Since(began)
		if err != nil {
			t.Fatalf("Dial: %v", err)
		}
		_ = p.Close()
		if accepted.Load() > 0 {
			t.Logf("reached the broker past the hung node in %v", took.Round(time.Millisecond))
			if took > 15*time.Second {
				t.Errorf("Dial took %v past a hung node, want well under amqp091-go's 30 s", took)
			}
		}
	}
	if accepted.Load() == 0 {
		t.Fatal("no attempt went to the hung node")
	}
}

// With the hung node alone, the error says the attempt timed out, and
// names no password.
func TestDialGivesUpOnAHungNode(t *testing.T) {
	hung, _ := hungNode(t)
	hung = strings.Replace(hung, "guest:guest", "guest:HUNGSECRET", 1)
	began := time.Now()
	_, err := producer.Dial(hung, "pushrelay", 4)
	took := time.Since(began)
	if err == nil {
		t.Fatal("Dial to a hung node succeeded")
	}
	if took > 15*time.Second {
		t.Errorf("Dial gave up after %v, want well under amqp091-go's 30 s", took)
	}
	if strings.Contains(err.Error(), "HUNGSECRET") {
		t.Errorf("error shows the password: %v", err)
	}
	t.Logf("after %v: %v", took.Round(time.Millisecond), err)
}

// The caller's timeout, and a URL's own connection_timeout, bound the
// attempt instead of the default.
func TestDialTimeoutCanBeChanged(t *testing.T) {
	hung, _ := hungNode(t)
	for name, tc := range map[string]struct {
		url  string
		opts []producer.Option
	}{
		"WithDialTimeout":    {hung, []producer.Option{producer.WithDialTimeout(300 * time.Millisecond)}},
		"connection_timeout": {hung + "?connection_timeout=300", nil},
	} {
		began := time.Now()
		_, err := producer.Dial(tc.url, "pushrelay", 4, tc.opts...)
		if took := time.Since(began); err == nil || took > 2*time.Second {
			t.Errorf("%s: Dial returned %v after %v, want an error after about 300ms", name, err, took)
		}
	}
	if _, err := producer.Dial(hung, "pushrelay", 4, producer.WithDialTimeout(0)); err == nil || !strings.Contains(err.Error(), "timeout") {
		t.Errorf("WithDialTimeout(0): %v, want a refusal", err)
	}
}

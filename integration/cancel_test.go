package integration

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// Issue 10: the host queue deleted under the relay, and the broker's
// basic.cancel never reaches it. RabbitMQ 3.10.8 itself sometimes sends
// none (cluster_test.go's Cancel subtest meets it in about 1 run of 4);
// here a proxy between the relay and the broker drops it, so that the case
// is certain. The relay must find the queue gone on its own, declare it
// again with its bindings, and consume; before the queue watch it stayed
// a consumer of nothing until restarted.
func TestQueueDeletedWithoutCancel(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		host := uniqueHost("it-nocancel")
		broker, err := url.Parse(amqpURL)
		if err != nil {
			t.Fatal(err)
		}
		proxy := startCancelDropper(t, broker.Host)
		ngx := startNginxModule(t, m)
		b := newBroker(t, "pushrelay."+host)
		r := launchRelay(t, RelayOptions{Host: host, AMQPURL: "amqp://guest:guest@" + proxy.addr + "/",
			Exchange: b.Exchange, Publish: ngx.PublishURL(), Dialect: m.Dialect()})
		waitFor(t, "the relay to consume", 20*time.Second, func() bool { return r.Metric("pushrelay_amqp_connected") == 1 })
		chans := channels(host, 10)
		subs := subscribeAll(t, ngx, chans, kindsOn(m)...)
		b.MustPublish(seqMsgs(chans, 1)...)
		waitAll(t, subs, 1, 10*time.Second)
		// A session lost sooner than minHealthySession (5 s) backs off
		// like a failed connect; production queues live longer.
		time.Sleep(5 * time.Second)

		deleted := time.Now()
		rabbitmqctl(t, "delete_queue", "pushrelay."+host)
		waitFor(t, "the relay to consume from the queue again", 30*time.Second, func() bool {
			return r.Metric("pushrelay_amqp_reconnects_total") >= 1 && r.Metric("pushrelay_amqp_connected") == 1
		})
		t.Logf("consuming again %v after the delete; %d basic.cancel dropped by the proxy",
			time.Since(deleted).Round(time.Millisecond), proxy.dropped.Load())
		if !strings.Contains(r.Log(), "the host queue is gone") {
			t.Errorf("the relay did not say why it reconnected:\n%s", r.Log())
		}
		for seq := 2; seq <= 5; seq++ {
			b.MustPublish(seqMsgs(chans, seq)...)
		}
		if dups := waitAll(t, subs, 5, 30*time.Second); dups != 0 {
			t.Errorf("%d duplicates", dups)
		}
		if rc := r.Metric("pushrelay_amqp_reconnects_total"); rc != 1 {
			t.Errorf("reconnects_total %v after one delete, want 1", rc)
		}
	})
}

// cancelDropper is a TCP proxy to a RabbitMQ node that forwards everything
// except the broker's basic.cancel method frames.
type cancelDropper struct {
	addr    string
	dropped atomic.Int64
}

func startCancelDropper(t *testing.T, broker string) *cancelDropper {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cancelDropper{addr: ln.Addr().String()}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn
	)
	track := func(c net.Conn) {
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			client, err := ln.Accept()
			if err != nil {
				return // closed at cleanup
			}
			server, err := net.Dial("tcp", broker)
			if err != nil {
				client.Close()
				continue
			}
			track(client)
			track(server)
			wg.Add(2)
			go func() { defer wg.Done(); io.Copy(server, client); server.Close() }()
			go func() { defer wg.Done(); p.filter(client, server); client.Close() }()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return p
}

// filter copies the broker's frames to the client, dropping basic.cancel
// (a method frame, type 1, of class 60, method 30). The broker's side of
// the connection is frames only: it answers the client's protocol header
// with connection.start.
func (p *cancelDropper) filter(client, server net.Conn) {
	in := bufio.NewReader(server)
	for {
		var head [7]byte
		if _, err := io.ReadFull(in, head[:]); err != nil {
			return
		}
		frame := make([]byte, 7+binary.BigEndian.Uint32(head[3:])+1) // header, payload, frame-end
		copy(frame, head[:])
		if _, err := io.ReadFull(in, frame[7:]); err != nil {
			return
		}
		if head[0] == 1 && len(frame) >= 11 &&
			binary.BigEndian.Uint16(frame[7:]) == 60 && binary.BigEndian.Uint16(frame[9:]) == 30 {
			p.dropped.Add(1)
			continue
		}
		if _, err := client.Write(frame); err != nil {
			return
		}
	}
}

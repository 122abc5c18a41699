package integration

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// Issue 10, found on review: the relay needs one broker node, so a node of
// amqp.urls with a wrong password, or a dead one, used to show only on the
// day the others were down too. Now the relay names each failing node
// (password hidden) and counts them in pushrelay_amqp_nodes_failing,
// while it consumes through the good one. The publisher module plays no
// part here: Nchan only.
func TestFailingNodesAreNamed(t *testing.T) {
	ngx := startNginxModule(t, stack.Nchan)
	b := newBroker(t)
	port, err := stack.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	wrongPassword := strings.Replace(amqpURL, "guest:guest@", "guest:Sekr1tWrong@", 1)
	closed := fmt.Sprintf("amqp://guest:guest@127.0.0.1:%d/", port) // nothing listens
	r := launchRelay(t, RelayOptions{Host: uniqueHost("it-nodes-named"), Exchange: b.Exchange,
		AMQPURL: strings.Join([]string{wrongPassword, amqpURL, closed}, ","), Publish: ngx.PublishURL(), Dialect: "nchan"})
	waitFor(t, "the relay to consume", 30*time.Second, func() bool { return r.Metric("pushrelay_amqp_connected") == 1 })
	waitFor(t, "both failing nodes counted", 30*time.Second, func() bool { return r.Metric("pushrelay_amqp_nodes_failing") == 2 })
	log := r.Log()
	for _, node := range []string{"amqp://guest:xxxxx@127.0.0.1:5672/", fmt.Sprintf("amqp://guest:xxxxx@127.0.0.1:%d/", port)} {
		if !strings.Contains(log, "AMQP node fails") || !strings.Contains(log, node) {
			t.Errorf("the log does not name failing node %s:\n%s", node, log)
		}
	}
	if strings.Contains(log, "Sekr1tWrong") {
		t.Errorf("the log shows the password:\n%s", log)
	}
}

// Issue 10, found on review: a reload adding a node that hangs (it takes
// the TCP connection, then says nothing: a frozen VM) in front of the one
// the relay uses. The new list is tried node by node at once, each with its
// own timeout, so the hung node cannot use up the good one's; and since the
// session's node stays in the list, it needs no new session.
func TestReloadAddingAHungNodeKeepsTheSession(t *testing.T) {
	ngx := startNginxModule(t, stack.Nchan)
	b := newBroker(t)
	hung := startSilentListener(t)
	o := RelayOptions{Host: uniqueHost("it-nodes-hung"), Exchange: b.Exchange, AMQPURL: amqpURL,
		Publish: ngx.PublishURL(), Dialect: "nchan"}
	r := launchRelay(t, o)
	waitFor(t, "the relay to consume", 30*time.Second, func() bool { return r.Metric("pushrelay_amqp_connected") == 1 })
	chans := channels("hungnode", 10)
	subs := subscribeAll(t, ngx, chans, EventSource)
	b.MustPublish(seqMsgs(chans, 1)...)
	waitAll(t, subs, 1, 10*time.Second)

	o.AMQPURL = "amqp://guest:guest@" + hung + "/," + amqpURL
	if err := r.Relay.WriteConfig(o); err != nil { // not RelayProc's: it puts back the one URL
		t.Fatal(err)
	}
	r.Reload()
	waitFor(t, "the reload decided", 30*time.Second, func() bool {
		return r.Metric(`pushrelay_config_reloads_total{result="success"}`)+r.Metric(`pushrelay_config_reloads_total{result="failure"}`) >= 1
	})
	if got := r.Metric(`pushrelay_config_reloads_total{result="success"}`); got != 1 {
		t.Fatalf("the reload adding a hung node to the working one was refused:\n%s", r.Log())
	}
	waitFor(t, "the new node list applied", 10*time.Second, func() bool { return r.Metric("pushrelay_config_applied") == 1 })
	b.MustPublish(seqMsgs(chans, 2)...)
	waitAll(t, subs, 2, 10*time.Second)
	if rc := r.Metric("pushrelay_amqp_reconnects_total"); rc != 0 {
		t.Errorf("%v reconnects for a node list that keeps the session's node", rc)
	}
	if !strings.Contains(r.Log(), "some nodes of the new AMQP URLs fail") {
		t.Errorf("the relay did not name the hung node:\n%s", r.Log())
	}
}

// startSilentListener accepts TCP connections and never answers, as a
// SIGSTOPped broker node does; it returns its address.
func startSilentListener(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
		done  = make(chan struct{})
	)
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	return ln.Addr().String()
}

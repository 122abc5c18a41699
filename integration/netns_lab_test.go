package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// netnsLab is one frontend in a network namespace of the test's own: the
// relay and its Nginx run inside it, the broker is reached over one veth
// pair through an in-process toxiproxy in the root namespace, and the
// test's subscribers and metric reads come in over a second veth pair, so
// that cutting or squeezing the broker link leaves the browsers' side and
// the test's view of the relay alone. Every address is on these veths;
// the namespace has no other route, so nothing it sends can go elsewhere.
type netnsLab struct {
	t          *testing.T
	ns         string
	brokerDev  string // root end of the broker link: the one tests cut and squeeze
	brokerPeer string // its end inside the namespace
	webIP      string // Nginx and the relay's /metrics listen here, inside
	proxy      *toxiproxy.Proxy
	host       string
	broker     *Broker
	nginx      *Nginx
	relay      *RelayProc
	opts       RelayOptions
	heartbeat  string // [amqp] heartbeat; "" keeps the relay's default
}

var netnsSeq atomic.Int32

// requireNetns skips unless this process can make network namespaces.
func requireNetns(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network namespaces need root")
	}
	if out, err := exec.Command("ip", "netns", "list").CombinedOutput(); err != nil {
		t.Skipf("ip netns unavailable: %v %s", err, strings.TrimSpace(string(out)))
	}
}

// runIP runs ip(8) and fails the test on error.
func runIP(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// freeSubnet picks x such that no interface holds an address in
// 10.213.x.0/24, so that parallel runs (or a run's leftovers) never share
// a link.
func freeSubnet(t *testing.T, seq int) int {
	t.Helper()
	out, err := exec.Command("ip", "-o", "-4", "addr", "show").Output()
	if err != nil {
		t.Fatalf("ip addr: %v", err)
	}
	for i := range 250 {
		x := (os.Getpid()+seq*37+i)%250 + 1
		if !strings.Contains(string(out), fmt.Sprintf(" 10.213.%d.", x)) {
			return x
		}
	}
	t.Fatal("no free 10.213.x.0/24 for the test's veths")
	return 0
}

// newNetnsLab builds the namespace and its two links, and starts the
// forwarder. The frontend starts with start.
func newNetnsLab(t *testing.T, host string) *netnsLab {
	t.Helper()
	requireNetns(t)
	seq := int(netnsSeq.Add(1))
	id := fmt.Sprintf("%04x%d", os.Getpid()&0xffff, seq%100) // veth names have 15 bytes at most
	l := &netnsLab{t: t, ns: fmt.Sprintf("pushrelay-it-%d-%d", os.Getpid(), seq),
		brokerDev: "prb" + id, brokerPeer: "prb" + id + "n", host: uniqueHost(host)}
	webDev := "prw" + id
	x := freeSubnet(t, seq)
	rootIP, nsIP := fmt.Sprintf("10.213.%d.1", x), fmt.Sprintf("10.213.%d.2", x)
	webRoot, webNS := fmt.Sprintf("10.213.%d.5", x), fmt.Sprintf("10.213.%d.6", x)
	l.webIP = webNS

	runIP(t, "netns", "add", l.ns)
	// Deleting the namespace deletes the veth ends inside it, and with
	// them their peers and qdiscs; the explicit deletes cover a test that
	// failed between creating a pair and moving its end.
	t.Cleanup(func() {
		for _, dev := range []string{l.brokerDev, webDev} {
			exec.Command("ip", "link", "del", dev).Run()
		}
		if out, err := exec.Command("ip", "netns", "del", l.ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v %s", l.ns, err, out)
		}
	})
	for _, link := range []struct{ dev, root, peer, in string }{
		{l.brokerDev, rootIP, l.brokerPeer, nsIP},
		{webDev, webRoot, webDev + "n", webNS},
	} {
		runIP(t, "link", "add", link.dev, "type", "veth", "peer", "name", link.peer, "netns", l.ns)
		runIP(t, "addr", "add", link.root+"/30", "dev", link.dev)
		runIP(t, "link", "set", link.dev, "up")
		runIP(t, "-n", l.ns, "addr", "add", link.in+"/30", "dev", link.peer)
		runIP(t, "-n", l.ns, "link", "set", link.peer, "up")
	}
	runIP(t, "-n", l.ns, "link", "set", "lo", "up") // the relay reaches Nginx's publisher on loopback

	// The broker sees toxiproxy's loopback connection, so guest/guest
	// works; toxics on it act on the AMQP stream itself.
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	l.proxy = toxiproxy.NewProxy(srv, "amqp", net.JoinHostPort(rootIP, "0"), "127.0.0.1:5672")
	if err := l.proxy.Start(); err != nil {
		t.Fatalf("toxiproxy on %s: %v", rootIP, err)
	}
	t.Cleanup(l.proxy.Stop)
	return l
}

// inNetns runs f on an OS thread moved into namespace ns, so that what f
// starts is born there: a child process inherits the namespace of the
// thread that forks it. The thread goes back to the root namespace before
// it is released to other goroutines; if it cannot, it is never released
// and dies with the goroutine.
func inNetns(ns string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		root, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer unix.Close(root)
		target, err := unix.Open("/run/netns/"+ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer unix.Close(target)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		ferr := f()
		if err := unix.Setns(root, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("back to the root namespace: %w (after %v)", err, ferr)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// start runs Nginx (Nchan) and the relay inside the namespace, the relay
// consuming through the forwarder. The network faults here are all on the
// AMQP side, which the relay handles the same way for either module, so
// one module keeps the suite short.
func (l *netnsLab) start(o RelayOptions) {
	t := l.t
	t.Helper()
	port, err := stack.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	var n *stack.Nginx
	dir := t.TempDir()
	// stack.StartNginx takes no wrapper command, so Nginx is forked from a
	// thread moved into the namespace. Its Pdeathsig is tied to that
	// thread, which inNetns hands back to the runtime alive.
	err = inNetns(l.ns, func() error {
		var err error
		n, err = stack.StartNginx(stack.NginxOptions{Dir: dir, Module: stack.Nchan,
			Listen: net.JoinHostPort(l.webIP, strconv.Itoa(port))})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Stop)
	l.nginx = &Nginx{Nginx: n, t: t, Port: port}

	l.broker = newBroker(t, "pushrelay."+l.host)
	o.Host, o.Exchange, o.Publish, o.Dialect = l.host, l.broker.Exchange, n.PublishURL(), stack.Nchan.Dialect()
	o.AMQPURL = "amqp://guest:guest@" + l.proxy.Listen + "/"
	l.opts = o
	sr, err := stack.NewRelay(relayBin, t.TempDir(), o)
	if err != nil {
		t.Fatal(err)
	}
	mport, err := stack.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	sr.MetricsAddr = net.JoinHostPort(l.webIP, strconv.Itoa(mport))
	sr.Wrapper = []string{"ip", "netns", "exec", l.ns}
	l.relay = &RelayProc{Relay: sr, t: t}
	l.writeConfig(o)
	l.relay.Start()
	t.Cleanup(func() {
		l.relay.Stop()
		if t.Failed() {
			t.Logf("relay %s log:\n%s", l.host, l.relay.Log())
		}
	})
}

// writeConfig writes the relay's config: o's keys with the lab's host,
// exchange, publisher and broker, and the lab's heartbeat put into [amqp].
func (l *netnsLab) writeConfig(o RelayOptions) {
	l.t.Helper()
	o.Host, o.Exchange, o.Publish, o.Dialect, o.AMQPURL = l.opts.Host, l.opts.Exchange, l.opts.Publish, l.opts.Dialect, l.opts.AMQPURL
	text := o.TOML(l.relay.MetricsAddr)
	if l.heartbeat != "" {
		with := strings.Replace(text, "\n[push]\n", fmt.Sprintf("\nheartbeat = %q\n[push]\n", l.heartbeat), 1)
		if with == text {
			l.t.Fatalf("no [push] table to put the heartbeat before:\n%s", text)
		}
		text = with
	}
	if err := os.WriteFile(l.relay.Config, []byte(text), 0o644); err != nil {
		l.t.Fatal(err)
	}
}

// linkDown takes the root end of the broker link down: the peer loses its
// carrier and every packet either way is dropped, with no RST or FIN, so
// both ends of the AMQP connection are left half-open.
func (l *netnsLab) linkDown() { runIP(l.t, "link", "set", l.brokerDev, "down") }

// linkUp brings it back; the kernel restores its connected route.
func (l *netnsLab) linkUp() { runIP(l.t, "link", "set", l.brokerDev, "up") }

// shape puts a token bucket at rate on both ends of the broker link (tbf
// shapes egress only), and returns a function that removes both, also run
// at cleanup in case the test stops first.
func (l *netnsLab) shape(rate string) (unshape func()) {
	t := l.t
	t.Helper()
	spec := []string{"root", "tbf", "rate", rate, "burst", "16kb", "latency", "400ms"}
	tc := func(args ...string) error {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %v %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := tc(append([]string{"tc", "qdisc", "add", "dev", l.brokerDev}, spec...)...); err != nil {
		t.Fatal(err)
	}
	if err := tc(append([]string{"ip", "netns", "exec", l.ns, "tc", "qdisc", "add", "dev", l.brokerPeer}, spec...)...); err != nil {
		tc("tc", "qdisc", "del", "dev", l.brokerDev, "root")
		t.Fatal(err)
	}
	done := false
	unshape = func() {
		if done {
			return
		}
		done = true
		if err := tc("tc", "qdisc", "del", "dev", l.brokerDev, "root"); err != nil {
			t.Error(err)
		}
		if err := tc("ip", "netns", "exec", l.ns, "tc", "qdisc", "del", "dev", l.brokerPeer, "root"); err != nil {
			t.Error(err)
		}
	}
	t.Cleanup(unshape)
	return unshape
}

// tbfOverlimits is how often the root end's token bucket held a packet
// back: zero means the link was never actually squeezed.
func (l *netnsLab) tbfOverlimits() int {
	out, _ := exec.Command("tc", "-s", "qdisc", "show", "dev", l.brokerDev).Output()
	f := strings.Fields(string(out))
	for i, w := range f {
		if w == "overlimits" && i+1 < len(f) {
			n, _ := strconv.Atoi(f[i+1])
			return n
		}
	}
	return -1
}

// toxic adds a toxiproxy toxic, given as its JSON, to the AMQP stream and
// returns a function that removes it (also run at cleanup).
func (l *netnsLab) toxic(name, typ, stream string, attrs string) (remove func()) {
	t := l.t
	t.Helper()
	body := fmt.Sprintf(`{"name":%q,"type":%q,"stream":%q,"toxicity":1,"attributes":%s}`, name, typ, stream, attrs)
	if _, err := l.proxy.Toxics.AddToxicJson(strings.NewReader(body)); err != nil {
		t.Fatalf("toxic %s: %v", name, err)
	}
	done := false
	remove = func() {
		if !done {
			done = true
			l.proxy.Toxics.RemoveToxic(context.Background(), name)
		}
	}
	t.Cleanup(remove)
	return remove
}

// metric reads one sample of the relay's /metrics, failing the test when
// it is missing: a gauge that is not exported must not read as a value.
func (l *netnsLab) metric(sample string) float64 {
	l.t.Helper()
	v := l.relay.Metric(sample)
	if v < 0 {
		l.t.Fatalf("no %s in the relay's /metrics", sample)
	}
	return v
}

// waitDisconnected waits for the relay to notice a dead link, and returns
// how long it took.
func (l *netnsLab) waitDisconnected(since time.Time, timeout time.Duration) time.Duration {
	l.t.Helper()
	waitFor(l.t, "the relay to notice the dead link", timeout, func() bool {
		return l.relay.Metric("pushrelay_amqp_connected") == 0
	})
	return time.Since(since)
}

// waitRecovered waits until the relay consumes on a new connection (more
// reconnects than before, and connected), and returns the time since
// since: the recovery time.
func (l *netnsLab) waitRecovered(reconnectsBefore float64, since time.Time, timeout time.Duration) time.Duration {
	l.t.Helper()
	waitFor(l.t, "the relay to consume again", timeout, func() bool {
		return l.relay.Metric("pushrelay_amqp_reconnects_total") > reconnectsBefore &&
			l.relay.Metric("pushrelay_amqp_connected") == 1
	})
	return time.Since(since)
}

// warmUp publishes the warm-up message (body "0") through the broker and
// the relay until every subscriber got it: then a message the relay
// publishes is sure to reach them. (waitSubscribed posts to Nginx's
// publisher from this namespace, which cannot reach a loopback-only
// publisher inside the lab's.)
func (l *netnsLab) warmUp(subs []*Subscriber, timeout time.Duration) {
	l.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var cold []Msg
		for _, s := range subs {
			if !slices.Contains(s.Got(), 0) {
				cold = append(cold, Msg{Channel: s.Channel, Body: []byte("0"), Type: "comment"})
			}
		}
		if len(cold) == 0 {
			return
		}
		if time.Now().After(deadline) {
			l.t.Fatalf("%d subscribers never got the warm-up message through the relay within %v, e.g. %s",
				len(cold), timeout, cold[0].Channel)
		}
		l.broker.MustPublish(cold...)
		time.Sleep(500 * time.Millisecond)
	}
}

// Command demo shows the whole pipeline on this machine in under a minute:
// it starts Nginx + Nchan with the project's config and the pushrelay
// binary, subscribes like a browser over EventSource, publishes comments
// through RabbitMQ as the web tier does, and prints what arrived with the
// latency from publish to browser. It stops everything it started.
//
//	make demo    (or: PUSHRELAY_BIN=bin/pushrelay go run ./integration/cmd/demo)
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/integration/stack"
	"github.com/pushrelay/pushrelay/sidecar/producer"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

type options struct {
	amqpURL  string
	channels int
	messages int
	rate     int
	bin      string
}

func main() {
	var o options
	flag.StringVar(&o.amqpURL, "amqp", "amqp://guest:guest@127.0.0.1:5672/", "RabbitMQ URL")
	flag.IntVar(&o.channels, "channels", 5, "channels (threads) to publish on")
	flag.IntVar(&o.messages, "messages", 300, "messages in all")
	flag.IntVar(&o.rate, "rate", 150, "messages per second")
	flag.StringVar(&o.bin, "bin", envOr("PUSHRELAY_BIN", "bin/pushrelay"), "pushrelay binary")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// body is what the web tier publishes for one comment.
type body struct {
	Seq    int    `json:"seq"`
	SentUS int64  `json:"sent_us"`
	Text   string `json:"text"`
}

// arrival is one message as the browser saw it.
type arrival struct {
	seq     int
	latency time.Duration
}

func run(ctx context.Context, o options) error {
	dir, err := os.MkdirTemp("", "pushrelay-demo")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	step("starting Nginx + Nchan with nginx/pushrelay-nchan.conf")
	ngx, err := stack.StartNginx(stack.NginxOptions{Dir: dir})
	if err != nil {
		return err
	}
	defer ngx.Stop()
	fmt.Printf("   publisher  %s   (loopback only)\n   browsers   %s\n", ngx.PublishURL(), ngx.URL("/ev/CHANNEL"))

	const host = "demo"
	queue := "pushrelay." + host
	defer deleteQueue(o.amqpURL, queue) // leave no binding behind on the shared exchange

	step("starting pushrelay (host %q, queue %s)", host, queue)
	relay, err := stack.NewRelay(o.bin, dir, stack.RelayConfig{
		Host: host, AMQPURL: o.amqpURL, Exchange: "pushrelay", Publish: ngx.PublishURL(),
	})
	if err != nil {
		return err
	}
	if err := relay.Start(); err != nil {
		return err
	}
	defer relay.Stop()
	fmt.Printf("   metrics    http://%s/metrics\n", relay.MetricsAddr)

	chans := make([]string, o.channels)
	for i := range chans {
		chans[i] = fmt.Sprintf("thread:%d", 1000+i)
	}
	step("subscribing one browser to %d threads over EventSource", len(chans))
	var (
		mu  sync.Mutex
		got = map[string][]arrival{}
	)
	subCtx, cancelSubs := context.WithCancel(ctx)
	var wg sync.WaitGroup
	opened := make(chan struct{}, len(chans))
	errs := make(chan error, len(chans))
	for _, ch := range chans {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := stack.ReadEventSource(subCtx, ngx.URL("/ev/"+ch), "", func() { opened <- struct{}{} }, func(ev stack.Event) {
				var b body
				if json.Unmarshal([]byte(ev.Data), &b) != nil {
					return
				}
				lat := time.Since(time.UnixMicro(b.SentUS))
				mu.Lock()
				got[ch] = append(got[ch], arrival{b.Seq, lat})
				n := len(got[ch])
				mu.Unlock()
				if n <= 2 {
					fmt.Printf("   browser ← %-12s event=%s id=%s  %q  %.2f ms\n", ch, ev.Type, ev.ID, b.Text, ms(lat))
				}
			})
			if subCtx.Err() == nil {
				errs <- err
			}
		}()
	}
	defer func() { cancelSubs(); wg.Wait() }()
	for range chans {
		select {
		case <-opened:
		case err := <-errs:
			return err
		case <-time.After(10 * time.Second):
			return fmt.Errorf("subscribers did not connect")
		}
	}

	step("publishing %d comments to RabbitMQ at %d/s (exchange pushrelay, routing key = shard of the channel)", o.messages, o.rate)
	pub, err := producer.Dial(o.amqpURL, "pushrelay", shard.DefaultCount)
	if err != nil {
		return err
	}
	defer pub.Close()
	tick := time.NewTicker(time.Second / time.Duration(o.rate))
	defer tick.Stop()
	for i := 0; i < o.messages; i++ {
		ch := chans[i%len(chans)]
		seq := i/len(chans) + 1
		b, _ := json.Marshal(body{Seq: seq, SentUS: time.Now().UnixMicro(), Text: fmt.Sprintf("comment %d on %s", seq, ch)})
		if err := pub.Publish(ctx, producer.Message{Channel: ch, Body: b, Type: "comment", ID: fmt.Sprint(seq), ContentType: "application/json"}); err != nil {
			return err
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}

	total := func() int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, a := range got {
			n += len(a)
		}
		return n
	}
	deadline := time.Now().Add(10 * time.Second)
	for total() < o.messages && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}

	step("what the browser received")
	mu.Lock()
	var lats []time.Duration
	ok := true
	for _, ch := range chans {
		a := got[ch]
		inOrder := slices.IsSortedFunc(a, func(x, y arrival) int { return x.seq - y.seq })
		want := o.messages / len(chans)
		if i := slices.Index(chans, ch); i < o.messages%len(chans) {
			want++
		}
		fmt.Printf("   %-12s %3d/%d messages, in order: %v\n", ch, len(a), want, inOrder)
		ok = ok && inOrder && len(a) == want
		for _, x := range a {
			lats = append(lats, x.latency)
		}
	}
	mu.Unlock()
	slices.Sort(lats)
	if len(lats) > 0 {
		fmt.Printf("   latency publish → browser over %d messages: p50 %.2f ms  p90 %.2f ms  p99 %.2f ms  max %.2f ms\n",
			len(lats), ms(pct(lats, 50)), ms(pct(lats, 90)), ms(pct(lats, 99)), ms(lats[len(lats)-1]))
	}

	step("the relay's own figures (from /metrics)")
	if text, err := relay.Metrics(); err == nil {
		for _, line := range strings.Split(text, "\n") {
			for _, name := range []string{"pushrelay_messages_received_total", "pushrelay_messages_published_total",
				"pushrelay_messages_in_flight", "pushrelay_message_lag_seconds_count", "pushrelay_amqp_connected",
				"pushrelay_nginx_subscribers", "pushrelay_nginx_channels"} {
				if strings.HasPrefix(line, name+" ") {
					fmt.Println("   " + line)
				}
			}
		}
	}

	step("stopping pushrelay (SIGTERM: finishes and acks what is in flight) and Nginx")
	if err := relay.Stop(); err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%d of %d messages arrived, or some out of order", total(), o.messages)
	}
	fmt.Println("\ndemo ok: every message reached its subscriber, in order.")
	return nil
}

func step(format string, args ...any) { fmt.Printf("\n==> "+format+"\n", args...) }

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func pct(sorted []time.Duration, p int) time.Duration {
	return sorted[min(len(sorted)-1, len(sorted)*p/100)]
}

func deleteQueue(url, queue string) {
	conn, err := amqp.Dial(url)
	if err != nil {
		return
	}
	defer conn.Close()
	if ch, err := conn.Channel(); err == nil {
		ch.QueueDelete(queue, false, false, false)
	}
}

package integration

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// What a browser sees is the contract: these tests publish through the
// relay and look at every field a subscriber receives, as the raw protocol
// carries it, on each publisher module.

// seen is one message as a subscriber received it.
type seen struct {
	ContentType string // the response's (SSE, long-poll) or the frame meta's (ws+meta.nchan)
	Event, ID   string // SSE event: and id: lines
	Data        string
	Frame       websocket.MessageType // WebSocket only
}

// probe is one raw subscriber that records everything it receives.
type probe struct {
	kind Kind
	meta bool // WebSocket with Nchan's ws+meta.nchan subprotocol
	mu   sync.Mutex
	got  []seen
	err  error
}

func (p *probe) String() string {
	if p.meta {
		return string(p.kind) + "(ws+meta.nchan)"
	}
	return string(p.kind)
}

func (p *probe) add(s seen) {
	p.mu.Lock()
	p.got = append(p.got, s)
	p.mu.Unlock()
}

// messages returns what arrived, without the warm-up messages (data "0").
func (p *probe) messages() []seen {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []seen
	for _, s := range p.got {
		if s.Data != "0" {
			out = append(out, s)
		}
	}
	return out
}

func (p *probe) warmedUp() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.got) > 0
}

// startProbes subscribes one probe of each kind to channel and returns
// once each has received a warm-up message published straight to Nginx.
func startProbes(t *testing.T, n *Nginx, m stack.Module, channel string) []*probe {
	t.Helper()
	probes := []*probe{{kind: EventSource}, {kind: WebSocket}, {kind: LongPoll}}
	if m == stack.Nchan {
		probes = append(probes, &probe{kind: WebSocket, meta: true})
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, p := range probes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := p.run(ctx, n.URL(""), channel)
			p.mu.Lock()
			p.err = err
			p.mu.Unlock()
		}()
	}
	t.Cleanup(func() { cancel(); wg.Wait() })
	waitFor(t, "probes to receive the warm-up message", 30*time.Second, func() bool {
		for _, p := range probes {
			if !p.warmedUp() {
				n.Publish(channel, "0") // retried until it arrives
				time.Sleep(200 * time.Millisecond)
				return false
			}
		}
		return true
	})
	return probes
}

func (p *probe) run(ctx context.Context, base, channel string) error {
	switch p.kind {
	case EventSource:
		return p.eventSource(ctx, base+"/ev/"+channel)
	case WebSocket:
		return p.webSocket(ctx, "ws"+strings.TrimPrefix(base, "http")+"/ws/"+channel)
	default:
		return p.longPoll(ctx, base+"/lp/"+channel)
	}
}

func (p *probe) eventSource(ctx context.Context, url string) error {
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("eventsource: status %d", resp.StatusCode)
	}
	ct := resp.Header.Get("Content-Type")
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	cur := seen{ContentType: ct}
	var data []string
	for sc.Scan() {
		// Field parsing as the EventSource spec has it: "field: value",
		// one optional space after the colon; comments start with ':'.
		line := sc.Text()
		if line == "" {
			if data != nil && cur.Event != "ping" {
				cur.Data = strings.Join(data, "\n")
				p.add(cur)
			}
			cur, data = seen{ContentType: ct}, nil
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "id":
			cur.ID = value
		case "event":
			cur.Event = value
		case "data":
			data = append(data, value)
		}
	}
	return fmt.Errorf("eventsource: stream ended: %v", sc.Err())
}

func (p *probe) webSocket(ctx context.Context, url string) error {
	var opts websocket.DialOptions
	if p.meta {
		opts.Subprotocols = []string{"ws+meta.nchan"}
	}
	c, _, err := websocket.Dial(ctx, url, &opts)
	if err != nil {
		return err
	}
	defer c.CloseNow()
	c.SetReadLimit(1 << 20)
	for {
		typ, frame, err := c.Read(ctx)
		if err != nil {
			return err
		}
		s := seen{Frame: typ, Data: string(frame)}
		if p.meta {
			// "id: <sec>:<n>\n[content-type: <type>\n]\n<body>"
			meta, body, _ := strings.Cut(string(frame), "\n\n")
			s.Data = body
			for _, line := range strings.Split(meta, "\n") {
				if v, ok := strings.CutPrefix(line, "id: "); ok {
					s.ID = v
				}
				if v, ok := strings.CutPrefix(line, "content-type: "); ok {
					s.ContentType = v
				}
			}
		}
		p.add(s)
	}
}

func (p *probe) longPoll(ctx context.Context, url string) error {
	var lastMod, etag string
	client := &http.Client{Timeout: 60 * time.Second}
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
		if lastMod != "" {
			req.Header.Set("If-Modified-Since", lastMod)
			req.Header.Set("If-None-Match", etag)
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		switch resp.StatusCode {
		case 200:
			lastMod, etag = resp.Header.Get("Last-Modified"), resp.Header.Get("Etag")
			p.add(seen{ContentType: resp.Header.Get("Content-Type"), Data: string(body)})
		case 304, 408:
		default:
			return fmt.Errorf("long-poll: status %d", resp.StatusCode)
		}
	}
}

// contractMsgs are published through the relay, in this order, to one
// channel: with and without type, id and content type, and a body of two
// lines (one SSE data: line each).
func contractMsgs(ch string) []Msg {
	return []Msg{
		{Channel: ch, Body: []byte(`{"n":1}`), Type: "comment", ID: "c-1", ContentType: "application/json"},
		{Channel: ch, Body: []byte("two"), ContentType: noContentType},
		{Channel: ch, Body: []byte("line one\nline two"), Type: "reply", ID: "c-3", ContentType: noContentType},
	}
}

// nchanID is the id Nchan gives every message: <unix seconds>:<n>.
var nchanID = regexp.MustCompile(`^[0-9]+:[0-9]+$`)

// Issue 12: what each kind of subscriber receives for each message, on
// each module. Catches the event type sent in the other module's header
// (SSE event lost), a missing Event-Id on Push Stream (SSE id lost, so
// resume breaks), and octet-stream as the default content type (Nchan's
// WebSocket clients get binary frames, long-poll clients a binary type).
func TestSubscribersSeeTheMessageContract(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		host := uniqueHost("it-contract-" + string(m))
		n := startNginxModule(t, m)
		const ch = "contract:1"
		probes := startProbes(t, n, m, ch)
		b := newBroker(t, "pushrelay."+host)
		startRelay(t, RelayOptions{Host: host, Exchange: b.Exchange, Publish: n.PublishURL(), Dialect: m.Dialect()})
		msgs := contractMsgs(ch)
		b.MustPublish(msgs...)

		for _, p := range probes {
			var got []seen
			deadline := time.Now().Add(15 * time.Second)
			for {
				got = p.messages()
				if len(got) >= len(msgs) || time.Now().After(deadline) {
					break
				}
				// Push Stream's long-poll joins what is pending into one
				// response: wait for the bodies, not the count.
				if p.kind == LongPoll && m == stack.PushStream && joinData(got) == joinBodies(msgs) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			p.mu.Lock()
			perr := p.err
			p.mu.Unlock()
			checkContract(t, m, p, msgs, got, perr)
		}
	})
}

func joinData(s []seen) string {
	var b strings.Builder
	for _, x := range s {
		b.WriteString(x.Data)
	}
	return b.String()
}

func joinBodies(msgs []Msg) string { return string(bytes.Join(bodies(msgs), nil)) }

func bodies(msgs []Msg) [][]byte {
	out := make([][]byte, len(msgs))
	for i, m := range msgs {
		out[i] = m.Body
	}
	return out
}

// wantContentType is the content type Nchan stores with m: the producer's,
// or the relay's default, text/plain.
func wantContentType(m Msg) string {
	if m.ContentType == noContentType {
		return "text/plain"
	}
	return m.ContentType
}

// checkContract compares what probe p got with the per-module expectations
// of ../shared/docs/publisher-protocols.md.
func checkContract(t *testing.T, m stack.Module, p *probe, msgs []Msg, got []seen, perr error) {
	t.Helper()
	if p.kind == LongPoll && m == stack.PushStream {
		// Every pending message in one response, joined with no separator
		// under the default ~text~ template; the Content-Type is the
		// location's, never the message's (Push Stream ignores it).
		if joinData(got) != joinBodies(msgs) {
			t.Errorf("%s: bodies %q, want %q joined", p, joinData(got), joinBodies(msgs))
		}
		for _, s := range got {
			if strings.HasPrefix(s.ContentType, "application/json") {
				t.Errorf("%s: Content-Type %q: Push Stream must not pass the message's on", p, s.ContentType)
			}
		}
		return
	}
	if len(got) != len(msgs) {
		t.Errorf("%s: %d messages, want %d: %+v (subscriber error: %v)", p, len(got), len(msgs), got, perr)
		return
	}
	for i, msg := range msgs {
		s, what := got[i], fmt.Sprintf("%s message %d", p, i+1)
		if s.Data != string(msg.Body) {
			t.Errorf("%s: data %q, want %q", what, s.Data, msg.Body)
		}
		switch p.kind {
		case EventSource:
			if !strings.HasPrefix(s.ContentType, "text/event-stream") {
				t.Errorf("%s: Content-Type %q, want text/event-stream", what, s.ContentType)
			}
			// The browser's EventSource dispatches by event type: without
			// it every message is a plain "message" event.
			if s.Event != msg.Type {
				t.Errorf("%s: event: %q, want %q", what, s.Event, msg.Type)
			}
			switch m {
			case stack.PushStream:
				// The producer's message_id: the key for Last-Event-Id resume,
				// and what lets clients drop duplicates after a redelivery.
				if s.ID != msg.ID {
					t.Errorf("%s: id: %q, want the message_id %q", what, s.ID, msg.ID)
				}
			case stack.Nchan:
				if !nchanID.MatchString(s.ID) {
					t.Errorf("%s: id: %q, want Nchan's own <sec>:<n>", what, s.ID)
				}
			}
		case WebSocket:
			// A binary frame reaches the browser as a Blob, not a string.
			if s.Frame != websocket.MessageText {
				t.Errorf("%s: frame type %v, want text", what, s.Frame)
			}
			if p.meta {
				if s.ContentType != wantContentType(msg) {
					t.Errorf("%s: meta content-type %q, want %q", what, s.ContentType, wantContentType(msg))
				}
				if !nchanID.MatchString(s.ID) {
					t.Errorf("%s: meta id %q, want Nchan's own <sec>:<n>", what, s.ID)
				}
			}
		case LongPoll: // Nchan: one message per response, with its own type
			if s.ContentType != wantContentType(msg) {
				t.Errorf("%s: Content-Type %q, want %q", what, s.ContentType, wantContentType(msg))
			}
		}
	}
}

// deadLetters collects the dead letters of queue: a private queue bound to
// the fanout pushrelay.dlx gets a copy of each, so the test neither takes
// nor sees other tests' (pushrelay.dead is shared by every relay).
func deadLetters(t *testing.T, queue string) <-chan amqp.Delivery {
	t.Helper()
	conn, err := amqp.Dial(amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(q.Name, "", "pushrelay.dlx", false, nil); err != nil {
		t.Fatalf("bind to pushrelay.dlx (declared by the relay): %v", err)
	}
	all, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	out := make(chan amqp.Delivery, 16)
	go func() {
		defer close(out)
		for d := range all {
			if d.Headers["x-pushrelay-queue"] == queue {
				out <- d
			}
		}
	}()
	return out
}

// Issue 12: a message Nginx refuses (413 here, the body being over its
// client_max_body_size but under the relay's max_body) is dead-lettered
// whole: its body byte for byte, its properties and every header, with the
// reason; and the valid message behind it still arrives.
func TestRefusedMessageIsDeadLetteredWhole(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		host := uniqueHost("it-refused-" + string(m))
		queue := "pushrelay." + host
		n := startNginxModule(t, m)
		const ch = "refused:1"
		sub := subscribe(t, n, ch, EventSource)
		waitSubscribed(t, n, []*Subscriber{sub})
		b := newBroker(t, queue)
		startRelay(t, RelayOptions{Host: host, Exchange: b.Exchange, Publish: n.PublishURL(), Dialect: m.Dialect(), MaxBody: 64 << 10})
		dead := deadLetters(t, queue)

		body := make([]byte, 40<<10) // every byte value, so a mangled copy shows
		for i := range body {
			body[i] = byte(i * 7)
		}
		const publishedAt = int64(1764000000123456)
		refusedMsg := Msg{Channel: ch, Body: body, Type: "comment", ID: "big-1", ContentType: "application/octet-stream",
			Headers:   amqp.Table{"published_at": publishedAt, "x-trace": "req-7f3a"},
			Timestamp: time.Unix(1764000000, 0), AppID: "comments-web", ContentEncoding: "identity"}
		b.MustPublish(refusedMsg, Msg{Channel: ch, Body: []byte("1"), ID: "1", Type: "comment"})
		if _, err := waitCheck(sub, 1, 30*time.Second); err != nil {
			t.Errorf("the message behind the refused one: %v", err)
		}

		var d amqp.Delivery
		select {
		case d = <-dead:
		case <-time.After(30 * time.Second):
			t.Fatal("no dead letter within 30s")
		}
		if !bytes.Equal(d.Body, body) {
			t.Errorf("dead letter body: %d bytes, want the original %d bytes byte for byte", len(d.Body), len(body))
		}
		if d.MessageId != refusedMsg.ID || d.Type != refusedMsg.Type || d.ContentType != refusedMsg.ContentType {
			t.Errorf("dead letter message_id %q type %q content_type %q, want %q %q %q",
				d.MessageId, d.Type, d.ContentType, refusedMsg.ID, refusedMsg.Type, refusedMsg.ContentType)
		}
		if !d.Timestamp.Equal(refusedMsg.Timestamp) || d.AppId != refusedMsg.AppID || d.ContentEncoding != refusedMsg.ContentEncoding {
			t.Errorf("dead letter timestamp %v app_id %q content_encoding %q, want the producer's %v %q %q",
				d.Timestamp, d.AppId, d.ContentEncoding, refusedMsg.Timestamp, refusedMsg.AppID, refusedMsg.ContentEncoding)
		}
		if d.DeliveryMode != amqp.Persistent {
			t.Errorf("dead letter delivery_mode %d, want persistent", d.DeliveryMode)
		}
		want := amqp.Table{
			"channel":            ch,
			"published_at":       publishedAt,
			"x-pushrelay-reason": "nginx_413",
			"x-pushrelay-queue":  queue,
			"x-pushrelay-status": int64(413), // optional; compared as a number
			"x-trace":            "req-7f3a", // the producer's own: copied, not dropped
		}
		for k, v := range want {
			got, ok := d.Headers[k]
			if !ok {
				if k != "x-pushrelay-status" {
					t.Errorf("dead letter header %s missing (headers %v)", k, d.Headers)
				}
				continue
			}
			if fmt.Sprint(got) != fmt.Sprint(v) {
				t.Errorf("dead letter header %s = %#v, want %v", k, got, v)
			}
		}
		for k := range d.Headers {
			if _, ok := want[k]; !ok {
				t.Errorf("dead letter has unexpected header %s = %#v", k, d.Headers[k])
			}
		}
		select {
		case extra := <-dead:
			t.Errorf("a second dead letter: reason %v, %d bytes", extra.Headers["x-pushrelay-reason"], len(extra.Body))
		case <-time.After(500 * time.Millisecond):
		}
	})
}

// waitCheck waits until s saw messages 1..want, then returns Check's result.
func waitCheck(s *Subscriber, want int, timeout time.Duration) (dups int, err error) {
	deadline := time.Now().Add(timeout)
	for {
		dups, err = s.Check(want)
		if err == nil || time.Now().After(deadline) {
			return dups, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

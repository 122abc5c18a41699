package integration

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// Kind is how a browser subscribes.
type Kind string

const (
	EventSource Kind = "eventsource"
	WebSocket   Kind = "websocket"
	LongPoll    Kind = "longpoll"
)

// Subscriber is one browser watching one channel. It reconnects when the
// connection drops and resumes from the last message it saw, as the
// Push Stream / Nchan JavaScript clients do.
type Subscriber struct {
	Channel string
	Kind    Kind
	module  stack.Module
	base    string // http://127.0.0.1:port

	mu         sync.Mutex
	got        []int    // message bodies (sequence numbers) in arrival order
	ids        []string // the SSE id of each message ("" when none)
	arrivals   []time.Time
	lostAt     time.Time // when the last open connection ended
	lastID     string    // SSE / WebSocket resume id
	lastMod    string    // long-poll validators
	etag       string
	connected  bool
	reconnects int
	gen        int                // bumped by Move: older connections no longer set resume ids
	hangup     context.CancelFunc // ends the current connection
}

// subscribe starts a subscriber owned by the test: it stops at cleanup.
func subscribe(t testing.TB, n *Nginx, channel string, kind Kind) *Subscriber {
	t.Helper()
	s := &Subscriber{Channel: channel, Kind: kind, module: n.Module, base: n.URL("")}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.run(ctx)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return s
}

// Retarget points the subscriber at another frontend, as a browser does
// when the site moves its channel; it resumes there from its last id.
func (s *Subscriber) Retarget(n *Nginx) {
	s.mu.Lock()
	s.base = n.URL("")
	s.mu.Unlock()
}

// Move switches the subscriber to another frontend now, as a browser does
// when the web tier sends its channel to the shard's new owner. Its last id
// means nothing there: Nchan compares ids by (time, tag), and each instance
// numbers tags on its own, so resuming with it could skip a message stored
// in the same second. It resumes instead from the first message the new
// frontend stored since the given time, which, when that is the start of
// the move, is every message the new owner got for the channel.
func (s *Subscriber) Move(n *Nginx, since time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.base = n.URL("")
	s.gen++
	// Nchan sends what follows the given id, so (second of since, tag 0)
	// would skip the message stored with that id: start a second earlier.
	from := since.Add(-time.Second)
	s.lastID = fmt.Sprintf("%d:0", from.Unix())
	s.lastMod, s.etag = from.UTC().Format(http.TimeFormat), "0"
	if s.hangup != nil {
		s.hangup()
	}
}

func (s *Subscriber) run(ctx context.Context) {
	for ctx.Err() == nil {
		conn, hangup := context.WithCancel(ctx)
		s.mu.Lock()
		base, gen := s.base, s.gen
		s.hangup = hangup
		s.mu.Unlock()
		var err error
		switch s.Kind {
		case EventSource:
			err = s.eventSource(conn, base, gen)
		case WebSocket:
			err = s.webSocket(conn, base, gen)
		case LongPoll:
			err = s.longPoll(conn, base, gen)
		}
		hangup()
		s.mu.Lock()
		if s.connected {
			s.lostAt = time.Now()
		}
		s.connected = false
		if ctx.Err() == nil && err != nil {
			s.reconnects++
		}
		s.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (s *Subscriber) record(body string, id string, gen int) {
	v, err := strconv.Atoi(strings.TrimSpace(body))
	if err != nil {
		v = -1 // not one of ours; the check reports it
	}
	s.mu.Lock()
	s.got = append(s.got, v)
	s.ids = append(s.ids, id)
	s.arrivals = append(s.arrivals, time.Now())
	if id != "" && gen == s.gen {
		s.lastID = id
	}
	s.mu.Unlock()
}

// pushStreamResume sets what a Push Stream subscriber sends when it
// reconnects. Last-Event-Id alone is not enough there: an id the module
// does not know (evicted, or from before an Nginx restart wiped its memory)
// replays nothing and says nothing (publisher-protocols.md §2). So, as
// clients other than browsers can, it also asks for everything stored since
// a second before the connection was lost: If-Modified-Since with
// If-None-Match 0. The module replays from whichever matches first, so the
// worst case is a duplicate, never a gap.
func (s *Subscriber) pushStreamResume(h http.Header) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastID != "" {
		h.Set("Last-Event-Id", s.lastID)
	}
	if s.reconnects > 0 {
		h.Set("If-Modified-Since", s.lostAt.Add(-time.Second).UTC().Format(http.TimeFormat))
		h.Set("If-None-Match", "0")
	}
}

// resumeID is the id to resume from. Before any message it is an id older
// than anything Nchan stores, which replays the channel's whole buffer:
// the test channels are fresh, so that is exactly what was missed.
func (s *Subscriber) resumeID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastID == "" {
		if s.reconnects == 0 {
			return ""
		}
		return "1:0"
	}
	return s.lastID
}

func (s *Subscriber) eventSource(ctx context.Context, base string, gen int) error {
	req, _ := http.NewRequestWithContext(ctx, "GET", base+"/ev/"+s.Channel, nil)
	req.Header.Set("Accept", "text/event-stream")
	if s.module == stack.PushStream {
		s.pushStreamResume(req.Header)
	} else if id := s.resumeID(); id != "" {
		req.Header.Set("Last-Event-Id", id)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	s.mu.Lock()
	s.connected = true
	s.mu.Unlock()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var id, event string
	var data []string
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if data != nil && event != "ping" {
				s.record(strings.Join(data, "\n"), id, gen)
			}
			id, event, data = "", "", nil
		case strings.HasPrefix(line, "id: "):
			id = line[4:]
		case strings.HasPrefix(line, "event: "):
			event = line[7:]
		case strings.HasPrefix(line, "data: "):
			data = append(data, line[6:])
		case line == "data:":
			data = append(data, "")
		}
	}
	return fmt.Errorf("stream ended: %v", sc.Err())
}

func (s *Subscriber) webSocket(ctx context.Context, base string, gen int) error {
	url := "ws" + strings.TrimPrefix(base, "http") + "/ws/" + s.Channel
	opts := &websocket.DialOptions{HTTPHeader: http.Header{}}
	if s.module == stack.PushStream {
		// Frames are the bare body (template ~text~): no id to resume
		// from, so it resumes by time.
		s.pushStreamResume(opts.HTTPHeader)
	} else {
		if id := s.resumeID(); id != "" {
			url += "?last_event_id=" + id
		}
		// ws+meta.nchan prefixes each frame with its id, which makes
		// resuming after a reconnect possible.
		opts.Subprotocols = []string{"ws+meta.nchan"}
	}
	c, _, err := websocket.Dial(ctx, url, opts)
	if err != nil {
		return err
	}
	defer c.CloseNow()
	c.SetReadLimit(1 << 20)
	s.mu.Lock()
	s.connected = true
	s.mu.Unlock()
	for {
		_, frame, err := c.Read(ctx)
		if err != nil {
			return err
		}
		if s.module == stack.PushStream {
			s.record(string(frame), "", gen)
			continue
		}
		meta, body, _ := strings.Cut(string(frame), "\n\n")
		var id string
		for _, line := range strings.Split(meta, "\n") {
			if v, ok := strings.CutPrefix(line, "id: "); ok {
				id = v
			}
		}
		s.record(body, id, gen)
	}
}

func (s *Subscriber) longPoll(ctx context.Context, base string, gen int) error {
	client := &http.Client{Timeout: 60 * time.Second}
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", base+"/lp/"+s.Channel, nil)
		s.mu.Lock()
		if s.lastMod != "" {
			req.Header.Set("If-Modified-Since", s.lastMod)
			req.Header.Set("If-None-Match", s.etag)
		} else if s.reconnects > 0 {
			// Nothing seen yet but a connection was lost: ask for
			// everything stored, as for the other kinds.
			req.Header.Set("If-Modified-Since", "Thu, 01 Jan 1970 00:00:01 GMT")
			req.Header.Set("If-None-Match", "0")
		}
		s.connected = true
		s.mu.Unlock()
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		var body strings.Builder
		_, err = bufio.NewReader(resp.Body).WriteTo(&body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		switch resp.StatusCode {
		case 200:
			s.mu.Lock()
			if gen == s.gen {
				s.lastMod, s.etag = resp.Header.Get("Last-Modified"), resp.Header.Get("Etag")
			}
			s.mu.Unlock()
			s.record(body.String(), "", gen)
		case 304, 408: // nothing new before the subscriber timeout: ask again
		default:
			return fmt.Errorf("long-poll status %d", resp.StatusCode)
		}
	}
}

// IDs returns the SSE id of each message that arrived so far, in the order
// of Got.
func (s *Subscriber) IDs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.ids...)
}

// Got returns a copy of what arrived so far.
func (s *Subscriber) Got() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int(nil), s.got...)
}

// Check verifies that the subscriber saw messages 1..want of its channel,
// each first seen in order, none missing. Duplicates (a redelivery after a
// crash) are allowed and returned.
func (s *Subscriber) Check(want int) (dups int, err error) { return s.CheckExcept(want, nil) }

// CheckExcept is Check with the messages in excused allowed to be missing:
// those a module answered 2xx for and may not have delivered (see
// nginxOutage).
func (s *Subscriber) CheckExcept(want int, excused map[int]bool) (dups int, err error) {
	seen := make(map[int]bool, want)
	last := 0
	skipped := func(from, to int) bool {
		for v := from; v <= to; v++ {
			if !excused[v] {
				return false
			}
		}
		return true
	}
	for i, v := range s.Got() {
		switch {
		case v == 0: // warm-up
		case v < 1 || v > want:
			return dups, fmt.Errorf("%s %s: message %d is %d, not one of 1..%d", s.Kind, s.Channel, i, v, want)
		case seen[v]:
			dups++
		case v > last+1 && skipped(last+1, v-1):
			seen[v] = true
			last = v
		case v != last+1:
			return dups, fmt.Errorf("%s %s: got %d after %d: messages %d..%d missing or out of order",
				s.Kind, s.Channel, v, last, last+1, v-1)
		default:
			seen[v] = true
			last = v
		}
	}
	if last != want {
		return dups, fmt.Errorf("%s %s: got messages 1..%d of %d", s.Kind, s.Channel, last, want)
	}
	return dups, nil
}

// waitSubscribed waits until every subscriber receives a warm-up message
// (body "0") published straight to Nginx: only then is a message published
// through the relay sure to reach it. (Nchan's per-channel subscriber count
// is per worker and cannot tell.)
func waitSubscribed(t testing.TB, n *Nginx, subs []*Subscriber) {
	t.Helper()
	waitFor(t, "subscribers to receive the warm-up message", 30*time.Second, func() bool {
		ready := true
		for _, s := range subs {
			if !slices.Contains(s.Got(), 0) {
				ready = false
				n.Publish(s.Channel, "0") // retried until it arrives

			}
		}
		if !ready {
			time.Sleep(200 * time.Millisecond)
		}
		return ready
	})
}

package publish

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/pushrelay/pushrelay/sidecar/message"
)

// The publisher's faults, against an in-process server that answers as a
// proxy or a misconfigured Nginx would. integration/ drives the same
// faults through real Nginx.

// collect reads n settlements, failing after timeout.
func collect(t *testing.T, out chan Settlement, n int, timeout time.Duration) []Settlement {
	t.Helper()
	var got []Settlement
	deadline := time.After(timeout)
	for len(got) < n {
		select {
		case s := <-out:
			got = append(got, s)
		case <-deadline:
			t.Fatalf("only %d of %d settled within %s: %+v", len(got), n, timeout, got)
		}
	}
	return got
}

// quiet fails if any settlement arrives within d.
func quiet(t *testing.T, out chan Settlement, d time.Duration) {
	t.Helper()
	select {
	case s := <-out:
		t.Fatalf("unexpected settlement %+v", s)
	case <-time.After(d):
	}
}

func submit(p *Pool, tag uint64, channel, body string) {
	p.Submit(Job{Gen: 1, Tag: tag, Msg: message.Message{Channel: channel, Body: []byte(body)}})
}

func TestStuckChannelWaitsAloneThenSpendsItsBudget(t *testing.T) {
	f, url := startFake(t, func(ch, _ string) int {
		if ch == "stuck" {
			return 500
		}
		return 200
	})
	out := make(chan Settlement, 4096)
	p := newPoolWith(t, url, out, Options{Lanes: 1, RetryBudget: 400 * time.Millisecond}, Metrics{})
	submit(p, 1, "stuck", "s1")
	submit(p, 2, "stuck", "s2")
	for i := 0; i < 300; i++ { // same lane: only the stuck channel may wait
		submit(p, uint64(10+i), "ch"+strconv.Itoa(i%30), strconv.Itoa(i))
	}
	got := collect(t, out, 300, 5*time.Second)
	for _, s := range got {
		if s.Outcome != Accepted || s.Job.Msg.Channel == "stuck" {
			t.Fatalf("before the budget: %+v", s)
		}
	}
	// Keep other channels succeeding while the budget runs out.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
				submit(p, uint64(1000+i), "busy", "b")
			}
		}
	}()
	defer func() { close(stop); wg.Wait() }()
	var refused []Settlement
	deadline := time.After(5 * time.Second)
	for len(refused) < 2 {
		select {
		case s := <-out:
			if s.Job.Msg.Channel == "stuck" {
				refused = append(refused, s)
			}
		case <-deadline:
			t.Fatalf("stuck channel not dead-lettered after its budget; got %+v", refused)
		}
	}
	for i, s := range refused {
		if s.Outcome != Refused || s.Reason != ReasonBudget || s.Status != 500 || s.Job.Tag != uint64(i+1) {
			t.Fatalf("stuck message %d settled %+v, want Refused %s 500 in order", i, s, ReasonBudget)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if n := len(f.got["stuck"]); n != 0 {
		t.Fatalf("stuck channel published %d times", n)
	}
}

func TestEveryChannelFailingDeadLettersNothing(t *testing.T) {
	_, url := startFake(t, func(string, string) int { return 500 })
	out := make(chan Settlement, 64)
	p := newPoolWith(t, url, out, Options{RetryBudget: 100 * time.Millisecond}, Metrics{})
	for i := 0; i < 20; i++ {
		submit(p, uint64(i+1), "ch"+strconv.Itoa(i), "x")
	}
	quiet(t, out, time.Second)
	if s, advice := p.Judge(); s != Failing || !strings.Contains(advice, "500 from /pub on 20 channels: Nginx's shared memory") {
		t.Fatalf("state %s %q, want failing, 500 on 20 channels", s, advice)
	}
}

func TestMisconfiguredPublisherWaitsThenRecovers(t *testing.T) {
	var mu sync.Mutex
	answer := 403
	f, url := startFake(t, func(string, string) int {
		mu.Lock()
		defer mu.Unlock()
		return answer
	})
	out := make(chan Settlement, 64)
	p := newPoolWith(t, url, out, Options{RetryBudget: 100 * time.Millisecond}, Metrics{})
	for i := 0; i < 20; i++ {
		submit(p, uint64(i+1), "ch"+strconv.Itoa(i%5), strconv.Itoa(i))
	}
	quiet(t, out, time.Second)
	if s, advice := p.Judge(); s != Misconfigured || !strings.HasPrefix(advice, "403 from /pub") {
		t.Fatalf("state %s %q, want misconfigured 403", s, advice)
	}
	mu.Lock()
	answer = 200
	mu.Unlock()
	for _, s := range collect(t, out, 20, 5*time.Second) {
		if s.Outcome != Accepted {
			t.Fatalf("after the fix: %+v", s)
		}
	}
	if s := p.State(); s != OK {
		t.Fatalf("state %s after every channel published, want ok", s)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for c := 0; c < 5; c++ {
		want := []string{strconv.Itoa(c), strconv.Itoa(c + 5), strconv.Itoa(c + 10), strconv.Itoa(c + 15)}
		if got := f.got["ch"+strconv.Itoa(c)]; fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("ch%d got %v, want %v", c, got, want)
		}
	}
}

func TestOneChannelRefusedIsTheMessagesFault(t *testing.T) {
	_, url := startFake(t, func(ch, _ string) int {
		if ch == "bad" {
			return 403
		}
		return 200
	})
	out := make(chan Settlement, 256)
	p := newPoolWith(t, url, out, Options{Lanes: 1, RetryBudget: 300 * time.Millisecond}, Metrics{})
	submit(p, 1, "bad", "x")
	var refused *Settlement
	deadline := time.After(5 * time.Second)
	for i := 0; refused == nil; i++ {
		submit(p, uint64(100+i), "good"+strconv.Itoa(i%3), "y")
		select {
		case s := <-out:
			if s.Job.Tag == 1 {
				refused = &s
			}
		case <-deadline:
			t.Fatal("a 403 on one channel alone was never dead-lettered")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if refused.Outcome != Refused || refused.Reason != "nginx_403" {
		t.Fatalf("settled %+v, want Refused nginx_403", *refused)
	}
}

// A proxy or limit_req in front of /pub answers 503 and keeps the
// connection open: what was pipelined behind it was processed. Each
// channel must still arrive in order, with nothing published twice.
func TestRetryableAnswerOnOpenConnectionKeepsOrder(t *testing.T) {
	var mu sync.Mutex
	calls := 0
	f := &fakePublisher{got: map[string][]string{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
		mu.Lock()
		calls++
		refuse := calls%7 == 0
		mu.Unlock()
		if refuse {
			ctx.SetStatusCode(503) // keep-alive: no Connection: close
			return
		}
		ctx.SetStatusCode(201)
		ch := string(ctx.QueryArgs().Peek("id"))
		f.mu.Lock()
		f.got[ch] = append(f.got[ch], string(ctx.PostBody()))
		f.mu.Unlock()
	}}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Shutdown() })
	out := make(chan Settlement, 4096)
	// Nchan's dialect: it trusts the answers after a non-2xx on an open
	// connection, so nothing is sent twice. Push Stream's closes and
	// resends what was behind (its early rejections desync the
	// connection): other channels may repeat there, but never reorder.
	tg, err := ParseTarget(Nchan, "http://"+ln.Addr().String()+"/pub?id={channel}")
	if err != nil {
		t.Fatal(err)
	}
	p := NewPool(Options{Target: tg, Lanes: 2, Pipeline: 16, Timeout: time.Second, RetryMax: 50 * time.Millisecond,
		RetryBudget: time.Minute, QueueLen: 4096}, out, Metrics{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	t.Cleanup(p.Stop)
	const channels, per = 10, 50
	for i := 0; i < per; i++ {
		for c := 0; c < channels; c++ {
			submit(p, uint64(i*channels+c+1), "ch"+strconv.Itoa(c), strconv.Itoa(i))
		}
	}
	collect(t, out, channels*per, 10*time.Second)
	f.mu.Lock()
	defer f.mu.Unlock()
	for c := 0; c < channels; c++ {
		got := f.got["ch"+strconv.Itoa(c)]
		if len(got) != per {
			t.Fatalf("ch%d published %d times, want %d: %v", c, len(got), per, got)
		}
		for i, b := range got {
			if b != strconv.Itoa(i) {
				t.Fatalf("ch%d out of order at %d: %v", c, i, got)
			}
		}
	}
}

// Nginx closes an idle keep-alive connection (keepalive_timeout): the next
// publish redials at once. No retry counted, reachability unchanged.
func TestIdleCloseIsNotAnOutage(t *testing.T) {
	f := &fakePublisher{got: map[string][]string{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &fasthttp.Server{IdleTimeout: 100 * time.Millisecond, Handler: func(ctx *fasthttp.RequestCtx) {
		f.mu.Lock()
		f.requests++
		f.mu.Unlock()
	}}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Shutdown() })
	set := metrics.NewSet()
	m := Metrics{Published: set.NewCounter("published"), Retries: set.NewCounter("retries"), Refused: set.NewCounter("refused"),
		Duration: set.NewPrometheusHistogram("duration"), Lag: set.NewPrometheusHistogram("lag")}
	out := make(chan Settlement, 16)
	p := newPoolWith(t, "http://"+ln.Addr().String()+"/pub?id={channel}", out, Options{Lanes: 1}, m)
	submit(p, 1, "c", "a")
	collect(t, out, 1, 2*time.Second)
	time.Sleep(400 * time.Millisecond) // the server closes the idle connection
	submit(p, 2, "c", "b")
	if s := collect(t, out, 1, 2*time.Second); s[0].Outcome != Accepted {
		t.Fatalf("after the idle close: %+v", s[0])
	}
	if n := m.Retries.Get(); n != 0 {
		t.Fatalf("%d retries counted for an idle close", n)
	}
	if !p.Reachable() {
		t.Fatal("an idle close made the publisher unreachable")
	}
	if f.requests != 2 {
		t.Fatalf("%d requests, want 2", f.requests)
	}
}

// A slow publisher answers each request well within the timeout, but the
// batch as a whole takes longer: nothing may be sent twice.
func TestSlowAnswersAreNotResent(t *testing.T) {
	var mu sync.Mutex
	requests := 0
	url := startFlushingServer(t, func() {
		time.Sleep(60 * time.Millisecond)
		mu.Lock()
		requests++
		mu.Unlock()
	})
	out := make(chan Settlement, 64)
	p := newPoolWith(t, url, out, Options{Lanes: 1, Pipeline: 16, Timeout: 300 * time.Millisecond}, Metrics{})
	for i := 0; i < 13; i++ {
		submit(p, uint64(i+1), "ch"+strconv.Itoa(i), "x")
	}
	collect(t, out, 13, 10*time.Second)
	mu.Lock()
	defer mu.Unlock()
	if requests != 13 {
		t.Fatalf("13 messages took %d publishes", requests)
	}
}

// startFlushingServer answers 200 to each request as soon as handle
// returns, one response per write, as Nginx does; fasthttp's server would
// hold pipelined answers back until the whole batch is read.
func startFlushingServer(t *testing.T, handle func()) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				var req fasthttp.Request
				for {
					if err := req.Read(br); err != nil {
						return
					}
					handle()
					if _, err := c.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")); err != nil {
						return
					}
				}
			}()
		}
	}()
	return "http://" + ln.Addr().String() + "/pub?id={channel}"
}

func TestMessagesOlderThanMaxAgeExpire(t *testing.T) {
	f, url := startFake(t, func(string, string) int { return 200 })
	out := make(chan Settlement, 16)
	p := newPoolWith(t, url, out, Options{MaxAge: time.Minute}, Metrics{})
	old := time.Now().Add(-2 * time.Minute).UnixMicro()
	p.Submit(Job{Gen: 1, Tag: 1, Msg: message.Message{Channel: "c", Body: []byte("old"), PublishedAt: old}})
	p.Submit(Job{Gen: 1, Tag: 2, Msg: message.Message{Channel: "c", Body: []byte("new"), PublishedAt: time.Now().UnixMicro()}})
	got := collect(t, out, 2, 2*time.Second)
	if got[0].Outcome != Refused || got[0].Reason != ReasonExpired || got[1].Outcome != Accepted {
		t.Fatalf("settled %+v, want expired then accepted", got)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if fmt.Sprint(f.got["c"]) != "[new]" {
		t.Fatalf("published %v, want only the new one", f.got["c"])
	}
}

// A stopped pool publishes nothing more, however much it has queued: the
// caller redelivers those jobs, so publishing them would make duplicates
// and run past a stop's deadline.
func TestStopPublishesNothingMore(t *testing.T) {
	var mu sync.Mutex
	requests := 0
	url := startFlushingServer(t, func() {
		time.Sleep(20 * time.Millisecond) // a slow Nginx: 50 publishes/s
		mu.Lock()
		requests++
		mu.Unlock()
	})
	out := make(chan Settlement, 1024)
	tg, err := ParseTarget(PushStream, url)
	if err != nil {
		t.Fatal(err)
	}
	p := NewPool(Options{Target: tg, Lanes: 1, Pipeline: 4, Timeout: time.Second, RetryMax: time.Millisecond,
		RetryBudget: time.Hour, QueueLen: 1024}, out, Metrics{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	for i := 0; i < 500; i++ {
		submit(p, uint64(i+1), "ch"+strconv.Itoa(i%50), "x")
	}
	time.Sleep(100 * time.Millisecond)
	began := time.Now()
	p.Stop()
	if d := time.Since(began); d > 500*time.Millisecond {
		t.Errorf("Stop took %s with a backlog queued", d)
	}
	mu.Lock()
	at := requests
	mu.Unlock()
	time.Sleep(300 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	if requests > at+4 { // at most the batch that was on the wire
		t.Errorf("%d publishes after Stop returned (%d before)", requests-at, at)
	}
	if at >= 400 {
		t.Errorf("%d of 500 published before Stop: the backlog was not there to test", at)
	}
}

// On a quiet host (two good publishes a second), one stuck channel that
// retries far more often than that is still the channel's problem: the
// publisher works, and the budget is spent.
func TestStuckChannelOnAQuietHostSpendsItsBudget(t *testing.T) {
	_, url := startFake(t, func(ch, _ string) int {
		if ch == "stuck" {
			return 500
		}
		return 200
	})
	out := make(chan Settlement, 256)
	p := newPoolWith(t, url, out, Options{Lanes: 1, RetryBudget: 2 * time.Second}, Metrics{})
	submit(p, 1, "stuck", "s")
	deadline := time.After(8 * time.Second)
	for i := 0; ; i++ {
		select {
		case s := <-out:
			if s.Job.Tag == 1 {
				if s.Outcome != Refused || s.Reason != ReasonBudget {
					t.Fatalf("stuck message settled %+v, want its budget spent", s)
				}
				if st := p.State(); st != OK {
					t.Errorf("state %s with one stuck channel beside working traffic, want ok", st)
				}
				return
			}
		case <-time.After(500 * time.Millisecond):
			submit(p, uint64(100+i), "quiet", "q")
		case <-deadline:
			t.Fatalf("one stuck channel on a quiet host never spent its budget; state %s", p.State())
		}
	}
}

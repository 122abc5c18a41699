package publish

import (
	"bufio"
	"io"
	"log/slog"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/message"
)

// FuzzAnswers feeds the publisher's response reader whatever a publisher
// may send back to a pipelined batch: the seeds are real Nginx answers
// (Nchan and Push Stream: accepted, denied, 413, Push Stream's early 400
// and 403 that desync the connection, 500, 503 keep-alive; recorded by
// integration/cmd/answers), the fuzzer mutates them. Whatever comes back,
// every request of the batch must end in exactly one place: settled once,
// backing off, or unanswered and sent again; and nothing is accepted that
// the dialect does not call a success.
func FuzzAnswers(f *testing.F) {
	f.Add(false, uint8(1), []byte("HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"))
	f.Fuzz(func(t *testing.T, pushStream bool, requests uint8, answers []byte) {
		n := int(requests%16) + 1
		dialect := Nchan
		if pushStream {
			dialect = PushStream
		}
		out := make(chan Settlement, n)
		p := &Pool{opts: Options{Target: Target{Dialect: dialect, Network: "tcp", host: "x", prefix: "/pub?id="},
			Pipeline: n, Timeout: 200 * time.Millisecond, RetryMax: time.Millisecond, RetryBudget: time.Hour}, health: newHealth()}
		l := newLane(0, p, out, Metrics{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
		l.done = make(chan struct{})

		client, server := net.Pipe()
		go io.Copy(io.Discard, server) // the requests
		go func() {
			server.Write(answers)
			server.Close()
		}()
		l.conn, l.br, l.bw = client, bufio.NewReader(client), bufio.NewWriter(client)
		for i := 0; i < n; i++ {
			l.enqueue(Job{Gen: 1, Tag: uint64(i + 1), Msg: message.Message{Channel: "c" + strconv.Itoa(i), Body: []byte("x")}})
		}
		if !l.fillBatch() || len(l.batch) != n {
			t.Fatalf("batch of %d from %d channels", len(l.batch), n)
		}
		batch := append([]*chanQueue(nil), l.batch...)
		answered, _ := l.send()
		l.closeConn()
		if answered < 0 || answered > n {
			t.Fatalf("answered %d of %d", answered, n)
		}
		settled := map[uint64]bool{}
		for len(out) > 0 {
			s := <-out
			if settled[s.Job.Tag] {
				t.Fatalf("tag %d settled twice", s.Job.Tag)
			}
			settled[s.Job.Tag] = true
			if int(s.Job.Tag) > answered {
				t.Fatalf("tag %d settled but only %d answered", s.Job.Tag, answered)
			}
			if s.Outcome == Refused && s.Reason != "nginx_413" && s.Reason != "nginx_414" {
				t.Fatalf("tag %d refused as %s on the first answer", s.Job.Tag, s.Reason)
			}
		}
		waiting := map[*chanQueue]bool{}
		for _, q := range l.waiting {
			waiting[q] = true
		}
		for i, q := range batch {
			tag := uint64(i + 1)
			_, live := l.queues[q.channel]
			switch {
			case i >= answered: // not answered: still queued, nothing settled
				if settled[tag] || waiting[q] || !live {
					t.Fatalf("unanswered tag %d: settled %v waiting %v queued %v", tag, settled[tag], waiting[q], live)
				}
			case settled[tag] == waiting[q]:
				t.Fatalf("answered tag %d: settled %v and waiting %v: want exactly one", tag, settled[tag], waiting[q])
			case settled[tag] && live:
				t.Fatalf("tag %d settled but its channel still queued", tag)
			}
		}
	})
}

package message

import (
	"strings"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
)

func TestCheckChannel(t *testing.T) {
	cases := []struct {
		ch   string
		want Reason
	}{
		{"thread:1", OK},
		{"forum:disqus", OK},
		{"user@example.com", OK},
		{"a.b-c_d:e", OK},
		{strings.Repeat("x", 200), OK},
		{"ALLx", OK},
		{"all", OK},
		{"dot.b", OK},   // ".b" with no digits is not backtrack syntax
		{"dot.bx1", OK}, // digits must follow ".b" directly
		{"b12", OK},     // no dot
		{"x.b1.y", OK},  // not at the end
		{"", NoChannel},
		{strings.Repeat("x", 201), InvalidChannel},
		{"a b", InvalidChannel},
		{"a/b", InvalidChannel}, // multi-channel publish on both modules
		{"a*", InvalidChannel},
		{"a%20b", InvalidChannel},
		{"thread:Ünïcødé", InvalidChannel},
		{"a\r\nb", InvalidChannel},
		{"ALL", ReservedChannel},
		{"dot.b3", ReservedChannel},
		{".b0", ReservedChannel},
		{"thread.b123", ReservedChannel},
	}
	for _, c := range cases {
		if got := CheckChannel(c.ch); got != c.want {
			t.Errorf("CheckChannel(%q) = %q, want %q", c.ch, got, c.want)
		}
	}
}

func TestParse(t *testing.T) {
	valid := func() amqp.Delivery {
		return amqp.Delivery{
			Headers:     amqp.Table{"channel": "thread:1", "published_at": int64(1700000000000000)},
			MessageId:   "42",
			Type:        "comment",
			ContentType: "application/json",
			Body:        []byte(`{"id":42}`),
		}
	}
	d := valid()
	m, r := Parse(&d, 32)
	if r != OK {
		t.Fatalf("valid message refused: %s", r)
	}
	if m.Channel != "thread:1" || m.ID != "42" || m.Type != "comment" || m.ContentType != "application/json" ||
		string(m.Body) != `{"id":42}` || m.PublishedAt != 1700000000000000 {
		t.Fatalf("wrong message: %+v", m)
	}

	poison := []struct {
		name   string
		mutate func(*amqp.Delivery)
		want   Reason
	}{
		{"no headers", func(d *amqp.Delivery) { d.Headers = nil }, NoChannel},
		{"channel missing", func(d *amqp.Delivery) { delete(d.Headers, "channel") }, NoChannel},
		{"channel not a string", func(d *amqp.Delivery) { d.Headers["channel"] = int32(5) }, InvalidChannel},
		{"channel ALL", func(d *amqp.Delivery) { d.Headers["channel"] = "ALL" }, ReservedChannel},
		{"body too large", func(d *amqp.Delivery) { d.Body = make([]byte, 33) }, BodyTooLarge},
		{"CRLF in type", func(d *amqp.Delivery) { d.Type = "x\r\nSet-Cookie: a=b" }, InvalidHeader},
		{"LF in message_id", func(d *amqp.Delivery) { d.MessageId = "1\n2" }, InvalidHeader},
		{"NUL in content_type", func(d *amqp.Delivery) { d.ContentType = "text/plain\x00" }, InvalidHeader},
		{"DEL in type", func(d *amqp.Delivery) { d.Type = "a\x7f" }, InvalidHeader},
	}
	for _, p := range poison {
		d := valid()
		p.mutate(&d)
		if _, r := Parse(&d, 32); r != p.want {
			t.Errorf("%s: reason %q, want %q", p.name, r, p.want)
		}
	}

	d = valid()
	d.Body = make([]byte, 32)
	if _, r := Parse(&d, 32); r != OK {
		t.Errorf("body of exactly max_body refused: %s", r)
	}
	d = valid()
	for _, notMicros := range []int64{1700000000, 1700000000000, 1700000000000000000} { // s, ms, ns
		d.Headers["published_at"] = notMicros
		if m, r := Parse(&d, 32); r != OK || m.PublishedAt != 0 {
			t.Errorf("published_at %d is not Unix µs and must be ignored, got %q %d", notMicros, r, m.PublishedAt)
		}
	}
	d.Headers["published_at"] = "soon"
	if m, r := Parse(&d, 32); r != OK || m.PublishedAt != 0 {
		t.Errorf("a malformed published_at must only disable the lag figure, got %q %d", r, m.PublishedAt)
	}
}

func TestParseAllocatesNothing(t *testing.T) {
	d := amqp.Delivery{Headers: amqp.Table{"channel": "thread:1"}, Body: []byte("x"), Type: "t", MessageId: "1"}
	if n := testing.AllocsPerRun(100, func() { Parse(&d, 100) }); n != 0 {
		t.Fatalf("Parse allocates %.1f times per message", n)
	}
}

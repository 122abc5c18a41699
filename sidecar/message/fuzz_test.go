package message

import (
	"bytes"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"unsafe"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Kinds of value the fuzzer puts in a header. Anything a producer's AMQP
// client can encode may arrive, so the non-string kinds are as important as
// the strings.
const (
	kindAbsent = iota
	kindString
	kindBytes // a byte array ('x'), which amqp091 decodes as []byte
	kindInt64
	kindInt32
	kindInt16
	kindFloat
	kindNil // a void field
	kindCount
)

// headerValue builds the kind's value from the fuzzed string and number.
func headerValue(kind uint8, s string, n int64) (any, bool) {
	switch kind % kindCount {
	case kindString:
		return s, true
	case kindBytes:
		return []byte(s), true
	case kindInt64:
		return n, true
	case kindInt32:
		return int32(n), true
	case kindInt16:
		return int16(n), true
	case kindFloat:
		return float64(n), true
	case kindNil:
		return nil, true
	}
	return nil, false
}

// The oracle restates the contract's channel rule (README.md, "Message
// contract") with regular expressions, so a slip in CheckChannel's hand-rolled
// loops does not hide behind the same slip in the test.
var (
	channelSyntax = regexp.MustCompile(`^[A-Za-z0-9_.:@-]{1,200}$`)
	backtrack     = regexp.MustCompile(`\.b[0-9]+$`)
)

func wantChannel(ch string) Reason {
	switch {
	case ch == "":
		return NoChannel
	case !channelSyntax.MatchString(ch):
		return InvalidChannel
	case ch == "ALL" || backtrack.MatchString(ch):
		return ReservedChannel
	}
	return OK
}

// safeHeader is the oracle for message_id, type and content_type: they end up
// in request headers, so only tab among the control bytes may pass.
func safeHeader(s string) bool {
	return !strings.ContainsFunc(s, func(r rune) bool {
		return r != '\t' && (r < 0x20 || r == 0x7f)
	}) && !strings.ContainsAny(s, "\x00\r\n") // bytes of invalid UTF-8 decode as U+FFFD; CR/LF/NUL checked byte-wise
}

func FuzzParse(f *testing.F) {
	// Seeds beyond testdata/fuzz/FuzzParse: one valid message per header
	// kind, so mutation starts from every type switch branch.
	for kind := uint8(0); kind < kindCount; kind++ {
		f.Add(uint8(kindString), "thread:1", []byte(`{"id":1}`), "1", "comment", "application/json", kind, int64(1700000000000000), 32768)
		f.Add(kind, "thread:1", []byte("x"), "", "", "", uint8(kindAbsent), int64(0), 32768)
	}

	f.Fuzz(func(t *testing.T, chKind uint8, ch string, body []byte, id, typ, ct string, pubKind uint8, pub int64, maxBody int) {
		// CheckChannel alone, on every fuzzed string.
		if got, want := CheckChannel(ch), wantChannel(ch); got != want {
			t.Fatalf("CheckChannel(%q) = %q, want %q", ch, got, want)
		}

		d := amqp.Delivery{MessageId: id, Type: typ, ContentType: ct, Body: body}
		chVal, hasCh := headerValue(chKind, ch, pub)
		pubVal, hasPub := headerValue(pubKind, strings.Clone(ch), pub)
		if hasCh || hasPub {
			d.Headers = amqp.Table{}
		}
		if hasCh {
			d.Headers["channel"] = chVal
		}
		if hasPub {
			d.Headers["published_at"] = pubVal
		}

		m, r := Parse(&d, maxBody)

		// The reason is the first rule broken, in the contract's order.
		want := OK
		switch s, isString := chVal.(string); {
		case !hasCh:
			want = NoChannel
		case !isString:
			want = InvalidChannel
		case wantChannel(s) != OK:
			want = wantChannel(s)
		case len(body) > maxBody:
			want = BodyTooLarge
		case !safeHeader(id) || !safeHeader(typ) || !safeHeader(ct):
			want = InvalidHeader
		}
		if r != want {
			t.Fatalf("Parse reason %q, want %q (channel %#v, body %d bytes, max %d, id %q, type %q, content type %q)",
				r, want, chVal, len(body), maxBody, id, typ, ct)
		}
		if r != OK {
			if !slices.Contains(Reasons, r) {
				t.Fatalf("reason %q is not in Reasons: its metric would not be pre-registered", r)
			}
			if !reflect.ValueOf(m).IsZero() {
				t.Fatalf("poison message %q came with content %+v", r, m)
			}
			return
		}

		// Accepted: everything the publisher builds a request from is safe.
		if CheckChannel(m.Channel) != OK {
			t.Fatalf("accepted channel %q fails CheckChannel", m.Channel)
		}
		if i := strings.IndexFunc(m.Channel, func(r rune) bool { return r >= 0x80 || !ChannelByte(byte(r)) }); i >= 0 {
			t.Fatalf("accepted channel %q has byte %#x outside [A-Za-z0-9_.:@-]", m.Channel, m.Channel[i])
		}
		if m.Channel == "ALL" || backtrack.MatchString(m.Channel) || len(m.Channel) > MaxChannelLen {
			t.Fatalf("accepted reserved or overlong channel %q", m.Channel)
		}
		for _, v := range []string{m.ID, m.Type, m.ContentType} {
			if !safeHeader(v) {
				t.Fatalf("accepted header value %q has a control byte", v)
			}
		}
		if len(m.Body) > maxBody {
			t.Fatalf("accepted a %d-byte body over max %d", len(m.Body), maxBody)
		}

		// Pushed byte for byte, and aliased rather than copied: the relay
		// keeps Parse allocation-free (TestParseAllocatesNothing) and a copy
		// would be one allocation per message.
		if m.Channel != ch || m.ID != id || m.Type != typ || m.ContentType != ct || !bytes.Equal(m.Body, body) {
			t.Fatalf("message %+v differs from the delivery", m)
		}
		if len(body) > 0 && unsafe.SliceData(m.Body) != unsafe.SliceData(body) {
			t.Fatal("body was copied")
		}
		if len(ch) > 0 && unsafe.StringData(m.Channel) != unsafe.StringData(ch) {
			t.Fatal("channel was copied")
		}

		// published_at feeds the lag figure and push.max_age: an integer
		// that can be Unix microseconds is taken as is, anything else (other
		// types, seconds or milliseconds) means "unknown".
		var wantPub int64
		switch v := pubVal.(type) {
		case int64:
			wantPub = v
		case int32:
			wantPub = int64(v)
		}
		if wantPub < 1e15 || wantPub > 1e16 {
			wantPub = 0
		}
		if m.PublishedAt != wantPub {
			t.Fatalf("published_at %#v gave %d, want %d", pubVal, m.PublishedAt, wantPub)
		}
	})
}

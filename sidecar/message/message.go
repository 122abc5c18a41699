// Package message checks one RabbitMQ delivery against the message contract
// (README.md, "Message contract") and extracts what the publisher needs.
//
// Nothing from an AMQP header reaches an HTTP header or URL without passing
// through here: a CR or LF in a header value would let a producer inject
// headers into the publish request.
package message

import (
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// MaxChannelLen is Push Stream's push_stream_max_channel_id_length in the
// shipped config, and Nchan's nchan_max_channel_id_length.
const MaxChannelLen = 200

// Reason says why a message is poison. It becomes the
// pushrelay_dead_lettered_total{reason} label and the x-pushrelay-reason
// header on the dead-lettered copy, so the set is small and fixed.
type Reason string

// Reasons a message is refused before it is published.
const (
	OK              Reason = ""
	NoChannel       Reason = "no_channel"
	InvalidChannel  Reason = "invalid_channel"
	ReservedChannel Reason = "reserved_channel"
	BodyTooLarge    Reason = "body_too_large"
	InvalidHeader   Reason = "invalid_header"
	// EmptyBody: Push Stream refuses an empty publish (400) whatever the
	// channel, so the relay refuses it first on that dialect. Nchan
	// delivers empty messages.
	EmptyBody Reason = "empty_body"
)

// Reasons lists every reason, for pre-registering metrics.
var Reasons = []Reason{NoChannel, InvalidChannel, ReservedChannel, BodyTooLarge, InvalidHeader, EmptyBody}

// Message is a valid delivery's publishable content. Its strings and body
// alias the delivery's memory: building one allocates nothing.
type Message struct {
	Channel     string
	ID          string // message_id → Event-Id
	Type        string // type → Event-Type / X-EventSource-Event
	ContentType string
	Body        []byte
	PublishedAt int64 // Unix microseconds; 0 when the producer did not say
	// Redelivered: the broker delivered it before, perhaps to a session
	// that published it and lost the ack (publish.Seen).
	Redelivered bool
	// Headers and the properties below are the delivery's own, kept for a
	// dead-letter copy, which must carry everything the producer sent.
	Headers         amqp.Table
	Timestamp       time.Time
	AppID           string
	ContentEncoding string
}

// published_at is Unix microseconds: between 2001 (1e15 µs) and 2286
// (1e16 µs). Seconds and milliseconds fall below, nanoseconds above.
const (
	minPublishedAt = 1e15
	maxPublishedAt = 1e16
)

// Parse validates d and returns its message, or the reason it is poison.
func Parse(d *amqp.Delivery, maxBody int) (Message, Reason) {
	raw, ok := d.Headers["channel"]
	if !ok {
		return Message{}, NoChannel
	}
	ch, ok := raw.(string)
	if !ok {
		return Message{}, InvalidChannel
	}
	if r := CheckChannel(ch); r != OK {
		return Message{}, r
	}
	if len(d.Body) > maxBody {
		return Message{}, BodyTooLarge
	}
	if !headerSafe(d.MessageId) || !headerSafe(d.Type) || !headerSafe(d.ContentType) {
		return Message{}, InvalidHeader
	}
	m := Message{
		Channel:     ch,
		ID:          d.MessageId,
		Type:        d.Type,
		ContentType: d.ContentType,
		Body:        d.Body,
		Headers:     d.Headers,

		Timestamp:       d.Timestamp,
		AppID:           d.AppId,
		ContentEncoding: d.ContentEncoding,
	}
	switch v := d.Headers["published_at"].(type) {
	case int64:
		m.PublishedAt = v
	case int32:
		m.PublishedAt = int64(v)
	}
	if m.PublishedAt < minPublishedAt || m.PublishedAt > maxPublishedAt {
		// Not Unix microseconds: seconds or milliseconds would make
		// every message look decades old to push.max_age, and the lag
		// histogram nonsense. Such a header is ignored.
		m.PublishedAt = 0
	}
	return m, OK
}

// CheckChannel applies the contract's channel id rules: 1–200 bytes of
// [A-Za-z0-9_.:@-], not exactly ALL (Push Stream's reserved id), and not
// ending in ".b<digits>" (Push Stream would strip it as backtrack syntax and
// publish to another channel). With this alphabet no escaping is needed in
// either publisher dialect.
func CheckChannel(ch string) Reason {
	if len(ch) == 0 {
		return NoChannel
	}
	if len(ch) > MaxChannelLen {
		return InvalidChannel
	}
	for i := 0; i < len(ch); i++ {
		if !ChannelByte(ch[i]) {
			return InvalidChannel
		}
	}
	if ch == "ALL" || isBacktrack(ch) {
		return ReservedChannel
	}
	return OK
}

// isBacktrack reports whether ch ends in ".b" followed by one or more digits.
func isBacktrack(ch string) bool {
	i := len(ch)
	for i > 0 && ch[i-1] >= '0' && ch[i-1] <= '9' {
		i--
	}
	return i < len(ch) && i >= 2 && ch[i-2:i] == ".b"
}

// headerSafe reports whether s may be sent as an HTTP header value: no
// control characters (CR and LF above all) and no DEL.
func headerSafe(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// ChannelByte reports whether c may appear in a channel id.
func ChannelByte(c byte) bool { return channelByte[c] }

var channelByte = func() (t [256]bool) {
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
	}
	for c := 'A'; c <= 'Z'; c++ {
		t[c] = true
	}
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for _, c := range "_.:@-" {
		t[c] = true
	}
	return t
}()

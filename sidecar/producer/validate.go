package producer

import (
	"errors"
	"fmt"
	"strings"

	"github.com/pushrelay/pushrelay/sidecar/message"
)

// MaxChannelLen is the longest channel id the relay accepts: Push Stream's
// push_stream_max_channel_id_length and Nchan's nchan_max_channel_id_length
// in the shipped Nginx config.
const MaxChannelLen = message.MaxChannelLen

// maxShortString is AMQP's limit on message_id, type and content_type.
const maxShortString = 255

// ValidChannel applies the relay's channel id rules (message.CheckChannel):
// 1–200 bytes of [A-Za-z0-9_.:@-], not exactly "ALL", not ending in ".b"
// and digits. The relay dead-letters anything else, so refusing it here
// tells the web tier at once instead of losing the message quietly.
func ValidChannel(s string) error {
	switch message.CheckChannel(s) {
	case message.OK:
		return nil
	case message.NoChannel:
		return errors.New("channel is empty")
	case message.ReservedChannel:
		if s == "ALL" {
			return errors.New(`channel "ALL" is reserved by Push Stream`)
		}
		// Push Stream strips ".b<N>" as a backtrack request and would
		// publish to a different channel.
		return fmt.Errorf("channel %q ends in .b and digits, which Push Stream reads as a backtrack request", s)
	}
	if len(s) > MaxChannelLen {
		return fmt.Errorf("channel is %d bytes, longer than %d", len(s), MaxChannelLen)
	}
	i := strings.IndexFunc(s, func(r rune) bool { return r >= 0x80 || !message.ChannelByte(byte(r)) })
	return fmt.Errorf("channel %q: byte %q at offset %d is not one of A-Z a-z 0-9 _ . : @ -", s, s[i], i)
}

// validProperty refuses what must not reach an HTTP header on the relay's
// side (a CR or LF would inject headers) and what AMQP cannot carry.
func validProperty(name, v string) error {
	if len(v) > maxShortString {
		return fmt.Errorf("%s is %d bytes, longer than %d", name, len(v), maxShortString)
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < 0x20 || c == 0x7f {
			return fmt.Errorf("%s %q: control character at offset %d", name, v, i)
		}
	}
	return nil
}

func (m *Message) validate(maxBody int) error {
	if err := ValidChannel(m.Channel); err != nil {
		return err
	}
	if len(m.Body) > maxBody {
		return fmt.Errorf("body is %d bytes, larger than %d", len(m.Body), maxBody)
	}
	for _, p := range []struct{ name, v string }{{"type", m.Type}, {"message id", m.ID}, {"content type", m.ContentType}} {
		if err := validProperty(p.name, p.v); err != nil {
			return err
		}
	}
	return nil
}

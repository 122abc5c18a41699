// Package publish delivers messages to the local Push Stream or Nchan
// publisher over loopback HTTP/1.1, in order per channel.
//
// A Pool has a fixed number of lanes; a channel always travels the lane
// picked by its hash, so its messages are published in the order they were
// consumed. Each lane owns one keep-alive connection and pipelines up to
// Options.Pipeline requests on it.
package publish

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
)

// Dialect is the publisher API spoken.
type Dialect uint8

const (
	// PushStream is nginx-push-stream-module: 200 on success; it honours
	// Event-Id and Event-Type; it URL-decodes the channel id.
	PushStream Dialect = iota
	// Nchan answers 201 (someone listening) or 202 (stored, nobody
	// listening); it takes the event type from X-EventSource-Event and
	// does not decode the channel id.
	Nchan
)

// ParseDialect maps the config's name to a Dialect.
func ParseDialect(name string) (Dialect, error) {
	switch name {
	case "pushstream":
		return PushStream, nil
	case "nchan":
		return Nchan, nil
	}
	return 0, fmt.Errorf("unknown publisher dialect %q", name)
}

func (d Dialect) String() string {
	if d == Nchan {
		return "nchan"
	}
	return "pushstream"
}

// accepted reports whether status means Nginx took the message.
func (d Dialect) accepted(status int) bool {
	if d == Nchan {
		return status == 201 || status == 202
	}
	return status == 200
}

// typeHeader is the request header that carries the SSE event type.
func (d Dialect) typeHeader() string {
	if d == Nchan {
		return "X-EventSource-Event"
	}
	return "Event-Type"
}

// Target is a parsed publish URL template such as
// http://127.0.0.1:8080/pub?id={channel}, or, for a publisher listening on a
// Unix socket, nginx's own spelling http://unix:/run/x.sock:/pub?id={channel}.
type Target struct {
	Dialect Dialect
	Network string // "tcp" or "unix"
	Addr    string // host:port, or the socket's path
	host    string // Host header
	prefix  string // request URI before the channel id
	suffix  string // request URI after it
}

// unixPrefix starts a Unix-socket URL, as in nginx's proxy_pass.
const unixPrefix = "http://unix:"

// ParseTarget parses the [push] url template for dialect. config.Validate
// calls it too, so check-config refuses exactly what the publisher cannot use.
func ParseTarget(d Dialect, template string) (Target, error) {
	prefix, suffix, ok := strings.Cut(template, "{channel}")
	if !ok {
		return Target{}, fmt.Errorf("publish URL %q has no {channel}", template)
	}
	if strings.Contains(suffix, "{channel}") {
		return Target{}, fmt.Errorf("publish URL %q has {channel} twice", template)
	}
	t := Target{Dialect: d, suffix: suffix}
	var uri string
	if rest, ok := strings.CutPrefix(prefix, unixPrefix); ok {
		path, u, ok := strings.Cut(rest, ":")
		if !ok || !strings.HasPrefix(path, "/") {
			return Target{}, fmt.Errorf("publish URL %q: want http://unix:/path/to.sock:/uri", template)
		}
		t.Network, t.Addr, t.host, uri = "unix", path, "localhost", u
	} else {
		u, err := url.Parse(prefix)
		if err != nil {
			return Target{}, fmt.Errorf("publish URL %q: %w", template, err)
		}
		// Compared byte for byte below: "HTTP://" or userinfo would parse
		// here and then be cut wrongly from the request URI.
		if u.Scheme != "http" || u.Host == "" || u.User != nil || !strings.HasPrefix(prefix, "http://"+u.Host) {
			return Target{}, fmt.Errorf("publish URL %q: want http://host:port/path (lower-case scheme, no user)", template)
		}
		t.Network, t.Addr, t.host = "tcp", u.Host, u.Host
		switch port := u.Port(); {
		case strings.HasSuffix(u.Host, ":"):
			return Target{}, fmt.Errorf("publish URL %q: empty port", template)
		case port == "":
			t.Addr += ":80"
		default:
			if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
				return Target{}, fmt.Errorf("publish URL %q: port %q out of range 1..65535", template, port)
			}
		}
		// The request URI is the template's text after scheme and host,
		// kept byte for byte: re-encoding it could change what Nginx sees.
		uri = strings.TrimPrefix(prefix, "http://"+u.Host)
	}
	if uri == "" || uri[0] != '/' {
		return Target{}, fmt.Errorf("publish URL %q: the path must start with /", template)
	}
	if i := strings.IndexFunc(uri+suffix, func(r rune) bool { return r <= ' ' || r == 0x7f || r == '#' }); i >= 0 {
		return Target{}, fmt.Errorf("publish URL %q: spaces, control characters and # cannot go in a request line", template)
	}
	t.prefix = uri
	return t, nil
}

// AppendURI appends the request URI for channel to dst.
//
// Push Stream URL-decodes the id, so bytes outside the unreserved set are
// percent-encoded for it. Nchan takes the id literally, so nothing is
// encoded for it (an encoded id would name another channel). Ids that pass
// message.CheckChannel come out unchanged in both dialects.
func (t *Target) AppendURI(dst []byte, channel string) []byte {
	dst = append(dst, t.prefix...)
	if t.Dialect == PushStream {
		for i := 0; i < len(channel); i++ {
			c := channel[i]
			if plainQueryByte(c) {
				dst = append(dst, c)
			} else {
				dst = append(dst, '%', hexDigits[c>>4], hexDigits[c&15])
			}
		}
	} else {
		dst = append(dst, channel...)
	}
	return append(dst, t.suffix...)
}

const hexDigits = "0123456789ABCDEF"

func plainQueryByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '-' || c == '_' || c == '.' || c == '~' || c == ':' || c == '@'
}

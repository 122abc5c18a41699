// Command answers records what real Nginx answers the relay's publish
// requests, byte for byte, as seed corpus for the publisher's response
// reader (sidecar/publish FuzzAnswers). Each case writes its requests
// pipelined on one connection, as a lane does, and keeps every byte Nginx
// sends back until it closes the connection or goes quiet.
//
//	go run ./integration/cmd/answers -out sidecar/publish/testdata/fuzz/FuzzAnswers
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// A case is a publisher location's extra directives and the requests sent.
type answerCase struct {
	name  string
	extra string   // directives in the publisher location, before the module's
	reqs  []string // channel ids; "" sends no id, "BIG:" a 40 KiB body
}

var cases = []answerCase{
	{"ok", "", []string{"a", "b", "a"}},
	{"deny", "deny all;", []string{"a", "b"}},
	{"too-large", "", []string{"a", "BIG:a", "b"}},
	{"no-id", "", []string{"a", "", "b"}},
	{"reserved", "", []string{"a", "ALL", "b"}},
	{"server-error", `if ($arg_id = "bad") { return 500; }`, []string{"a", "bad", "b"}},
	{"unavailable-keepalive", `if ($arg_id = "bad") { return 503; }`, []string{"a", "bad", "b"}},
	{"not-found", "return 404;", []string{"a"}},
}

func main() {
	out := flag.String("out", "sidecar/publish/testdata/fuzz/FuzzAnswers", "corpus directory")
	flag.Parse()
	if err := os.MkdirAll(*out, 0o755); err != nil {
		fail(err)
	}
	for _, m := range []stack.Module{stack.Nchan, stack.PushStream} {
		if err := record(m, *out); err != nil {
			fail(fmt.Errorf("%s: %w", m, err))
		}
	}
}

func record(m stack.Module, out string) error {
	dir, err := os.MkdirTemp("", "answers")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var servers strings.Builder
	listens := map[string]string{}
	for _, c := range cases {
		port, err := stack.FreePort()
		if err != nil {
			return err
		}
		listens[c.name] = fmt.Sprintf("127.0.0.1:%d", port)
		fmt.Fprintf(&servers, "server { listen %s; location = /pub { %s %s keepalive_timeout 300s; client_max_body_size 32k; } }\n",
			listens[c.name], c.extra, publisher(m))
	}
	n, err := stack.StartNginx(stack.NginxOptions{Dir: dir, Module: m, HTTP: servers.String()})
	if err != nil {
		return err
	}
	defer n.Stop()
	for _, c := range cases {
		got, err := exchange(listens[c.name], c.reqs)
		if err != nil {
			return fmt.Errorf("%s: %w", c.name, err)
		}
		// Go's corpus format: one line per argument of the fuzz function
		// (pushstream bool, requests uint8, answers []byte).
		body := fmt.Sprintf("go test fuzz v1\nbool(%v)\nuint8(%d)\n[]byte(%q)\n", m == stack.PushStream, len(c.reqs), got)
		name := filepath.Join(out, "nginx-"+string(m)+"-"+c.name)
		if err := os.WriteFile(name, []byte(body), 0o644); err != nil {
			return err
		}
		fmt.Printf("%s: %d bytes\n", name, len(got))
	}
	return nil
}

func publisher(m stack.Module) string {
	if m == stack.PushStream {
		return "push_stream_publisher normal; push_stream_channels_path $arg_id;"
	}
	return "nchan_publisher http; nchan_channel_id $arg_id;"
}

// exchange writes the requests pipelined and reads until the connection
// closes or nothing more comes for 300 ms.
func exchange(addr string, channels []string) ([]byte, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	var reqs strings.Builder
	for _, ch := range channels {
		body := "hello " + ch
		if big, ok := strings.CutPrefix(ch, "BIG:"); ok {
			ch, body = big, strings.Repeat("x", 40<<10)
		}
		uri := "/pub?id=" + ch
		if ch == "" {
			uri = "/pub"
		}
		fmt.Fprintf(&reqs, "POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s", uri, len(body), body)
	}
	if _, err := c.Write([]byte(reqs.String())); err != nil {
		return nil, err
	}
	var got []byte
	buf := make([]byte, 64<<10)
	for {
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		k, err := c.Read(buf)
		got = append(got, buf[:k]...)
		if err != nil {
			return got, nil // closed, or quiet: all there is
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "answers:", err)
	os.Exit(1)
}

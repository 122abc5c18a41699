package publish

import "testing"

func TestParseTargetAndURI(t *testing.T) {
	cases := []struct {
		dialect  Dialect
		template string
		channel  string
		addr     string
		uri      string
	}{
		{PushStream, "http://127.0.0.1:80/pub?id={channel}", "thread:1", "127.0.0.1:80", "/pub?id=thread:1"},
		{PushStream, "http://127.0.0.1/pub?id={channel}", "a.b-c_d@e", "127.0.0.1:80", "/pub?id=a.b-c_d@e"},
		{PushStream, "http://[::1]:8080/pub?id={channel}&x=1", "c", "[::1]:8080", "/pub?id=c&x=1"},
		{Nchan, "http://localhost:9000/pub/{channel}", "thread:2", "localhost:9000", "/pub/thread:2"},
		// Push Stream decodes the id: anything outside the plain set is
		// encoded so that the decoded id is the channel itself.
		{PushStream, "http://127.0.0.1:80/pub?id={channel}", "sp ace/é", "127.0.0.1:80", "/pub?id=sp%20ace%2F%C3%A9"},
		// Nchan does not decode: encoding would create another channel.
		{Nchan, "http://127.0.0.1:80/pub?id={channel}", "sp%20ace", "127.0.0.1:80", "/pub?id=sp%20ace"},
		// nginx's proxy_pass spelling for a Unix socket.
		{Nchan, "http://unix:/run/pushrelay/publish.sock:/pub?id={channel}", "c", "/run/pushrelay/publish.sock", "/pub?id=c"},
	}
	for _, c := range cases {
		tg, err := ParseTarget(c.dialect, c.template)
		if err != nil {
			t.Fatalf("%s: %v", c.template, err)
		}
		if tg.Addr != c.addr {
			t.Errorf("%s: addr %q, want %q", c.template, tg.Addr, c.addr)
		}
		if got := string(tg.AppendURI(nil, c.channel)); got != c.uri {
			t.Errorf("%s %s(%q): uri %q, want %q", c.template, c.dialect, c.channel, got, c.uri)
		}
	}
	// Each of these once passed check-config and then failed the publisher.
	for _, bad := range []string{"http://127.0.0.1/pub", "https://127.0.0.1/pub?id={channel}", "/pub?id={channel}",
		"http://h:8080?id={channel}", "HTTP://127.0.0.1/pub?id={channel}", "http://u:p@127.0.0.1/pub?id={channel}",
		"http://unix:relative.sock:/pub?id={channel}", "http://unix:/run/x.sock?id={channel}",
		"http://127.0.0.1/pub?id={channel}&again={channel}", "http://127.0.0.1/p b?id={channel}",
		// Found by the config fuzzer: each passed check-config and then
		// could not be dialled or put in a request line.
		"http://127.0.0.1:/pub?id={channel}", "http://127.0.0.1:99999/pub?id={channel}", "http://127.0.0.1:0/pub?id={channel}",
		"http://127.0.0.1/pub?id={channel}\x00", "http://unix:/run/x.sock:/pub\x01?id={channel}"} {
		if _, err := ParseTarget(PushStream, bad); err == nil {
			t.Errorf("ParseTarget(%q) accepted", bad)
		}
	}
}

func TestDialectStatuses(t *testing.T) {
	for _, s := range []int{200} {
		if !PushStream.accepted(s) {
			t.Errorf("pushstream %d not accepted", s)
		}
	}
	for _, s := range []int{201, 202, 204, 500, 400} {
		if PushStream.accepted(s) {
			t.Errorf("pushstream %d accepted", s)
		}
	}
	for _, s := range []int{201, 202} {
		if !Nchan.accepted(s) {
			t.Errorf("nchan %d not accepted", s)
		}
	}
	for _, s := range []int{200, 403, 500} {
		if Nchan.accepted(s) {
			t.Errorf("nchan %d accepted", s)
		}
	}
}

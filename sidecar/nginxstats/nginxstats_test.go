package nginxstats

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/nginxstats/nginxtest"
	"github.com/pushrelay/pushrelay/sidecar/telemetry"
)

// runScraper runs a scraper until the test ends and returns a function
// that gives the /metrics text once the scraper has read the page at least
// once after the call.
func runScraper(t *testing.T, dialect, url string) (s *Scraper, metrics func() string) {
	t.Helper()
	reg := telemetry.New()
	s = New(dialect, url, 20*time.Millisecond, reg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	scrapes := func() int { s.mu.Lock(); defer s.mu.Unlock(); return s.n }
	return s, func() string {
		// Two more completed scrapes: one started after this call.
		for n := scrapes(); scrapes() < n+2; {
			time.Sleep(5 * time.Millisecond)
		}
		var b bytes.Buffer
		reg.WritePrometheus(&b)
		return b.String()
	}
}

func requireLines(t *testing.T, text string, lines ...string) {
	t.Helper()
	for _, l := range lines {
		if !strings.Contains(text, "\n"+l+"\n") && !strings.HasPrefix(text, l+"\n") {
			t.Errorf("/metrics lacks %q:\n%s", l, text)
		}
	}
}

// Against Debian's nginx with Nchan and the repo's own Nchan snippet.
func TestNchanStubStatusFromRealNginx(t *testing.T) {
	if _, err := os.Stat(nginxtest.NchanModule); err != nil {
		t.Skipf("libnginx-mod-nchan is not installed (scripts/deps.sh installs it): %v", err)
	}
	snippet, err := filepath.Abs("../../nginx/pushrelay-nchan.conf")
	if err != nil {
		t.Fatal(err)
	}
	// The http-level snippet holds the publisher server, with /pub and
	// /channels-stats; the stack gives it a free port.
	ngx := nginxtest.Start(t, nginxtest.Options{
		Modules: []string{nginxtest.NchanModule},
		HTTP:    "include " + strings.TrimSuffix(snippet, ".conf") + "-http.conf;", // nchan_max_reserved_memory 512M
		Server:  "include " + snippet + ";",
	})
	base := ngx.PublisherURL("")
	for _, ch := range []string{"a", "a", "b"} {
		resp, err := http.Post(base+"/pub?id="+ch, "text/plain", strings.NewReader("hello "+ch))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode/100 != 2 {
			t.Fatalf("publish to %s: %s", ch, resp.Status)
		}
	}
	// One long-poll subscriber on channel a, waiting for the next message.
	sub, err := net.Dial("tcp", ngx.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	fmt.Fprintf(sub, "GET /lp/a HTTP/1.1\r\nHost: t\r\n\r\n")

	s, metrics := runScraper(t, DialectNchan, base+"/channels-stats")
	var st Stats
	deadline := time.Now().Add(5 * time.Second)
	for {
		if st, err = s.Scrape(t.Context()); err != nil {
			t.Fatal(err)
		}
		if st.Subscribers == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	want := Stats{Channels: 2, Subscribers: 1, StoredMessages: 3, PublishedMessages: 3, MessagesInTrash: -1,
		SharedMemoryUsed: st.SharedMemoryUsed, SharedMemoryLimit: 512 << 20}
	if st != want {
		t.Errorf("stats = %+v, want %+v", st, want)
	}
	if st.SharedMemoryUsed <= 0 || st.SharedMemoryUsed >= st.SharedMemoryLimit {
		t.Errorf("shared memory used = %d, want between 0 and the limit %d", st.SharedMemoryUsed, st.SharedMemoryLimit)
	}
	text := metrics()
	requireLines(t, text,
		"pushrelay_nginx_stats_scrape_success 1",
		"pushrelay_nginx_channels 2",
		"pushrelay_nginx_subscribers 1",
		"pushrelay_nginx_stored_messages 3",
		"pushrelay_nginx_published_messages_total 3",
		"pushrelay_nginx_shared_memory_limit_bytes 536870912",
		"# TYPE pushrelay_nginx_published_messages_total counter",
	)
	if strings.Contains(text, "messages_in_trash") {
		t.Error("Nchan reports no trash, yet /metrics has a trash figure")
	}
}

// Against the /channels-stats summary as Push Stream 0.6.0 writes it (the
// module is not packaged in Debian, so the document is a fixture).
func TestPushStreamChannelsStatsFromDocumentedJSON(t *testing.T) {
	doc, err := os.ReadFile("testdata/pushstream-channels-stats.json")
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/channels-stats" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(doc)
	}))
	defer srv.Close()

	_, metrics := runScraper(t, DialectPushStream, srv.URL+"/channels-stats")
	text := metrics()
	requireLines(t, text,
		"pushrelay_nginx_stats_scrape_success 1",
		"pushrelay_nginx_channels 3",
		"pushrelay_nginx_subscribers 4",
		"pushrelay_nginx_stored_messages 300",
		"pushrelay_nginx_published_messages_total 1250",
		"pushrelay_nginx_messages_in_trash 950",
	)
	if strings.Contains(text, "shared_memory") {
		t.Error("Push Stream does not report its zone, yet /metrics has a shared memory figure")
	}
}

func TestPushStreamRejectsTheGroupAndChannelDocuments(t *testing.T) {
	for _, doc := range []string{
		`{"hostname": "fe-01", "time": "2026-11-25T19:13:37", "channels": 1, "wildcard_channels": 0, "uptime": 3, "infos": [{"channel": "a", "published_messages": 1, "stored_messages": 1, "subscribers": 0}]}`,
		`{"channel": "a", "published_messages": 1, "stored_messages": 1, "subscribers": 0}`,
		`not json`,
	} {
		if st, err := ParsePushStream(strings.NewReader(doc)); err == nil {
			t.Errorf("ParsePushStream(%.40q…) = %+v, want an error", doc, st)
		}
	}
}

// A down Nginx, a wrong URL or a wrong dialect is a 0, not stale figures.
func TestFailedScrapeExportsOnlyTheFailure(t *testing.T) {
	dead := "http://127.0.0.1:" + fmt.Sprint(nginxtest.FreePort(t)) + "/channels-stats"
	notFound := httptest.NewServer(http.NotFoundHandler())
	defer notFound.Close()
	nchanText := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "total published messages: 1\nstored messages: 1\n")
	}))
	defer nchanText.Close()
	for _, tc := range []struct{ name, dialect, url string }{
		{"nothing listening", DialectNchan, dead},
		{"404", DialectPushStream, notFound.URL},
		{"truncated nchan page", DialectNchan, nchanText.URL},
		{"nchan page read as push stream", DialectPushStream, nchanText.URL},
		{"unknown dialect", "mercure", nchanText.URL},
		{"no url", DialectNchan, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, metrics := runScraper(t, tc.dialect, tc.url)
			text := metrics()
			requireLines(t, text, "pushrelay_nginx_stats_scrape_success 0")
			if strings.Contains(text, "pushrelay_nginx_channels") {
				t.Errorf("figures exported after a failed scrape:\n%s", text)
			}
		})
	}
}

// Package nginxstats reads the statistics page of the local Nginx push
// module (Push Stream's /channels-stats JSON or Nchan's nchan_stub_status
// text) into the relay's /metrics.
//
// Push Stream's most common production failure is a full shared-memory zone
// (publishes get 500), so the figures that lead up to it are exported: for
// Nchan, the zone's use against its limit; for Push Stream, which does not
// report its zone, the stored messages and the messages still held in the
// trash (freed 10–14 s after they leave a channel).
package nginxstats

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/telemetry"
)

// Dialects, as in the [push] section.
const (
	DialectPushStream = "pushstream"
	DialectNchan      = "nchan"
)

// maxBody bounds what one scrape reads; both pages are a few hundred bytes.
const maxBody = 1 << 20

// Stats is one reading of the statistics page. A field the module does not
// report is -1.
type Stats struct {
	Channels          int64
	Subscribers       int64
	StoredMessages    int64
	PublishedMessages int64
	MessagesInTrash   int64 // Push Stream only
	SharedMemoryUsed  int64 // Nchan only, bytes
	SharedMemoryLimit int64 // Nchan only, bytes
}

// Scraper polls the statistics URL every interval.
type Scraper struct {
	interval time.Duration
	log      *slog.Logger
	client   *http.Client

	mu      sync.Mutex
	dialect string // what to scrape: a reload may change both
	url     string
	last    Stats
	ok      bool // the latest scrape succeeded
	seen    bool // a scrape has completed, successfully or not
	n       int  // scrapes completed, for tests to wait on
}

var families = []struct{ name, typ, help string }{
	{"pushrelay_nginx_stats_scrape_success", "gauge", "1 if the last read of the Nginx module's statistics page succeeded, else 0 (and the other pushrelay_nginx_* figures are absent)."},
	{"pushrelay_nginx_channels", "gauge", "Channels in the Nginx push module's shared memory."},
	{"pushrelay_nginx_subscribers", "gauge", "Subscribers connected to the Nginx push module, all workers."},
	{"pushrelay_nginx_stored_messages", "gauge", "Messages stored in the Nginx push module's channels."},
	{"pushrelay_nginx_published_messages_total", "counter", "Messages published to the Nginx push module since it started (resets when Nginx restarts)."},
	{"pushrelay_nginx_messages_in_trash", "gauge", "Push Stream: messages out of their channel but still holding shared memory (freed 10-14 s later); with stored messages, what fills the zone until publishes get 500."},
	{"pushrelay_nginx_shared_memory_used_bytes", "gauge", "Nchan: shared memory in use, of pushrelay_nginx_shared_memory_limit_bytes; a full zone makes publishes fail with 500."},
	{"pushrelay_nginx_shared_memory_limit_bytes", "gauge", "Nchan: the shared memory limit (nchan_max_reserved_memory)."},
}

// New returns a scraper of statsURL whose figures are written into reg.
// dialect is "pushstream" or "nchan"; anything else makes every scrape fail
// with a logged reason.
func New(dialect, statsURL string, interval time.Duration, reg *telemetry.Registry, log *slog.Logger) *Scraper {
	if interval <= 0 {
		interval = 10 * time.Second
	}
	s := &Scraper{
		dialect:  dialect,
		url:      statsURL,
		interval: interval,
		log:      log,
		client:   &http.Client{Timeout: min(interval, 5*time.Second)},
	}
	for _, f := range families {
		reg.Describe(f.name, f.typ, f.help)
	}
	reg.Set().RegisterMetricsWriter(s.writeMetrics)
	return s
}

// SetTarget points the scraper at another statistics page, for a reload
// that changed push.stats_url, push.url or push.dialect.
func (s *Scraper) SetTarget(dialect, statsURL string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dialect, s.url = dialect, statsURL
}

func (s *Scraper) target() (dialect, url string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dialect, s.url
}

// Run scrapes at once and then every interval until ctx is done.
func (s *Scraper) Run(ctx context.Context) {
	t := time.NewTicker(s.interval)
	defer t.Stop()
	wasOK := true
	for {
		st, err := s.Scrape(ctx)
		if ctx.Err() != nil {
			return
		}
		// Log transitions only: a down Nginx would otherwise log every tick.
		_, url := s.target()
		if err != nil && wasOK {
			s.log.Warn("nginx stats: scrape failed", "url", url, "err", err)
		} else if err == nil && !wasOK {
			s.log.Info("nginx stats: scrape works again", "url", url)
		}
		wasOK = err == nil
		s.mu.Lock()
		s.last, s.ok, s.seen = st, err == nil, true
		s.n++
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Scrape reads the statistics page once.
func (s *Scraper) Scrape(ctx context.Context) (Stats, error) {
	dialect, url := s.target()
	if url == "" {
		return Stats{}, fmt.Errorf("nginx stats: no stats_url configured")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return Stats{}, fmt.Errorf("nginx stats: %w", err)
	}
	if dialect == DialectPushStream {
		req.Header.Set("Accept", "application/json")
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return Stats{}, fmt.Errorf("nginx stats: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		io.Copy(io.Discard, io.LimitReader(resp.Body, maxBody))
		return Stats{}, fmt.Errorf("nginx stats: %s: status %s", url, resp.Status)
	}
	body := io.LimitReader(resp.Body, maxBody)
	switch dialect {
	case DialectPushStream:
		return ParsePushStream(body)
	case DialectNchan:
		return ParseNchan(body)
	}
	return Stats{}, fmt.Errorf("nginx stats: unknown dialect %q", dialect)
}

// ParsePushStream reads the summary of Push Stream's /channels-stats:
// {"hostname": …, "channels": 3, "published_messages": 10,
// "stored_messages": 5, "messages_in_trash": 2, "subscribers": 4, …}.
func ParsePushStream(r io.Reader) (Stats, error) {
	var doc struct {
		Channels          *int64 `json:"channels"`
		PublishedMessages *int64 `json:"published_messages"`
		StoredMessages    *int64 `json:"stored_messages"`
		MessagesInTrash   *int64 `json:"messages_in_trash"`
		Subscribers       *int64 `json:"subscribers"`
	}
	if err := json.NewDecoder(r).Decode(&doc); err != nil {
		return Stats{}, fmt.Errorf("push stream stats: %w", err)
	}
	if doc.Channels == nil || doc.Subscribers == nil || doc.StoredMessages == nil {
		// ?id=ALL or ?id=CH gives another document; the summary is needed.
		return Stats{}, fmt.Errorf("push stream stats: not the summary (no channels, subscribers or stored_messages); point stats_url at /channels-stats without ?id=")
	}
	val := func(p *int64) int64 {
		if p == nil {
			return -1
		}
		return *p
	}
	return Stats{
		Channels:          *doc.Channels,
		Subscribers:       *doc.Subscribers,
		StoredMessages:    *doc.StoredMessages,
		PublishedMessages: val(doc.PublishedMessages),
		MessagesInTrash:   val(doc.MessagesInTrash),
		SharedMemoryUsed:  -1,
		SharedMemoryLimit: -1,
	}, nil
}

// ParseNchan reads nchan_stub_status: "name: value" lines such as
// "shared memory used: 24K".
func ParseNchan(r io.Reader) (Stats, error) {
	vals := map[string]string{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok {
			vals[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	if err := sc.Err(); err != nil {
		return Stats{}, fmt.Errorf("nchan stats: %w", err)
	}
	st := Stats{MessagesInTrash: -1}
	for _, f := range []struct {
		key   string
		dst   *int64
		bytes bool
	}{
		{"channels", &st.Channels, false},
		{"subscribers", &st.Subscribers, false},
		{"stored messages", &st.StoredMessages, false},
		{"total published messages", &st.PublishedMessages, false},
		{"shared memory used", &st.SharedMemoryUsed, true},
		{"shared memory limit", &st.SharedMemoryLimit, true},
	} {
		v, ok := vals[f.key]
		if !ok {
			return Stats{}, fmt.Errorf("nchan stats: no %q line", f.key)
		}
		n, err := parseCount(v, f.bytes)
		if err != nil {
			return Stats{}, fmt.Errorf("nchan stats: %s: %w", f.key, err)
		}
		*f.dst = n
	}
	return st, nil
}

// parseCount parses "42", or with bytes a size such as "24K" (Nchan prints
// kilobytes).
func parseCount(v string, bytes bool) (int64, error) {
	mult := int64(1)
	if bytes {
		switch {
		case strings.HasSuffix(v, "K"):
			mult, v = 1<<10, strings.TrimSuffix(v, "K")
		case strings.HasSuffix(v, "M"):
			mult, v = 1<<20, strings.TrimSuffix(v, "M")
		case strings.HasSuffix(v, "G"):
			mult, v = 1<<30, strings.TrimSuffix(v, "G")
		}
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, err
	}
	return n * mult, nil
}

func (s *Scraper) writeMetrics(w io.Writer) {
	s.mu.Lock()
	st, ok, seen := s.last, s.ok, s.seen
	s.mu.Unlock()
	if !seen {
		return
	}
	if !ok {
		fmt.Fprintln(w, "pushrelay_nginx_stats_scrape_success 0")
		return
	}
	fmt.Fprintln(w, "pushrelay_nginx_stats_scrape_success 1")
	for _, f := range []struct {
		name string
		v    int64
	}{
		{"pushrelay_nginx_channels", st.Channels},
		{"pushrelay_nginx_subscribers", st.Subscribers},
		{"pushrelay_nginx_stored_messages", st.StoredMessages},
		{"pushrelay_nginx_published_messages_total", st.PublishedMessages},
		{"pushrelay_nginx_messages_in_trash", st.MessagesInTrash},
		{"pushrelay_nginx_shared_memory_used_bytes", st.SharedMemoryUsed},
		{"pushrelay_nginx_shared_memory_limit_bytes", st.SharedMemoryLimit},
	} {
		if f.v >= 0 {
			fmt.Fprintf(w, "%s %d\n", f.name, f.v)
		}
	}
}

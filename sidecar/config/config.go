// Package config reads and validates pushrelay.toml.
//
// Decoding is strict: an unknown key is an error that names the key and its
// line, because a typo in a production config should stop a deploy, not be
// silently ignored.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/sidecar/publish"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// EnvAMQPURL names the environment variable that may hold the AMQP URL, so
// the secret need not sit in the config file.
const EnvAMQPURL = "PUSHRELAY_AMQP_URL"

// Config is the whole file. Field docs live in packaging/pushrelay.toml.
type Config struct {
	Host            string   `toml:"host"`
	StateDir        string   `toml:"state_dir"`
	ShutdownTimeout Duration `toml:"shutdown_timeout"`
	MaxProcs        int      `toml:"max_procs"`
	AMQP            AMQP     `toml:"amqp"`
	Push            Push     `toml:"push"`
	Shards          Shards   `toml:"shards"`
	Metrics         Metrics  `toml:"metrics"`
	Log             Log      `toml:"log"`
	Probes          Probes   `toml:"probes"`
}

// AMQP is the [amqp] section.
type AMQP struct {
	URL                 string   `toml:"url"`
	URLs                []string `toml:"urls"`
	URLFile             string   `toml:"url_file"`
	Exchange            string   `toml:"exchange"`
	Queue               string   `toml:"queue"`
	Prefetch            int      `toml:"prefetch"`
	QueueType           string   `toml:"queue_type"`
	MessageTTL          Duration `toml:"message_ttl"`
	MaxLength           int      `toml:"max_length"`
	DeliveryLimit       int      `toml:"delivery_limit"`
	DeadLetterMaxLength int      `toml:"dead_letter_max_length"`
	Heartbeat           Duration `toml:"heartbeat"`
}

// Push is the [push] section: the local Nginx publisher.
type Push struct {
	Dialect     string   `toml:"dialect"`
	URL         string   `toml:"url"`
	Connections int      `toml:"connections"`
	Pipeline    int      `toml:"pipeline"`
	Timeout     Duration `toml:"timeout"`
	MaxBody     int      `toml:"max_body"`
	RetryMax    Duration `toml:"retry_max"`
	RetryBudget Duration `toml:"retry_budget"`
	MaxAge      Duration `toml:"max_age"`
	StatsURL    string   `toml:"stats_url"`
	// Dedupe: ack a redelivered copy of a message Nginx took, without
	// publishing it again (publish.Seen). Off only to measure its cost.
	Dedupe bool `toml:"dedupe"`
}

// Shards is the [shards] section.
type Shards struct {
	Count int                 `toml:"count"`
	Owned []string            `toml:"owned"`
	Map   map[string][]string `toml:"map"`
	Drain Duration            `toml:"drain"`
}

// Metrics is the [metrics] section.
type Metrics struct {
	Listen string `toml:"listen"`
}

// Log is the [log] section.
type Log struct {
	Level  string `toml:"level"`
	Format string `toml:"format"`
}

// Probes is the [probes] section: the eBPF socket probes.
type Probes struct {
	Enabled  bool     `toml:"enabled"`
	Ports    []int    `toml:"ports"`
	Cgroup   string   `toml:"cgroup"`
	Interval Duration `toml:"interval"`
}

// Dialects the publisher speaks.
const (
	DialectPushStream = "pushstream"
	DialectNchan      = "nchan"
)

// Duration is a time.Duration written as "10s" in TOML.
type Duration time.Duration

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// MarshalText writes the duration as Go does.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// D is the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Default returns a config with every default filled in; Load decodes the
// file on top of it.
func Default() Config {
	host, _ := os.Hostname()
	return Config{
		Host:            host,
		StateDir:        "/var/lib/pushrelay",
		ShutdownTimeout: Duration(10 * time.Second),
		MaxProcs:        1,
		AMQP: AMQP{
			Exchange:            "pushrelay",
			Prefetch:            2048,
			QueueType:           "classic",
			MessageTTL:          Duration(5 * time.Minute),
			MaxLength:           1_000_000,
			DeadLetterMaxLength: 100_000,
			Heartbeat:           Duration(10 * time.Second),
		},
		Push: Push{
			Dialect:     DialectPushStream,
			URL:         "http://127.0.0.1:8091/pub?id={channel}",
			Connections: 8,
			Pipeline:    16,
			Timeout:     Duration(2 * time.Second),
			MaxBody:     32 * 1024,
			RetryMax:    Duration(2 * time.Second),
			RetryBudget: Duration(3 * time.Minute),
			Dedupe:      true,
		},
		Shards:  Shards{Count: shard.DefaultCount, Drain: Duration(30 * time.Second)},
		Metrics: Metrics{Listen: "127.0.0.1:9470"},
		Log:     Log{Level: "info", Format: "json"},
		Probes: Probes{
			Enabled:  true,
			Ports:    []int{80, 443},
			Cgroup:   "/sys/fs/cgroup/system.slice/nginx.service",
			Interval: Duration(time.Second),
		},
	}
}

// Load reads, decodes and validates the file at path.
func Load(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	cfg, err := Parse(data)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, nil
}

// Parse decodes and validates a config held in memory.
func Parse(data []byte) (Config, error) {
	cfg := Default()
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		return Config{}, describeDecodeError(err)
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, withLines(err, keyLines(data))
	}
	return cfg, nil
}

var keyOfError = regexp.MustCompile(`^key "([^"]+)"`)

// withLines prefixes each of Validate's errors with the line of the key it
// names, so `pushrelay check-config` points at the line to fix.
func withLines(err error, lines map[string]int) error {
	j, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return err
	}
	var out []error
	for _, e := range j.Unwrap() {
		if _, joined := e.(interface{ Unwrap() []error }); joined {
			out = append(out, withLines(e, lines)) // the shard map's list
			continue
		}
		if m := keyOfError.FindStringSubmatch(e.Error()); m != nil {
			if n, ok := lines[m[1]]; ok {
				e = fmt.Errorf("line %d: %w", n, e)
			}
		}
		out = append(out, e)
	}
	return errors.Join(out...)
}

var (
	tableLine = regexp.MustCompile(`^\s*\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$`)
	keyLine   = regexp.MustCompile(`^\s*("[^"]+"|[A-Za-z0-9_-]+)\s*=`)
)

// keyLines maps "table.key" to the line that sets it. It reads the simple
// TOML this config is written in (tables and key = value lines); decoding
// has already succeeded, so nothing here needs to be strict.
func keyLines(data []byte) map[string]int {
	lines := map[string]int{}
	table := ""
	for i, line := range strings.Split(string(data), "\n") {
		if m := tableLine.FindStringSubmatch(line); m != nil {
			table = m[1]
			if _, ok := lines[table]; !ok {
				lines[table] = i + 1
			}
			continue
		}
		if m := keyLine.FindStringSubmatch(line); m != nil {
			key := strings.Trim(m[1], `"`)
			if table != "" {
				key = table + "." + key
			}
			if _, ok := lines[key]; !ok {
				lines[key] = i + 1
			}
		}
	}
	return lines
}

// describeDecodeError turns go-toml's errors into one line per problem that
// names the key and the line.
func describeDecodeError(err error) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) {
		msgs := make([]string, 0, len(strict.Errors))
		for _, e := range strict.Errors {
			row, _ := e.Position()
			msgs = append(msgs, fmt.Sprintf("line %d: unknown key %q", row, strings.Join(e.Key(), ".")))
		}
		return errors.New(strings.Join(msgs, "; "))
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, _ := de.Position()
		key := strings.Join(de.Key(), ".")
		if key != "" {
			return fmt.Errorf("line %d: key %q: %s", row, key, de.Error())
		}
		return fmt.Errorf("line %d: %s", row, de.Error())
	}
	return fmt.Errorf("decode: %w", err)
}

// Validate checks every value and fills the values derived from others.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("key %q: %s", key, fmt.Sprintf(format, args...)))
	}
	if c.Host == "" {
		bad("host", "must not be empty")
	}
	if c.AMQP.Queue == "" {
		c.AMQP.Queue = "pushrelay." + c.Host
	}
	if c.AMQP.Exchange == "" {
		bad("amqp.exchange", "must not be empty")
	}
	// AMQP names travel as short strings: a longer name would pass here and
	// then fail every declare, in a reconnect loop, after the start.
	if n := len(c.AMQP.Exchange); n > maxAMQPName {
		bad("amqp.exchange", "must be at most %d bytes, got %d", maxAMQPName, n)
	}
	if n := len(c.AMQP.Queue); n > maxAMQPName {
		bad("amqp.queue", "must be at most %d bytes (pushrelay.<host> when unset), got %d", maxAMQPName, n)
	}
	if c.AMQP.Prefetch < 1 || c.AMQP.Prefetch > 65535 {
		bad("amqp.prefetch", "must be 1..65535, got %d", c.AMQP.Prefetch)
	}
	if c.AMQP.QueueType != "classic" && c.AMQP.QueueType != "quorum" {
		bad("amqp.queue_type", "must be classic or quorum, got %q", c.AMQP.QueueType)
	}
	if c.AMQP.MessageTTL < 0 || c.AMQP.MaxLength < 0 || c.AMQP.DeadLetterMaxLength < 0 {
		bad("amqp", "message_ttl, max_length and dead_letter_max_length must not be negative")
	}
	// RabbitMQ takes x-message-ttl in whole milliseconds, up to ten years
	// (measured on 3.10: 315360000001 is refused, value_too_large). A
	// refused declare would only show at the relay's next session.
	if ttl := c.AMQP.MessageTTL.D(); ttl > 0 && (ttl < time.Millisecond || ttl > maxMessageTTL) {
		bad("amqp.message_ttl", "must be 0 (none) or 1ms..%v (RabbitMQ's limit), got %v", maxMessageTTL, ttl)
	}
	if n := btoi(c.AMQP.URL != "") + btoi(len(c.AMQP.URLs) > 0) + btoi(c.AMQP.URLFile != ""); n > 1 {
		bad("amqp.urls", "set one of amqp.url, amqp.urls and amqp.url_file, not %d", n)
	}
	if c.AMQP.URL != "" {
		if err := CheckAMQPURL(c.AMQP.URL); err != nil {
			bad("amqp.url", "%v", err)
		}
	}
	for i, u := range c.AMQP.URLs {
		if err := CheckAMQPURL(u); err != nil {
			bad("amqp.urls", "entry %d %v", i+1, err)
		}
	}
	if c.AMQP.DeliveryLimit < 0 {
		bad("amqp.delivery_limit", "must not be negative (0: the broker's default)")
	}
	if c.AMQP.DeliveryLimit > 0 && c.AMQP.QueueType != "quorum" {
		bad("amqp.delivery_limit", "only quorum queues count deliveries (queue_type = \"quorum\")")
	}
	if c.Push.Dialect != DialectPushStream && c.Push.Dialect != DialectNchan {
		bad("push.dialect", "must be %q or %q, got %q", DialectPushStream, DialectNchan, c.Push.Dialect)
	}
	if err := checkPublishURL(c.Push.URL); err != nil {
		bad("push.url", "%v", err)
	}
	if c.Push.Connections < 1 || c.Push.Connections > 256 {
		bad("push.connections", "must be 1..256, got %d", c.Push.Connections)
	}
	if c.Push.Pipeline < 1 || c.Push.Pipeline > 256 {
		bad("push.pipeline", "must be 1..256, got %d", c.Push.Pipeline)
	}
	if c.Push.Timeout <= 0 {
		bad("push.timeout", "must be positive")
	}
	if c.Push.RetryMax <= 0 {
		bad("push.retry_max", "must be positive")
	}
	if c.Push.RetryBudget <= 0 {
		bad("push.retry_budget", "must be positive")
	}
	if c.Push.MaxAge < 0 {
		bad("push.max_age", "must not be negative (0 turns it off)")
	}
	if c.Push.MaxBody < 1 {
		bad("push.max_body", "must be positive")
	}
	if c.MaxProcs < 0 {
		bad("max_procs", "must be 0 (every CPU) or more, got %d", c.MaxProcs)
	}
	if c.ShutdownTimeout <= 0 {
		bad("shutdown_timeout", "must be positive")
	}
	if c.Shards.Count < 1 || c.Shards.Count > 65536 {
		bad("shards.count", "must be 1..65536, got %d", c.Shards.Count)
	}
	if c.Shards.Drain < 0 {
		bad("shards.drain", "must not be negative")
	}
	if c.Log.Level != "debug" && c.Log.Level != "info" && c.Log.Level != "warn" && c.Log.Level != "error" {
		bad("log.level", "must be debug, info, warn or error, got %q", c.Log.Level)
	}
	if c.Log.Format != "json" && c.Log.Format != "text" {
		bad("log.format", "must be json or text, got %q", c.Log.Format)
	}
	for _, p := range c.Probes.Ports {
		if p < 1 || p > 65535 {
			bad("probes.ports", "port %d out of range", p)
		}
	}
	if c.Probes.Interval <= 0 {
		bad("probes.interval", "must be positive")
	}
	if err := c.checkShards(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// maxAMQPName is the longest AMQP short string, the type of exchange and
// queue names on the wire.
const maxAMQPName = 255

// maxMessageTTL is the longest x-message-ttl RabbitMQ accepts.
const maxMessageTTL = 3650 * 24 * time.Hour

func checkPublishURL(raw string) error {
	_, err := publish.ParseTarget(publish.PushStream, raw)
	return err
}

// AMQPURLs resolves the broker nodes: amqp.urls, else amqp.url, else the
// file in amqp.url_file, else $PUSHRELAY_AMQP_URL (the last two: one URL
// per line, or comma-separated; the file may hold # comments), else the
// local default. The file and the environment are read at each call, so a
// new password there applies at the next connect. The entries are not
// parsed here: the relay dials the ones that work; CheckAMQPURLs says which
// do not.
func (c *Config) AMQPURLs() ([]string, error) {
	switch {
	case len(c.AMQP.URLs) > 0:
		return c.AMQP.URLs, nil
	case c.AMQP.URL != "":
		return []string{c.AMQP.URL}, nil
	case c.AMQP.URLFile != "":
		b, err := os.ReadFile(c.AMQP.URLFile)
		if err != nil {
			return nil, fmt.Errorf("amqp.url_file: %w", err)
		}
		urls, err := splitURLs("amqp.url_file "+c.AMQP.URLFile, stripURLFileComments(string(b)))
		if err != nil {
			return nil, fmt.Errorf("%w (blank lines and # comments aside)", err)
		}
		return urls, nil
	case os.Getenv(EnvAMQPURL) != "":
		return splitURLs("$"+EnvAMQPURL, os.Getenv(EnvAMQPURL))
	}
	return []string{"amqp://guest:guest@127.0.0.1:5672/"}, nil
}

// CheckAMQPURLs resolves the broker URLs as the relay does at each connect
// and parses every entry: Parse cannot see amqp.url_file or
// $PUSHRELAY_AMQP_URL, and check-config must refuse what the relay could
// never dial. Errors name the source and the entry, redacted.
func (c *Config) CheckAMQPURLs() error {
	urls, err := c.AMQPURLs()
	if err != nil {
		return err
	}
	var errs []error
	for i, u := range urls {
		if err := CheckAMQPURL(u); err != nil {
			entry := fmt.Sprintf("entry %d", i+1)
			if r := Redact(u); r != unparseableURL {
				entry += " (" + r + ")"
			}
			errs = append(errs, fmt.Errorf("%s: %s: %w", c.amqpURLSource(), entry, err))
		}
	}
	return errors.Join(errs...)
}

// amqpURLSource names where AMQPURLs takes the URLs from, for errors.
func (c *Config) amqpURLSource() string {
	switch {
	case len(c.AMQP.URLs) > 0:
		return "amqp.urls"
	case c.AMQP.URL != "":
		return "amqp.url"
	case c.AMQP.URLFile != "":
		return "amqp.url_file " + c.AMQP.URLFile
	case os.Getenv(EnvAMQPURL) != "":
		return "$" + EnvAMQPURL
	}
	return "the default AMQP URL"
}

// stripURLFileComments drops what an operator or an editor puts around the
// URLs in amqp.url_file: a UTF-8 BOM, which would glue itself to the first
// URL, and # comments, from a # that starts the line or follows
// whitespace. A # right after other text stays: it belongs to the URL (an
// unencoded # in a password), and cutting there would dial a truncated
// password instead of CheckAMQPURL saying how to encode it.
func stripURLFileComments(text string) string {
	text = strings.TrimPrefix(text, "\ufeff")
	lines := strings.Split(text, "\n")
	for i, line := range lines {
		for j := 0; j < len(line); j++ {
			if line[j] == '#' && (j == 0 || line[j-1] == ' ' || line[j-1] == '\t') {
				lines[i] = line[:j]
				break
			}
		}
	}
	return strings.Join(lines, "\n")
}

func splitURLs(from, list string) ([]string, error) {
	var urls []string
	for _, u := range strings.FieldsFunc(list, func(r rune) bool { return r == ',' || r == '\n' || r == '\r' }) {
		if u = strings.TrimSpace(u); u != "" {
			urls = append(urls, u)
		}
	}
	if len(urls) == 0 {
		return nil, fmt.Errorf("%s: no URL in it", from)
	}
	return urls, nil
}

// RedactAll is Redact over a list, for logs.
func RedactAll(urls []string) string {
	out := make([]string, len(urls))
	for i, u := range urls {
		out[i] = Redact(u)
	}
	return strings.Join(out, ",")
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// CheckAMQPURL parses an AMQP URL as the connection will. Its error never
// quotes the URL: url.Parse's would, password and all.
func CheckAMQPURL(raw string) error {
	if _, err := amqp.ParseURI(raw); err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			return errors.New("does not parse (not shown: it holds the password); " +
				"percent-encode %, /, @, : and # in the user and password")
		}
		return err
	}
	return nil
}

// Redact hides the password of an AMQP URL for logs. url.Parse finds the
// password only in the userinfo: a commented-out URL it reads as a
// fragment, or a password with an unencoded / ? or # that moves the rest
// into the path, query or fragment, would come out verbatim, so every
// user:password@ left in the result is masked too. A URL that does not
// parse is not shown at all: without the @ nothing tells where its
// password ends.
func Redact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return unparseableURL
	}
	return userinfoPattern.ReplaceAllString(u.Redacted(), "${1}:xxxxx@")
}

// unparseableURL is what Redact shows of a URL url.Parse refuses.
const unparseableURL = "(unparseable URL)"

// userinfoPattern matches [scheme://]user:password@ anywhere. The password
// runs to the last @, across anything: a password may hold an unencoded @,
// and masking too much is harmless where showing too little is not.
var userinfoPattern = regexp.MustCompile(`(?s)((?:[A-Za-z][A-Za-z0-9+.-]*://)?[^\s/:@#?,]*):.*@`)

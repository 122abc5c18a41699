package config

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// urlFileConfig returns a config whose amqp.url_file holds content.
func urlFileConfig(t *testing.T, content string) Config {
	t.Helper()
	file := filepath.Join(t.TempDir(), "amqp-url")
	if err := os.WriteFile(file, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Parse([]byte("host = \"fe1\"\n[amqp]\nurl_file = \"" + file + "\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// An operator comments the secret file: a commented-out node was taken as
// a URL (and Redact showed its password), a trailing comment made its entry
// invalid, and an editor's BOM broke the first line.
func TestURLFileCommentsBlankLinesAndBOM(t *testing.T) {
	const a, b, c = "amqp://relay:S3CRET@rmq1:5672/", "amqp://relay:S3CRET@rmq2:5672/", "amqp://relay:S3CRET@rmq3:5672/"
	for _, tc := range []struct {
		name, content string
		want          []string
	}{
		{"comment lines", "# cluster nodes\n#amqp://relay:OLDSECRET@rmq0:5672/\n" + a + "\n", []string{a}},
		{"indented comment", "  \t# amqp://relay:OLDSECRET@rmq0:5672/\n" + a + "\n", []string{a}},
		{"trailing comment", a + "   # primary\n" + b + "\t# in the other rack\n", []string{a, b}},
		{"trailing comment after a list", a + ", " + b + " # both racks\n", []string{a, b}},
		{"BOM", "\ufeff" + a + "\n" + b + "\n", []string{a, b}},
		{"BOM then comment", "\ufeff# nodes\n" + a + "\n", []string{a}},
		{"CRLF", a + "\r\n\r\n" + b + " # second\r\n", []string{a, b}},
		{"no final newline", a, []string{a}},
		{"the reviewer's file", "\ufeff# cluster nodes; old node was amqp://relay:OLDSECRET@rmq0:5672/\r\n" +
			"#amqp://relay:COMMENTEDSECRET@rmq9:5672/\r\n" +
			"\r\n" +
			a + "   # primary\r\n" +
			b + "\r\n" +
			" , " + c + " ,\r\n", []string{a, b, c}},
		// A # with no space before it is part of the URL (an unencoded #
		// in a password): cutting there would dial with a truncated
		// password; kept whole, CheckAMQPURL says how to encode it.
		{"hash inside a URL", "amqp://relay:pa#ss@rmq1/\n", []string{"amqp://relay:pa#ss@rmq1/"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := urlFileConfig(t, tc.content)
			got, err := cfg.AMQPURLs()
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("AMQPURLs = %q, %v; want %q", got, err, tc.want)
			}
			for _, u := range got {
				if strings.Contains(u, "#") {
					continue // the case above, refused on purpose
				}
				if err := CheckAMQPURL(u); err != nil {
					t.Errorf("entry %q refused: %v", u, err)
				}
			}
			if s := RedactAll(got); strings.Contains(s, "SECRET") {
				t.Errorf("RedactAll shows a password: %s", s)
			}
		})
	}
}

func TestURLFileWithOnlyCommentsIsAnError(t *testing.T) {
	for _, content := range []string{"", "\n\r\n", "\ufeff", "# amqp://relay:OLDSECRET@rmq0/\n   # nothing\n", " , ,\n"} {
		cfg := urlFileConfig(t, content)
		urls, err := cfg.AMQPURLs()
		if err == nil {
			t.Errorf("%q: AMQPURLs = %q, want an error", content, urls)
			continue
		}
		if !strings.Contains(err.Error(), "amqp.url_file") || strings.Contains(err.Error(), "OLDSECRET") {
			t.Errorf("%q: error %q should name amqp.url_file and no password", content, err)
		}
	}
}

// Redact must hide a password whatever it is given: a URL whose userinfo
// url.Parse reads as a fragment, path, query or opaque part would otherwise
// come out verbatim.
func TestRedactNeverShowsThePassword(t *testing.T) {
	for _, raw := range []string{
		"#amqp://u:SECRET@h/",
		"#amqp://relay:SECRET@rmq1:5672/ # old",
		"  # amqp://u:SECRET@h/",
		"amqp://u:SECRET@h/#frag",
		"amqp://h/#u:SECRET@x",
		"amqp://h/?x=u:SECRET@y",
		"amqp://u:123/SECRET@h/",
		"amqp://u:123?SECRET@h/",
		"amqp://u:123#SECRET@h/",
		"amqp:u:SECRET@h",
		"garbage u:SECRET@ stuff",
		"x y/u:SECRET@h",
		"u:SECRET@",
		":SECRET@h",
		"amqp://u:SEC RET@h/",
		"amqp://u:SE@CRET@h/",
		"#amqp://u:SE@CRET@h/",
		"amqp://u:SECRET@h/ # primary",
		"amqp://relay:S3CR%zzET@rmq1:5672/",
		"amqp://u:SECRET@h1/,amqp://u:SECRET@h2/",
	} {
		got := Redact(raw)
		for _, piece := range []string{"SECRET", "SEC", "CRET", "S3CR", "zzET"} {
			if strings.Contains(got, piece) {
				t.Errorf("Redact(%q) = %q shows %q", raw, got, piece)
				break
			}
		}
	}
	// What it shows of an ordinary URL stays useful in a log.
	for raw, want := range map[string]string{
		"amqp://relay:pw@rmq1:5672/":      "amqp://relay:xxxxx@rmq1:5672/",
		"amqp://relay:pw@rmq1:5672/vhost": "amqp://relay:xxxxx@rmq1:5672/vhost",
		"amqps://rmq1/?heartbeat=10":      "amqps://rmq1/?heartbeat=10",
		"#amqp://u:pw@h/":                 "#amqp://u:xxxxx@h/",
	} {
		if got := Redact(raw); got != want {
			t.Errorf("Redact(%q) = %q, want %q", raw, got, want)
		}
	}
}

// FuzzRedact: whatever surrounds a user:password@, Redact never shows the
// password (make fuzz runs it beyond these seeds).
func FuzzRedact(f *testing.F) {
	for _, seed := range [][2]string{
		{"amqp://", "rmq1:5672/"}, {"#amqp://", "h/"}, {"amqp://h/?x=", ""}, {"amqp://h/#", "x"},
		{"amqp:", "h"}, {"x y/", "h"}, {"", ""}, {"amqp://u:p@", "h/"}, {"  # amqp://", "h/ # old"},
	} {
		f.Add(seed[0], seed[1])
	}
	f.Fuzz(func(t *testing.T, before, after string) {
		raw := before + "relay:SECRETPW@" + after
		if got := Redact(raw); strings.Contains(got, "SECRETPW") {
			t.Fatalf("Redact(%q) = %q", raw, got)
		}
	})
}

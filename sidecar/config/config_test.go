package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaultsApplyToAMinimalFile(t *testing.T) {
	cfg, err := Parse([]byte(`host = "fe1"`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.AMQP.Queue != "pushrelay.fe1" {
		t.Errorf("queue = %q, want pushrelay.fe1", cfg.AMQP.Queue)
	}
	if cfg.AMQP.Exchange != "pushrelay" || cfg.Push.Dialect != "pushstream" || cfg.Shards.Count != 1024 ||
		cfg.Push.MaxBody != 32768 || cfg.ShutdownTimeout.D() != 10*time.Second {
		t.Errorf("defaults not applied: %+v", cfg)
	}
}

func TestUnknownKeysNameKeyAndLine(t *testing.T) {
	_, err := Parse([]byte("host = \"fe1\"\n[amqp]\nprefetch = 10\nprefech = 20\n[push]\ndialekt = \"nchan\"\n"))
	if err == nil {
		t.Fatal("unknown keys accepted")
	}
	for _, want := range []string{`line 4: unknown key "amqp.prefech"`, `line 6: unknown key "push.dialekt"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestWrongTypeNamesKeyAndLine(t *testing.T) {
	_, err := Parse([]byte("host = \"fe1\"\n[push]\ntimeout = \"soon\"\n"))
	if err == nil || !strings.Contains(err.Error(), "line 3") || !strings.Contains(err.Error(), "push.timeout") {
		t.Fatalf("error %v should name line 3 and push.timeout", err)
	}
}

func TestValidationNamesEveryBadKey(t *testing.T) {
	_, err := Parse([]byte(`host = "fe1"
[amqp]
prefetch = 0
queue_type = "stream"
[push]
dialect = "websocket"
url = "https://127.0.0.1/pub"
connections = 0
[log]
level = "loud"
`))
	if err == nil {
		t.Fatal("invalid config accepted")
	}
	for key, line := range map[string]int{"amqp.prefetch": 3, "amqp.queue_type": 4, "push.dialect": 6,
		"push.url": 7, "push.connections": 8, "log.level": 10} {
		if want := fmt.Sprintf("line %d: key %q", line, key); !strings.Contains(err.Error(), want) {
			t.Errorf("error does not say %s:\n%v", want, err)
		}
	}
}

func TestAMQPURLSources(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "url")
	// A cluster, one node per line, as an operator writes the secret file.
	if err := os.WriteFile(file, []byte("amqp://u:secret@rmq1:5672/\namqp://u:secret@rmq2:5672/\n\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Parse([]byte("host = \"fe1\"\n[amqp]\nurl_file = \"" + file + "\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if u, err := cfg.AMQPURLs(); err != nil || strings.Join(u, " ") != "amqp://u:secret@rmq1:5672/ amqp://u:secret@rmq2:5672/" {
		t.Errorf("url_file: %q, %v", u, err)
	}
	t.Setenv(EnvAMQPURL, "amqp://env:pw@h1/, amqp://env:pw@h2/")
	cfg, _ = Parse([]byte(`host = "fe1"`))
	if u, _ := cfg.AMQPURLs(); strings.Join(u, " ") != "amqp://env:pw@h1/ amqp://env:pw@h2/" {
		t.Errorf("env: %q", u)
	}
	cfg, err = Parse([]byte("host = \"fe1\"\n[amqp]\nurls = [\"amqp://a@r1/\", \"amqp://a@r2/\", \"amqp://a@r3/\"]\n"))
	if u, _ := cfg.AMQPURLs(); err != nil || len(u) != 3 {
		t.Errorf("urls: %q, %v", u, err)
	}
	for _, both := range []string{"url = \"amqp://a\"\nurl_file = \"/x\"", "url = \"amqp://a\"\nurls = [\"amqp://b\"]"} {
		if _, err := Parse([]byte("host = \"fe1\"\n[amqp]\n" + both + "\n")); err == nil {
			t.Errorf("%q accepted", both)
		}
	}
	if got := RedactAll([]string{"amqp://u:secret@rmq1:5672/", "amqp://u:secret@rmq2:5672/"}); strings.Contains(got, "secret") {
		t.Errorf("RedactAll leaks the password: %s", got)
	}
	if _, err := Parse([]byte("host = \"fe1\"\n[amqp]\ndelivery_limit = 5\n")); err == nil {
		t.Error("delivery_limit on a classic queue accepted")
	}
}

// The shipped example must stay loadable: the .deb installs it as the
// conffile.
func TestShippedExampleLoads(t *testing.T) {
	path := filepath.Join("..", "..", "packaging", "pushrelay.toml")
	if _, err := Load(path); err != nil {
		t.Fatal(err)
	}
}

// RabbitMQ refuses x-message-ttl past ten years, and takes whole
// milliseconds: check-config must say so, not the relay's next session.
func TestMessageTTLWithinRabbitMQsRange(t *testing.T) {
	for ttl, ok := range map[string]bool{"0s": true, "1ms": true, "87600h": true, "87600h1ms": false, "1000000h": false, "500us": false} {
		_, err := Parse([]byte("host = \"fe1\"\n[amqp]\nmessage_ttl = \"" + ttl + "\"\n"))
		if got := err == nil; got != ok {
			t.Errorf("message_ttl %s: error %v, want accepted %v", ttl, err, ok)
		}
		if err != nil && !strings.Contains(err.Error(), "amqp.message_ttl") {
			t.Errorf("message_ttl %s: error %q does not name the key", ttl, err)
		}
	}
}

package config

import (
	"maps"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/pushrelay/pushrelay/sidecar/publish"
)

// FuzzParse feeds pushrelay.toml text to Parse, the code behind both the
// relay's start and `pushrelay check-config`. Seeds: the shipped file (read
// here, so it never drifts from a copy) and testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	shipped, err := os.ReadFile("../../packaging/pushrelay.toml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(shipped)
	f.Add([]byte(strings.Replace(string(shipped), `dialect = "pushstream"`, `dialect = "nchan"`, 1)))
	f.Add([]byte(strings.Replace(string(shipped), "# [shards.map]\n# frontend-1", "[shards.map]\nfrontend-1", 1)))

	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("refused with an empty message: check-config would print nothing")
			}
			return
		}

		// Validate fills derived values (the queue name); on an accepted
		// config it must have nothing left to fill or refuse, or a reload
		// that re-validates would see another config than the start did.
		again := clone(cfg)
		if err := again.Validate(); err != nil {
			t.Fatalf("accepted config fails Validate again: %v", err)
		}
		if !reflect.DeepEqual(again, cfg) {
			t.Fatalf("Validate changed an accepted config:\n%+v\n%+v", cfg, again)
		}

		// One parser: whatever check-config accepts, the publisher must be
		// able to build requests from, in the dialect configured.
		d, err := publish.ParseDialect(cfg.Push.Dialect)
		if err != nil {
			t.Fatalf("accepted dialect %q: %v", cfg.Push.Dialect, err)
		}
		target, err := publish.ParseTarget(d, cfg.Push.URL)
		if err != nil {
			t.Fatalf("accepted push.url %q the publisher refuses: %v", cfg.Push.URL, err)
		}
		if (target.Network != "tcp" && target.Network != "unix") || target.Addr == "" {
			t.Fatalf("push.url %q gives no address to dial: %+v", cfg.Push.URL, target)
		}
		// A space, CR or LF would split the request line: Nginx would read
		// the rest as headers or as the next request.
		uri := string(target.AppendURI(nil, "thread:1"))
		if !strings.HasPrefix(uri, "/") || strings.ContainsAny(uri, " \r\n#") {
			t.Fatalf("push.url %q gives request URI %q", cfg.Push.URL, uri)
		}

		// The names the relay declares must fit an AMQP short string, or
		// the relay would start and then fail every declare.
		if len(cfg.AMQP.Exchange) > 255 || len(cfg.AMQP.Queue) > 255 {
			t.Fatalf("accepted exchange %q / queue %q longer than 255 bytes", cfg.AMQP.Exchange, cfg.AMQP.Queue)
		}

		if _, err := cfg.ShardMap(); err != nil {
			t.Fatalf("accepted config has no usable shard map: %v", err)
		}
	})
}

// clone copies cfg deeply, so that a Validate writing into a shared map or
// slice shows up in the comparison.
func clone(c Config) Config {
	c.Shards.Owned = slices.Clone(c.Shards.Owned)
	if c.Shards.Map != nil {
		m := maps.Clone(c.Shards.Map)
		for h, r := range m {
			m[h] = slices.Clone(r)
		}
		c.Shards.Map = m
	}
	c.Probes.Ports = slices.Clone(c.Probes.Ports)
	return c
}

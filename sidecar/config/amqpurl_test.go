package config

import (
	"strings"
	"testing"
)

// A password with an unencoded % or / made the URL parser's error quote the
// whole URL, and the relay logged it on every reconnect.
func TestAMQPURLErrorsNeverShowThePassword(t *testing.T) {
	for _, u := range []string{
		"amqp://relay:s3cr%zzet@rmq1:5672/",
		"amqp://relay:se/cr:et@rmq1:5672/",
		"amqp://relay:secr#et@rmq1:5672/",
	} {
		err := CheckAMQPURL(u)
		if err == nil {
			t.Errorf("%s: accepted", u)
			continue
		}
		for _, piece := range []string{"s3cr", "zzet", "se/cr", "cr:et", "secr", "et@"} {
			if strings.Contains(err.Error(), piece) {
				t.Errorf("error for a bad URL shows %q: %v", piece, err)
			}
		}
	}
	if err := CheckAMQPURL("amqp://relay:s3cr%25et@rmq1:5672/"); err != nil {
		t.Errorf("a percent-encoded password refused: %v", err)
	}
	cfg := "host = \"fe1\"\n[amqp]\nurl = \"amqp://relay:s3cr%zzet@rmq1/\"\n"
	_, err := Parse([]byte(cfg))
	if err == nil || !strings.Contains(err.Error(), "amqp.url") || strings.Contains(err.Error(), "s3cr") {
		t.Errorf("check-config on a bad amqp.url: %v", err)
	}
}

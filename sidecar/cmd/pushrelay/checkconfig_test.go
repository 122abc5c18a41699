package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pushrelay/pushrelay/sidecar/config"
)

// systemctl reload runs check-config before SIGHUP, and the unit runs it
// before the start: a url_file the relay cannot use must fail it, with a
// reason and without the password.
func TestCheckConfigReadsTheURLFile(t *testing.T) {
	t.Setenv(config.EnvAMQPURL, "")
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name    string
		urlFile string // path of amqp.url_file
		rc      int
		want    string // in the output
	}{
		{"missing", filepath.Join(dir, "absent"), 1, "no such file"},
		{"unreadable", dir, 1, "amqp.url_file"}, // a directory: read fails even as root
		{"empty", write("empty", ""), 1, "no URL"},
		{"only comments", write("comments", "# amqp://relay:OLDSECRET@rmq0/\n\n  # none yet\n"), 1, "no URL"},
		{"junk", write("junk", "not a url\n# nothing\n"), 1, "entry 1"},
		{"bad password encoding", write("pct", "amqp://relay:S3CR%zzET@rmq1:5672/\namqp://relay:GOODSECRET@rmq2/\n"), 1, "percent-encode"},
		{"wrong scheme", write("scheme", "http://relay:SECRET@rmq1/\n"), 1, "scheme"},
		{"commented cluster", write("good", "\ufeff# nodes\r\n#amqp://relay:OLDSECRET@rmq0/\r\n"+
			"amqp://relay:SECRET@rmq1:5672/  # primary\r\namqp://relay:SECRET@rmq2:5672/\r\n"), 0, ": ok"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := tempConfig(t, fmt.Sprintf("host = \"fe1\"\n[amqp]\nurl_file = %q\n", tc.urlFile))
			rc, out, errOut := invoke("", "check-config", path)
			if rc != tc.rc || !strings.Contains(out+errOut, tc.want) {
				t.Errorf("rc %d, want %d with %q:\n%s%s", rc, tc.rc, tc.want, out, errOut)
			}
			for _, secret := range []string{"SECRET", "S3CR", "zzET"} {
				if strings.Contains(out+errOut, secret) {
					t.Errorf("check-config shows %q:\n%s%s", secret, out, errOut)
				}
			}
		})
	}
}

// $PUSHRELAY_AMQP_URL is read the same way: the unit gives check-config the
// relay's environment.
func TestCheckConfigReadsTheEnvironment(t *testing.T) {
	path := tempConfig(t, "host = \"fe1\"\n")
	t.Setenv(config.EnvAMQPURL, "amqp://relay:SECRET@rmq1/, amqp://relay:S3CR%zzET@rmq2/")
	rc, out, errOut := invoke("", "check-config", path)
	if rc != 1 || !strings.Contains(errOut, config.EnvAMQPURL) || !strings.Contains(errOut, "entry 2") {
		t.Errorf("rc %d, want 1 naming %s entry 2:\n%s%s", rc, config.EnvAMQPURL, out, errOut)
	}
	if strings.Contains(out+errOut, "SECRET") || strings.Contains(out+errOut, "S3CR") {
		t.Errorf("check-config shows the password:\n%s%s", out, errOut)
	}
	t.Setenv(config.EnvAMQPURL, "amqp://relay:SECRET@rmq1/, amqp://relay:SECRET@rmq2/")
	if rc, out, errOut := invoke("", "check-config", path); rc != 0 {
		t.Errorf("a good list refused: rc %d\n%s%s", rc, out, errOut)
	}
}

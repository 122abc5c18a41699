package packaging

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
	"github.com/pushrelay/pushrelay/sidecar/config"
)

const nchanModule = "/usr/lib/nginx/modules/ngx_nchan_module.so"

// nginxTest runs `nginx -t` on a minimal nginx.conf that includes the
// http-level snippet in http {} and the server snippet in a server block,
// as an operator would, with a throwaway prefix.
// Snippet paths are relative to the repository unless absolute.
func nginxTest(t *testing.T, nginx, module, httpSnippet, serverSnippet string) (string, error) {
	t.Helper()
	prefix := t.TempDir()
	if err := os.MkdirAll(filepath.Join(prefix, "logs"), 0o755); err != nil {
		t.Fatal(err)
	}
	abs := func(rel string) string {
		if filepath.IsAbs(rel) {
			return rel
		}
		p, err := filepath.Abs(filepath.Join(repoRoot, rel))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	load := ""
	if module != "" {
		load = "load_module " + module + ";"
	}
	conf := fmt.Sprintf(`%s
pid %[2]s/nginx.pid;
error_log %[2]s/logs/error.log;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path %[2]s/body;
    include %[3]s;
    server {
        listen 127.0.0.1:8080;
        server_name push.example.com;
        include %[4]s;
    }
}
`, load, prefix, abs(httpSnippet), abs(serverSnippet))
	path := filepath.Join(prefix, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	return run(t, time.Minute, nil, nginx, "-t", "-q", "-p", prefix, "-c", path)
}

func TestNchanSnippetsPassNginxT(t *testing.T) {
	nginx := needTool(t, "nginx", "nginx-light")
	if _, err := os.Stat(nchanModule); err != nil {
		needTool(t, "no-nchan-module", "libnginx-mod-nchan")
	}
	out, err := nginxTest(t, nginx, nchanModule, "nginx/pushrelay-nchan-http.conf", "nginx/pushrelay-nchan.conf")
	if err != nil {
		t.Fatalf("nginx -t: %v\n%s", err, out)
	}
}

// Push Stream is not in Debian: this runs the nginx `make pushstream` builds
// from ../shared/vendor (static), or PUSHRELAY_PUSHSTREAM_NGINX, with
// PUSHRELAY_PUSHSTREAM_MODULE naming a dynamic module to load if it is one.
func TestPushStreamSnippetsPassNginxT(t *testing.T) {
	nginx, err := stack.PushStreamNginx()
	if err != nil {
		t.Skip(err)
	}
	out, err := nginxTest(t, nginx, os.Getenv("PUSHRELAY_PUSHSTREAM_MODULE"), "nginx/pushrelay-pushstream-http.conf", "nginx/pushrelay-pushstream.conf")
	if err != nil {
		t.Fatalf("nginx -t: %v\n%s", err, out)
	}
}

// The check must fail on a broken snippet, or it proves nothing.
func TestNginxTCatchesMistakes(t *testing.T) {
	nginx := needTool(t, "nginx", "nginx-light")
	dir := t.TempDir()
	broken := strings.Replace(readFile(t, "nginx/pushrelay-nchan.conf"), "nchan_publisher http;", "nchan_publisher htp;", 1)
	if err := os.WriteFile(filepath.Join(dir, "broken.conf"), []byte(broken), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := nginxTest(t, nginx, nchanModule, "nginx/pushrelay-nchan-http.conf", filepath.Join(dir, "broken.conf")); err == nil {
		t.Fatalf("nginx -t accepted a bad publisher type:\n%s", out)
	}
}

// location returns the body of `location <match> {` in an nginx snippet.
func location(t *testing.T, conf, match string) string {
	t.Helper()
	start := strings.Index(conf, "location "+match+" {")
	if start < 0 {
		t.Fatalf("no location %s", match)
	}
	end := strings.Index(conf[start:], "\n}")
	return conf[start : start+end]
}

var sizeRE = regexp.MustCompile(`(?m)^\s*client_max_body_size\s+(\d+)([kKmM]?);`)

// The relay dead-letters bodies over push.max_body; nginx must accept
// every body the relay sends, and refuse none of them with 413.
func TestSnippetsMatchTheRelay(t *testing.T) {
	maxBody := config.Default().Push.MaxBody
	for _, f := range []string{"nginx/pushrelay-nchan.conf", "nginx/pushrelay-pushstream.conf"} {
		t.Run(filepath.Base(f), func(t *testing.T) {
			pub := location(t, readFile(t, f), "= /pub")
			m := sizeRE.FindStringSubmatch(pub)
			if m == nil {
				t.Fatal("/pub sets no client_max_body_size")
			}
			n, _ := strconv.Atoi(m[1])
			switch strings.ToLower(m[2]) {
			case "k":
				n <<= 10
			case "m":
				n <<= 20
			}
			if n != maxBody {
				t.Errorf("client_max_body_size %d bytes, relay's push.max_body default %d", n, maxBody)
			}
			if !strings.Contains(pub, "allow 127.0.0.1;") || !strings.Contains(pub, "deny all;") {
				t.Error("/pub is not restricted to loopback")
			}
			ka := regexp.MustCompile(`keepalive_requests\s+(\d+);`).FindStringSubmatch(pub)
			if ka == nil {
				t.Fatal("/pub sets no keepalive_requests")
			}
			if n, _ := strconv.Atoi(ka[1]); n < 100000 {
				t.Errorf("keepalive_requests %d: nginx would close the relay's connection every %d publishes", n, n)
			}
			for _, loc := range []string{`~ ^/ev/`, `~ ^/ws/`, `~ ^/lp/`, `= /channels-stats`} {
				if !strings.Contains(readFile(t, f), "location "+loc) {
					t.Errorf("no location %s", loc)
				}
			}
		})
	}
}

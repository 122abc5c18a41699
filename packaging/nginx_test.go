package packaging

import (
	"fmt"
	"net/url"
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
	broken := strings.Replace(readFile(t, "nginx/pushrelay-nchan-http.conf"), "nchan_publisher http;", "nchan_publisher htp;", 1)
	if err := os.WriteFile(filepath.Join(dir, "broken.conf"), []byte(broken), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := nginxTest(t, nginx, nchanModule, filepath.Join(dir, "broken.conf"), "nginx/pushrelay-nchan.conf"); err == nil {
		t.Fatalf("nginx -t accepted a bad publisher type:\n%s", out)
	}
}

// block returns what is between `header {` (at the start of a line, so
// not in a comment) and its matching `}` in an nginx snippet.
func block(t *testing.T, conf, header string) string {
	t.Helper()
	loc := regexp.MustCompile(`(?m)^[ \t]*` + regexp.QuoteMeta(header) + `[ \t]*\{`).FindStringIndex(conf)
	if loc == nil {
		t.Fatalf("no %s {", header)
	}
	depth := 0
	for i := loc[1] - 1; i < len(conf); i++ {
		switch conf[i] {
		case '{':
			depth++
		case '}':
			if depth--; depth == 0 {
				return conf[loc[1]:i]
			}
		}
	}
	t.Fatalf("%s { is not closed", header)
	return ""
}

var listenRE = regexp.MustCompile(`(?m)^[ \t]*listen[ \t]+([^;\s]+)[^;\n]*;`)

var sizeRE = regexp.MustCompile(`(?m)^\s*client_max_body_size\s+(\d+)([kKmM]?);`)

// The relay dead-letters bodies over push.max_body; nginx must accept
// every body the relay sends, and refuse none of them with 413. The
// publisher and statistics are in a server of their own on loopback, at the
// relay's default push.url, and nowhere in the public server's snippet:
// there an `allow 127.0.0.1` falls to a realip module trusting a client's
// forwarded address.
func TestSnippetsMatchTheRelay(t *testing.T) {
	def := config.Default().Push
	pubURL, err := url.Parse(strings.Replace(def.URL, "{channel}", "x", 1))
	if err != nil {
		t.Fatal(err)
	}
	for _, mod := range []string{"nchan", "pushstream"} {
		t.Run(mod, func(t *testing.T) {
			public := readFile(t, "nginx/pushrelay-"+mod+".conf")
			for _, loc := range []string{"= /pub", "= /channels-stats"} {
				if strings.Contains(public, "location "+loc) {
					t.Errorf("the public server's snippet has location %s", loc)
				}
			}
			for _, loc := range []string{`~ ^/ev/`, `~ ^/ws/`, `~ ^/lp/`} {
				if !strings.Contains(public, "location "+loc) {
					t.Errorf("no location %s", loc)
				}
			}

			server := block(t, readFile(t, "nginx/pushrelay-"+mod+"-http.conf"), "server")
			listens := listenRE.FindAllStringSubmatch(server, -1)
			if len(listens) == 0 {
				t.Fatal("the publisher server has no listen")
			}
			for _, l := range listens {
				if !strings.HasPrefix(l[1], "127.0.0.1:") && !strings.HasPrefix(l[1], "unix:") {
					t.Errorf("the publisher server listens on %s: not loopback only", l[1])
				}
			}
			if listens[0][1] != pubURL.Host {
				t.Errorf("the publisher server listens on %s, the relay's default push.url is %s", listens[0][1], def.URL)
			}
			if !strings.Contains(server, "location = /channels-stats") {
				t.Error("no location = /channels-stats in the publisher server")
			}
			pub := block(t, server, "location = /pub")
			if mod == "pushstream" && !strings.Contains(pub, "push_stream_publisher normal;") {
				t.Error("/pub is not push_stream_publisher normal: the relay never deletes a channel")
			}
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
			if n != def.MaxBody {
				t.Errorf("client_max_body_size %d bytes, relay's push.max_body default %d", n, def.MaxBody)
			}
			ka := regexp.MustCompile(`keepalive_requests\s+(\d+);`).FindStringSubmatch(pub)
			if ka == nil {
				t.Fatal("/pub sets no keepalive_requests")
			}
			if n, _ := strconv.Atoi(ka[1]); n < 100000 {
				t.Errorf("keepalive_requests %d: nginx would close the relay's connection every %d publishes", n, n)
			}
		})
	}
}

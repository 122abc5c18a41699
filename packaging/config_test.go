package packaging

import (
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/config"
)

const exampleConfig = "packaging/pushrelay.toml"

func TestExampleConfigPassesCheckConfig(t *testing.T) {
	out := mustRun(t, time.Minute, nil, relayBinary(t), "check-config", repoRoot+"/"+exampleConfig)
	if !strings.HasSuffix(strings.TrimSpace(out), ": ok") {
		t.Fatalf("check-config: %q", out)
	}
}

// The file documents the defaults: what it sets must be what the relay
// would use without it, so nobody copies a value believing it the default.
func TestExampleConfigShowsTheDefaults(t *testing.T) {
	example, err := config.Parse([]byte(readFile(t, exampleConfig)))
	if err != nil {
		t.Fatal(err)
	}
	empty, err := config.Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(example, empty) {
		t.Errorf("the example differs from the defaults:\nexample  %+v\ndefaults %+v", example, empty)
	}
}

// Keys left out on purpose, with the reason.
var undocumented = map[string]string{
	"shards.owned": "a one-host shorthand for shards.map; the example shows map only",
}

// Every key of config.Config appears in the example, set or commented out,
// in its section.
func TestExampleConfigListsEveryKey(t *testing.T) {
	text := readFile(t, exampleConfig)
	sections := map[string]string{"": text}
	if i := strings.Index(text, "\n["); i >= 0 {
		sections[""] = text[:i]
	}
	for _, m := range regexp.MustCompile(`(?m)^\[([a-z_]+)\]$`).FindAllStringSubmatchIndex(text, -1) {
		name := text[m[2]:m[3]]
		body := text[m[1]:]
		if j := regexp.MustCompile(`(?m)^\[[a-z_]+\]$`).FindStringIndex(body); j != nil {
			body = body[:j[0]]
		}
		sections[name] = body
	}
	for _, key := range tomlKeys(reflect.TypeOf(config.Config{}), "") {
		if _, ok := undocumented[key]; ok {
			continue
		}
		section, name := "", key
		if i := strings.LastIndex(key, "."); i >= 0 {
			section, name = key[:i], key[i+1:]
		}
		body, ok := sections[section]
		if !ok {
			t.Errorf("%s: no [%s] section", key, section)
			continue
		}
		re := regexp.MustCompile(`(?m)^#?\s*(` + regexp.QuoteMeta(name) + `\s*=|\[` + regexp.QuoteMeta(key) + `\])`)
		if !re.MatchString(body) {
			t.Errorf("%s is not in %s", key, exampleConfig)
		}
	}
}

// tomlKeys lists the dotted key of every leaf field (a table of scalars,
// like shards.map, counts as a leaf).
func tomlKeys(typ reflect.Type, prefix string) []string {
	var keys []string
	for f := range typ.Fields() {
		tag := strings.Split(f.Tag.Get("toml"), ",")[0]
		if tag == "" || tag == "-" {
			continue
		}
		if f.Type.Kind() == reflect.Struct && f.Type != reflect.TypeOf(config.Duration(0)) {
			keys = append(keys, tomlKeys(f.Type, prefix+tag+".")...)
			continue
		}
		keys = append(keys, prefix+tag)
	}
	return keys
}

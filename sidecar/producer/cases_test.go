package producer

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/sidecar/message"
)

// The shared table of validation cases, producer/testdata/cases.json: the
// Python producer's tests (producer/python) read the same file, so the two
// producers and the relay cannot drift apart unnoticed.

// tableString is a table value: a string, {"repeat": s, "times": n}, or a
// list of such parts to concatenate.
type tableString string

func (s *tableString) UnmarshalJSON(b []byte) error {
	var plain string
	if err := json.Unmarshal(b, &plain); err == nil {
		*s = tableString(plain)
		return nil
	}
	var rep struct {
		Repeat *string `json:"repeat"`
		Times  int     `json:"times"`
	}
	if err := json.Unmarshal(b, &rep); err == nil && rep.Repeat != nil {
		*s = tableString(strings.Repeat(*rep.Repeat, rep.Times))
		return nil
	}
	var parts []tableString
	if err := json.Unmarshal(b, &parts); err != nil {
		return fmt.Errorf("want a string, {repeat, times} or a list of them, got %s", b)
	}
	var sb strings.Builder
	for _, p := range parts {
		sb.WriteString(string(p))
	}
	*s = tableString(sb.String())
	return nil
}

type validationCase struct {
	Name        string          `json:"name"`
	Channel     json.RawMessage `json:"channel"` // string, null (absent) or a number (not a string)
	Body        tableString     `json:"body"`
	Type        tableString     `json:"type"`
	ID          tableString     `json:"id"`
	ContentType tableString     `json:"content_type"`
	MaxBody     int             `json:"max_body"`
	Reason      string          `json:"reason"`
	RelayReason string          `json:"relay_reason"`
	Why         string          `json:"why"`
}

type validationTable struct {
	DefaultMaxBody int              `json:"default_max_body"`
	Reasons        []string         `json:"reasons"`
	Cases          []validationCase `json:"cases"`
}

// repoRoot walks up from the package directory to the folder holding go.mod.
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test directory")
		}
		dir = parent
	}
}

func loadValidationTable(t *testing.T) validationTable {
	t.Helper()
	path := filepath.Join(repoRoot(t), "producer", "testdata", "cases.json")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err) // shipped with the repository: absent is a failure
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	var raw struct {
		About []string `json:"about"`
		validationTable
	}
	if err := dec.Decode(&raw); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	table := raw.validationTable
	if len(table.Cases) == 0 {
		t.Fatalf("%s holds no cases", path)
	}
	return table
}

// relayReason maps the table's verdict to message.Reason ("valid" is OK).
func relayReason(t *testing.T, s string) message.Reason {
	t.Helper()
	if s == "valid" {
		return message.OK
	}
	for _, r := range message.Reasons {
		if string(r) == s {
			return r
		}
	}
	t.Fatalf("reason %q is not one of the relay's (message.Reasons)", s)
	return ""
}

// TestSharedCasesTable checks the Go producer's validation, and the relay's
// message.Parse, against every row of the shared table. The producer is
// checked for its verdict and for naming the field at fault; the relay for
// the exact reason it would dead-letter with.
func TestSharedCasesTable(t *testing.T) {
	table := loadValidationTable(t)
	if table.DefaultMaxBody != DefaultMaxBody {
		t.Errorf("table's default_max_body %d, producer's DefaultMaxBody %d", table.DefaultMaxBody, DefaultMaxBody)
	}
	for _, r := range table.Reasons {
		relayReason(t, r)
	}
	for _, c := range table.Cases {
		maxBody := c.MaxBody
		if maxBody == 0 {
			maxBody = table.DefaultMaxBody
		}
		want := relayReason(t, c.Reason)
		wantRelay := want
		if c.RelayReason != "" {
			wantRelay = relayReason(t, c.RelayReason)
			if c.Why == "" {
				t.Errorf("%s: relay_reason without a why", c.Name)
			}
		}

		// The channel header as an AMQP client would send it.
		var headers amqp.Table
		var channel string
		isString := false
		var n json.Number
		var ts tableString
		switch {
		case string(c.Channel) == "null":
		case json.Unmarshal(c.Channel, &n) == nil:
			i, err := n.Int64()
			if err != nil {
				t.Fatalf("%s: channel %s: %v", c.Name, c.Channel, err)
			}
			headers = amqp.Table{"channel": i}
		case json.Unmarshal(c.Channel, &ts) == nil:
			channel, isString = string(ts), true
			headers = amqp.Table{"channel": channel}
		default:
			t.Fatalf("%s: channel %s: want a string, null or a number", c.Name, c.Channel)
		}

		d := amqp.Delivery{Headers: headers, Body: []byte(c.Body), MessageId: string(c.ID), Type: string(c.Type), ContentType: string(c.ContentType)}
		if _, got := message.Parse(&d, maxBody); got != wantRelay {
			t.Errorf("%s: relay's Parse = %q, want %q", c.Name, got, wantRelay)
		}

		if !isString && headers != nil {
			continue // Message.Channel is a string: Go cannot build this case
		}
		m := Message{Channel: channel, Body: []byte(c.Body), Type: string(c.Type), ID: string(c.ID), ContentType: string(c.ContentType)}
		err := m.validate(maxBody)
		switch {
		case want == message.OK && err != nil:
			t.Errorf("%s: producer refused a valid message: %v", c.Name, err)
		case want != message.OK && err == nil:
			t.Errorf("%s: producer accepted it, want %s", c.Name, want)
		case err != nil && !namesTheField(err.Error(), want):
			t.Errorf("%s: producer's error %q does not name the field at fault (want %s)", c.Name, err, want)
		}
	}
	t.Logf("%d cases checked", len(table.Cases))
}

// namesTheField reports whether a producer's error message names what
// reason r is about, so that a caller reading it knows what to fix.
func namesTheField(msg string, r message.Reason) bool {
	switch r {
	case message.BodyTooLarge:
		return strings.HasPrefix(msg, "body")
	case message.InvalidHeader:
		return strings.HasPrefix(msg, "type") || strings.HasPrefix(msg, "message id") || strings.HasPrefix(msg, "content type")
	}
	return strings.Contains(msg, "channel")
}

package producer

import (
	"strings"
	"testing"
)

func TestValidChannelFollowsTheRelaysRules(t *testing.T) {
	valid := []string{
		"a", "thread:1", "user@example.com", "forum:disqus.thread-9_x", "all", "ALLx", "xALL",
		"x.b", "x.b1a", "x.bb1", "b1", "x.B1", ".b", strings.Repeat("a", MaxChannelLen),
	}
	for _, ch := range valid {
		if err := ValidChannel(ch); err != nil {
			t.Errorf("ValidChannel(%q) = %v, want nil", ch, err)
		}
	}
	invalid := map[string]string{
		"":                                   "empty",
		strings.Repeat("a", MaxChannelLen+1): "longer than 200",
		"ALL":                                "reserved",
		"x.b1":                               "backtrack",
		"thread.b12345":                      "backtrack",
		".b0":                                "backtrack",
		"a b":                                `byte ' ' at offset 1`,
		"a/b":                                `byte '/'`,
		"a\nb":                               `byte '\n'`,
		"a%20":                               `byte '%'`,
		"thread:Ünïcødé":                     "offset 7",
		"a?b=c":                              `byte '?'`,
	}
	for ch, want := range invalid {
		err := ValidChannel(ch)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ValidChannel(%q) = %v, want an error mentioning %q", ch, err, want)
		}
	}
}

func TestMessageValidation(t *testing.T) {
	ok := Message{Channel: "thread:1", Body: make([]byte, 100), Type: "comment", ID: "42", ContentType: "application/json"}
	if err := ok.validate(100); err != nil {
		t.Fatalf("valid message refused: %v", err)
	}
	for name, c := range map[string]struct {
		mutate func(*Message)
		want   string
	}{
		"bad channel":       {func(m *Message) { m.Channel = "ALL" }, "reserved"},
		"body too large":    {func(m *Message) { m.Body = make([]byte, 101) }, "101 bytes, larger than 100"},
		"CRLF in type":      {func(m *Message) { m.Type = "x\r\nX-Injected: 1" }, "type"},
		"LF in id":          {func(m *Message) { m.ID = "1\n2" }, "message id"},
		"tab in id":         {func(m *Message) { m.ID = "1\t2" }, "control character"},
		"DEL in type":       {func(m *Message) { m.Type = "a\x7f" }, "control character"},
		"NUL in content":    {func(m *Message) { m.ContentType = "text/plain\x00" }, "content type"},
		"long id":           {func(m *Message) { m.ID = strings.Repeat("i", 256) }, "256 bytes, longer than 255"},
		"long content type": {func(m *Message) { m.ContentType = strings.Repeat("c", 256) }, "content type is 256 bytes"},
	} {
		m := ok
		c.mutate(&m)
		if err := m.validate(100); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error mentioning %q", name, err, c.want)
		}
	}
}

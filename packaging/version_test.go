package packaging

import (
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func debVersion(t *testing.T, describe string) string {
	t.Helper()
	env := append(os.Environ(), "PUSHRELAY_COMMIT_COUNT=42")
	return strings.TrimSpace(mustRun(t, 10*time.Second, env, "sh", "debversion.sh", describe))
}

func TestDebVersionFromGitDescribe(t *testing.T) {
	for describe, want := range map[string]string{
		"v1.2.3":                      "1.2.3",
		"v1.3.0-rc1":                  "1.3.0~rc1",
		"v1.2.3-4-gabc1234":           "1.2.3+git4.abc1234",
		"v1.2.3-4-gabc1234-dirty":     "1.2.3+git4.abc1234.dirty",
		"abc1234":                     "0.0.0~git42.abc1234",
		"7442962-dirty":               "0.0.0~git42.7442962.dirty",
		"v1.3.0-rc1-2-gdeadbee-dirty": "1.3.0~rc1+git2.deadbee.dirty",
	} {
		if got := debVersion(t, describe); got != want {
			t.Errorf("%s -> %s, want %s", describe, got, want)
		}
	}
}

// dpkg must order the versions as the commits are ordered, or an upgrade
// would be refused as a downgrade.
func TestDebVersionsSortLikeCommits(t *testing.T) {
	if _, err := exec.LookPath("dpkg"); err != nil {
		t.Skip("dpkg missing")
	}
	order := []string{"abc1234", "v1.3.0-rc1", "v1.3.0-rc1-2-gdeadbee", "v1.3.0", "v1.3.0-1-gabc1234", "v1.3.1"}
	for i := 1; i < len(order); i++ {
		a, b := debVersion(t, order[i-1]), debVersion(t, order[i])
		if err := exec.Command("dpkg", "--compare-versions", a, "lt", b).Run(); err != nil {
			t.Errorf("dpkg does not sort %s (%s) before %s (%s)", a, order[i-1], b, order[i])
		}
	}
}

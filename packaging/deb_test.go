package packaging

import (
	"bufio"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// buildDeb runs build-deb.sh into a temporary directory and returns the
// .deb's path. env adds VERSION, DEB_VERSION or CONFIG.
func buildDeb(t *testing.T, env ...string) string {
	t.Helper()
	needTool(t, "dpkg-deb", "dpkg")
	needTool(t, "go-md2man", "go-md2man")
	out := t.TempDir()
	full := append(os.Environ(), "OUT="+out)
	full = append(full, env...)
	res := mustRun(t, 10*time.Minute, full, "bash", "build-deb.sh")
	lines := strings.Split(strings.TrimSpace(res), "\n")
	deb := lines[len(lines)-1]
	if _, err := os.Stat(deb); err != nil {
		t.Fatalf("build-deb.sh printed %q: %v\n%s", deb, err, res)
	}
	return deb
}

// Expensive: set by `make deb-check` / `make deb-lint`.
func TestLintian(t *testing.T) {
	if os.Getenv("PUSHRELAY_LINTIAN") == "" {
		t.Skip("set PUSHRELAY_LINTIAN=1 (make deb-lint) to build the .deb and run lintian")
	}
	lintian := needTool(t, "lintian", "lintian")
	deb := buildDeb(t)
	out, err := run(t, 5*time.Minute, nil, lintian, "--pedantic", "--display-info", deb)
	t.Logf("lintian --pedantic --display-info %s (exit: %v):\n%s", filepath.Base(deb), err, out)
	var bad []string
	for _, line := range strings.Split(out, "\n") {
		// E: errors and W: warnings must be fixed or overridden with a
		// reason in packaging/debian/lintian-overrides; a stale override
		// shows as unused-override.
		if strings.HasPrefix(line, "E: ") || strings.HasPrefix(line, "W: ") || strings.Contains(line, "unused-override") {
			bad = append(bad, line)
		}
	}
	if len(bad) > 0 || err != nil {
		t.Errorf("lintian: %d errors, warnings or unused overrides (exit: %v):\n%s", len(bad), err, strings.Join(bad, "\n"))
	}
	// For the log only: lintian 2.116 exits 2 with --show-overrides even
	// when nothing is wrong, so its verdict comes from the run above.
	overridden, _ := run(t, 5*time.Minute, nil, lintian, "--pedantic", "--show-overrides", deb)
	t.Logf("overridden tags, with their reasons:\n%s", overridden)
}

// chroot is a throwaway Debian root made with debootstrap.
type chroot struct {
	t    *testing.T
	root string
}

// newChroot unpacks a cached minimal bookworm root (debootstrap makes the
// cache on first use, from Debian's packages) into a temporary directory.
// Nothing is mounted into it, so removing it cannot reach the host.
func newChroot(t *testing.T) *chroot {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the install test needs root (chroot, file ownership)")
	}
	debootstrap := needTool(t, "debootstrap", "debootstrap")
	cacheDir := os.Getenv("PUSHRELAY_DEBOOTSTRAP_CACHE")
	if cacheDir == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			t.Fatal(err)
		}
		cacheDir = filepath.Join(base, "pushrelay")
	}
	const suite = "bookworm"
	// adduser and init-system-helpers are the package's Depends; minbase
	// has neither.
	include := "adduser,init-system-helpers"
	tarball := filepath.Join(cacheDir, suite+"-minbase-"+strings.ReplaceAll(include, ",", "-")+".tar")
	if _, err := os.Stat(tarball); err != nil {
		if err := os.MkdirAll(cacheDir, 0o755); err != nil {
			t.Fatal(err)
		}
		mirror := os.Getenv("PUSHRELAY_DEBIAN_MIRROR")
		if mirror == "" {
			mirror = "http://deb.debian.org/debian"
		}
		fresh := t.TempDir()
		t.Logf("debootstrap %s from %s (cached in %s)", suite, mirror, tarball)
		mustRun(t, 15*time.Minute, nil, debootstrap, "--variant=minbase", "--include="+include, suite, fresh, mirror)
		mustRun(t, 5*time.Minute, nil, "tar", "-C", fresh, "-cf", tarball+".tmp", ".")
		if err := os.Rename(tarball+".tmp", tarball); err != nil {
			t.Fatal(err)
		}
	}
	root := t.TempDir()
	mustRun(t, 5*time.Minute, nil, "tar", "-C", root, "-xf", tarball)
	c := &chroot{t: t, root: root}
	// Never start a service from the root, whatever a script decides.
	c.write("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)
	return c
}

func (c *chroot) path(p string) string { return filepath.Join(c.root, p) }

func (c *chroot) write(p, content string, mode os.FileMode) {
	c.t.Helper()
	if err := os.WriteFile(c.path(p), []byte(content), mode); err != nil {
		c.t.Fatal(err)
	}
}

func (c *chroot) read(p string) string {
	c.t.Helper()
	b, err := os.ReadFile(c.path(p))
	if err != nil {
		c.t.Fatal(err)
	}
	return string(b)
}

func (c *chroot) exists(p string) bool {
	_, err := os.Lstat(c.path(p))
	return err == nil
}

// run runs a command inside the root with a clean environment.
func (c *chroot) run(args ...string) (string, error) {
	c.t.Helper()
	env := []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C.UTF-8", "HOME=/root"}
	return run(c.t, 5*time.Minute, env, "chroot", append([]string{c.root}, args...)...)
}

func (c *chroot) mustRun(args ...string) string {
	c.t.Helper()
	out, err := c.run(args...)
	if err != nil {
		c.t.Fatalf("in chroot: %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// idOf reads a user's or group's numeric id from the root's own database.
func (c *chroot) idOf(db, name string) (int, bool) {
	f, err := os.Open(c.path("/etc/" + db))
	if err != nil {
		c.t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) > 2 && fields[0] == name {
			id, err := strconv.Atoi(fields[2])
			if err != nil {
				c.t.Fatal(err)
			}
			return id, true
		}
	}
	return 0, false
}

// status is dpkg's abbreviated status and version ("ii 1.0.0"), or
// "unknown" when dpkg has no record of the package at all.
func (c *chroot) status(pkg string) string {
	out, err := c.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}${Version}", pkg)
	if err != nil && strings.Contains(out, "no packages found") {
		return "unknown"
	}
	return strings.TrimSpace(out)
}

// install installs a .deb with apt, as an operator would. Unattended, an
// edited conffile is kept (confold) instead of prompting.
func (c *chroot) install(deb string) string {
	c.t.Helper()
	dst := "/tmp/" + filepath.Base(deb)
	copyFile(c.t, deb, c.path(dst), 0o644)
	return c.mustRun("apt-get", "install", "-y", "-q", "--no-install-recommends",
		"-o", "Dpkg::Options::=--force-confold", "./"+dst)
}

const (
	confPath = "/etc/pushrelay/pushrelay.toml"
	wantsDir = "/etc/systemd/system/multi-user.target.wants/pushrelay.service"
)

// Expensive: set by `make deb-check`.
func TestInstallUpgradeRemovePurge(t *testing.T) {
	if os.Getenv("PUSHRELAY_DEB_INSTALL_TEST") == "" {
		t.Skip("set PUSHRELAY_DEB_INSTALL_TEST=1 (make deb-check) for the install test in a debootstrap root")
	}
	// Version 1.0.1 ships a changed default config: the case where dpkg
	// must choose between the admin's edit and the new file.
	changed := filepath.Join(t.TempDir(), "pushrelay.toml")
	copyFile(t, filepath.Join(repoRoot, exampleConfig), changed, 0o644)
	if err := os.WriteFile(changed, []byte(readFile(t, exampleConfig)+"\n# Changed in 1.0.1.\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	deb1 := buildDeb(t, "VERSION=v1.0.0", "DEB_VERSION=1.0.0")
	deb2 := buildDeb(t, "VERSION=v1.0.1", "DEB_VERSION=1.0.1", "CONFIG="+changed)
	c := newChroot(t)

	t.Log("install 1.0.0")
	c.install(deb1)
	if got := c.status("pushrelay"); got != "ii 1.0.0" {
		t.Fatalf("dpkg status %q, want ii 1.0.0", got)
	}
	uid, ok := c.idOf("passwd", "pushrelay")
	if !ok {
		t.Fatal("no pushrelay user")
	}
	gid, ok := c.idOf("group", "pushrelay")
	if !ok {
		t.Fatal("no pushrelay group")
	}
	if uid >= 1000 || uid == 0 {
		t.Errorf("pushrelay uid %d is not a system uid", uid)
	}
	pw := c.mustRun("getent", "passwd", "pushrelay")
	if !strings.HasSuffix(strings.TrimSpace(pw), ":/nonexistent:/usr/sbin/nologin") {
		t.Errorf("pushrelay user %q: want no home and no login shell", strings.TrimSpace(pw))
	}
	checkConfOwner := func() {
		t.Helper()
		fi, err := os.Stat(c.path(confPath))
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if st.Uid != 0 || int(st.Gid) != gid || fi.Mode().Perm() != 0o640 {
			t.Errorf("%s: %d:%d %v, want 0:%d (pushrelay) -rw-r-----", confPath, st.Uid, st.Gid, fi.Mode().Perm(), gid)
		}
	}
	checkConfOwner()
	if c.read(confPath) != readFile(t, exampleConfig) {
		t.Error("installed config differs from packaging/pushrelay.toml")
	}
	if got := c.mustRun("dpkg-query", "-W", "-f=${Conffiles}", "pushrelay"); !strings.Contains(got, confPath) {
		t.Errorf("%s is not a conffile:\n%s", confPath, got)
	}
	// As the service user: proves it can read what the unit will give it.
	c.mustRun("setpriv", "--reuid=pushrelay", "--regid=pushrelay", "--init-groups",
		"/usr/bin/pushrelay", "check-config", confPath)
	if got := strings.TrimSpace(c.mustRun("/usr/bin/pushrelay", "version")); got != "pushrelay v1.0.0" {
		t.Errorf("pushrelay version: %q", got)
	}
	if target, err := os.Readlink(c.path(wantsDir)); err != nil || target != "/lib/systemd/system/pushrelay.service" {
		t.Errorf("unit not enabled: %s -> %q (%v)", wantsDir, target, err)
	}
	for _, p := range []string{"/lib/systemd/system/pushrelay.service", "/etc/sysctl.d/60-pushrelay-frontend.conf",
		"/etc/nginx/snippets/pushrelay-nchan.conf", "/etc/nginx/snippets/pushrelay-pushstream.conf",
		"/usr/share/man/man1/pushrelay.1.gz", "/usr/share/doc/pushrelay/copyright", "/usr/share/doc/pushrelay/changelog.gz",
		"/usr/share/doc/pushrelay/README.Debian", "/usr/share/doc/pushrelay/README.nginx.md"} {
		if !c.exists(p) {
			t.Errorf("%s not installed", p)
		}
	}

	t.Log("edit the config, add a secret file, upgrade to 1.0.1")
	edited := strings.Replace(c.read(confPath), `level = "info"`, `level = "debug"`, 1)
	if edited == c.read(confPath) {
		t.Fatal("could not edit the config")
	}
	c.write(confPath, edited, 0o640)
	c.write("/etc/pushrelay/amqp-url", "amqp://relay:secret@broker.invalid:5672/\n", 0o640)
	c.install(deb2)
	if got := c.status("pushrelay"); got != "ii 1.0.1" {
		t.Fatalf("after upgrade: dpkg status %q, want ii 1.0.1", got)
	}
	if got := c.read(confPath); got != edited {
		t.Error("the upgrade lost the edit to pushrelay.toml")
	}
	if !strings.Contains(c.read(confPath+".dpkg-dist"), "# Changed in 1.0.1.") {
		t.Error("the new default config is not beside the edited one as .dpkg-dist")
	}
	checkConfOwner()
	if got := strings.TrimSpace(c.mustRun("/usr/bin/pushrelay", "version")); got != "pushrelay v1.0.1" {
		t.Errorf("after upgrade, pushrelay version: %q", got)
	}
	c.mustRun("/usr/bin/pushrelay", "check-config", confPath)

	t.Log("remove")
	c.mustRun("apt-get", "remove", "-y", "-q", "pushrelay")
	if got := c.status("pushrelay"); !strings.HasPrefix(got, "rc") {
		t.Errorf("after remove: dpkg status %q, want rc (config files kept)", got)
	}
	if c.exists("/usr/bin/pushrelay") || c.exists("/lib/systemd/system/pushrelay.service") {
		t.Error("remove left the binary or the unit")
	}
	if got := c.read(confPath); got != edited {
		t.Error("remove did not keep the edited conffile")
	}

	t.Log("purge")
	c.mustRun("apt-get", "purge", "-y", "-q", "pushrelay")
	if got := c.status("pushrelay"); got != "unknown" && !strings.HasPrefix(got, "un") && !strings.HasPrefix(got, "pn") {
		t.Errorf("after purge: dpkg status %q", got)
	}
	for _, p := range []string{"/etc/pushrelay", wantsDir, "/etc/systemd/system/pushrelay.service",
		"/etc/sysctl.d/60-pushrelay-frontend.conf", "/etc/nginx/snippets/pushrelay-nchan.conf",
		"/var/lib/systemd/deb-systemd-helper-enabled/pushrelay.service.dsh-also"} {
		if c.exists(p) {
			t.Errorf("purge left %s", p)
		}
	}
	// Nothing owned by the service user or group is left in the root.
	var left []string
	err := filepath.WalkDir(c.root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok && (int(st.Uid) == uid || int(st.Gid) == gid) {
			left = append(left, strings.TrimPrefix(p, c.root))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Errorf("purge left files of the pushrelay user: %v", left)
	}
}

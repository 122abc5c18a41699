#!/usr/bin/env bash
# Builds dist/pushrelay_<version>_amd64.deb with dpkg-deb from a tree laid out
# here. Inputs (environment, all optional):
#   VERSION      version compiled into the binary   (default: git describe)
#   DEB_VERSION  the package version                (default: debversion.sh)
#   OUT          output directory                   (default: dist)
#   GO           go command                         (default: go)
#   CONFIG       the conffile to ship   (default: packaging/pushrelay.toml;
#                the upgrade test ships a changed one as the next version)
# Prints the path of the .deb on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
cd "$top"

GO=${GO:-go}
OUT=${OUT:-dist}
VERSION=${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}
DEB_VERSION=${DEB_VERSION:-$("$here/debversion.sh")}
# Reproducible timestamps: the last commit, not the wall clock.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH

for tool in dpkg-deb go-md2man; do
	command -v "$tool" >/dev/null || { echo "build-deb: $tool missing (make deb-deps)" >&2; exit 1; }
done

mkdir -p "$OUT"
work=$(mktemp -d "${TMPDIR:-/tmp}/pushrelay-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
doc=$root/usr/share/doc/pushrelay

install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" \
	"$root/etc/pushrelay" "$root/etc/nginx/snippets" "$root/etc/sysctl.d" \
	"$doc" "$root/usr/share/man/man1" "$root/usr/share/lintian/overrides" \
	"$root/usr/share/pushrelay"

# No cgo: one static binary that runs on any Debian release of the arch.
CGO_ENABLED=0 GOOS=linux GOARCH=amd64 "$GO" build -trimpath -buildvcs=false \
	-ldflags "-s -w -X github.com/pushrelay/pushrelay/sidecar/version.Version=$VERSION" \
	-o "$root/usr/bin/pushrelay" ./sidecar/cmd/pushrelay
chmod 0755 "$root/usr/bin/pushrelay"

install -m 0644 packaging/pushrelay.service "$root/lib/systemd/system/pushrelay.service"
install -m 0644 "${CONFIG:-packaging/pushrelay.toml}" "$root/etc/pushrelay/pushrelay.toml"
for f in pushrelay-pushstream.conf pushrelay-pushstream-http.conf pushrelay-nchan.conf pushrelay-nchan-http.conf; do
	install -m 0644 "nginx/$f" "$root/etc/nginx/snippets/$f"
done
install -m 0644 nginx/sysctl/60-pushrelay-frontend.conf "$root/etc/sysctl.d/60-pushrelay-frontend.conf"
install -m 0644 packaging/debian/lintian-overrides "$root/usr/share/lintian/overrides/pushrelay"
install -m 0644 packaging/debian/copyright "$doc/copyright"
install -m 0644 nginx/README.md "$doc/README.nginx.md"
install -m 0644 packaging/debian/README.Debian "$doc/README.Debian"
# Prometheus rules, their runbook and the Grafana dashboard: for the
# monitoring host to copy or point at (RUNBOOK.md, "Setting it up").
for f in pushrelay.rules.yml pushrelay.alerts.yml pushrelay-dashboard.json RUNBOOK.md; do
	install -m 0644 "monitoring/$f" "$root/usr/share/pushrelay/$f"
done

# The changelog's top entry must name this package's version; a snapshot
# build gets an entry of its own above the released ones.
changelog=$work/changelog
top_version=$(sed -n '1s/^pushrelay (\([^)]*\)).*/\1/p' packaging/debian/changelog)
if [ "$top_version" != "$DEB_VERSION" ]; then
	maint=$(sed -n 's/^Maintainer: //p' packaging/debian/control.in)
	{
		echo "pushrelay ($DEB_VERSION) unstable; urgency=medium"
		echo
		echo "  * Snapshot build of $VERSION."
		echo
		echo " -- $maint  $(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")"
		echo
		cat packaging/debian/changelog
	} >"$changelog"
else
	cp packaging/debian/changelog "$changelog"
fi
# Native version (no Debian revision): policy names it changelog.gz.
gzip -9nc "$changelog" >"$doc/changelog.gz"

go-md2man -in packaging/pushrelay.1.md -out "$work/pushrelay.1"
gzip -9nc "$work/pushrelay.1" >"$root/usr/share/man/man1/pushrelay.1.gz"

for s in postinst prerm postrm; do
	install -m 0755 "packaging/debian/$s" "$root/DEBIAN/$s"
done
(cd "$root" && find etc -type f | sort | sed 's|^|/|') >"$root/DEBIAN/conffiles"
chmod 0644 "$root/DEBIAN/conffiles"

# Normalise what dpkg-deb records, so two builds of one commit are equal.
find "$root" -path "$root/DEBIAN" -prune -o -type d -exec chmod 0755 {} +
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -print0 | sort -z |
	xargs -0 md5sum | sed 's| \./| |') >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

size=$(du -k -s --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$DEB_VERSION/" -e "s/@INSTALLED_SIZE@/$size/" \
	packaging/debian/control.in >"$root/DEBIAN/control"
chmod 0644 "$root/DEBIAN/control"

deb="$OUT/pushrelay_${DEB_VERSION}_amd64.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"

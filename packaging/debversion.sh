#!/bin/sh
# Prints the Debian version for a `git describe --tags --always --dirty`
# string (the argument, or this checkout's). dpkg must order the results the
# way the commits are ordered, and dpkg-deb refuses a version that does not
# start with a digit, so:
#   v1.2.3                -> 1.2.3
#   v1.3.0-rc1            -> 1.3.0~rc1            (sorts before 1.3.0)
#   v1.2.3-4-gabc1234     -> 1.2.3+git4.abc1234   (sorts after 1.2.3)
#   abc1234 (no tag yet)  -> 0.0.0~git<commits>.abc1234
# and a trailing -dirty becomes .dirty on any of these.
set -eu

desc=${1:-$(git describe --tags --always --dirty --match 'v[0-9]*' 2>/dev/null || echo unknown)}

dirty=
case $desc in
*-dirty) dirty=.dirty; desc=${desc%-dirty} ;;
esac

# An abbreviated hash (no tag reachable) first: it may start with a digit.
if printf '%s\n' "$desc" | grep -Eq '^[0-9a-f]{7,40}$'; then
	n=${PUSHRELAY_COMMIT_COUNT:-$(git rev-list --count HEAD 2>/dev/null || echo 0)}
	echo "0.0.0~git${n}.${desc}${dirty}"
elif printf '%s\n' "$desc" | grep -Eq '^v?[0-9][A-Za-z0-9.+~-]*-[0-9]+-g[0-9a-f]+$'; then
	hash=${desc##*-g}
	rest=${desc%-g*}
	n=${rest##*-}
	tag=${rest%-*}
	tag=$(printf '%s' "${tag#v}" | tr - '~')
	echo "${tag}+git${n}.${hash}${dirty}"
elif printf '%s\n' "$desc" | grep -Eq '^v?[0-9][A-Za-z0-9.+~-]*$'; then
	echo "$(printf '%s' "${desc#v}" | tr - '~')${dirty}"
else
	echo "0.0.0~unknown${dirty}"
fi
